"""The bundled demo: a tiny ViT trained on scikit-learn's digits, then searched, all on CPU.

``vitslim demo`` rebuilds ``vitslim_core/assets/demo`` end to end:
1. train ``digits-vit`` from scratch on the digits training split (the "pretrained" dense model);
2. run the ViT-Slim search from those weights;
3. record the dense model's test accuracy next to the run, so the app can compare.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .io import atomic_save, atomic_write_json

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_DIR = ASSETS / "demo"

# search settings for the demo (the paper's weights are tuned for DeiT-S's much larger unit counts)
DEMO_SEARCH: dict[str, Any] = dict(epochs=12, batch_size=64, lr=5e-4, mask_lr=2e-2, weight_decay=0.05,
                                   w_attn=4e-3, w_mlp=2e-3, w_token=4e-3, log_every=5)


def pretrain_demo(out: Path, epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Train digits-vit from scratch; writes ``out/pretrained.safetensors``; returns test metrics."""
    from safetensors.torch import save_file
    from .data import load_data
    from .models import DEMO_MODEL, DEMO_TRAIN, build_model, data_config
    from .train import LoopConfig, param_groups, run_loop, setup_distributed

    recipe = dict(DEMO_TRAIN)
    torch.manual_seed(seed)
    model, _ = build_model(DEMO_MODEL)
    dcfg = data_config(model)
    bundle = load_data("digits", img_size=tuple(dcfg["input_size"][1:]), in_chans=dcfg["input_size"][0],
                       mean=dcfg["mean"], std=dcfg["std"], augment=recipe.get("augment", True), seed=seed)
    from .train import steps_per_epoch
    spe = steps_per_epoch(len(bundle.train), recipe["batch_size"])
    cfg = LoopConfig(epochs=epochs or recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                     weight_decay=recipe["weight_decay"], warmup_steps=recipe.get("warmup_epochs", 0) * spe,
                     grad_clip=recipe.get("clip_grad", 0.0), min_lr_ratio=0.0, seed=seed, log_every=20,
                     device="cpu")
    smoothing = recipe.get("label_smoothing", 0.0)

    def step_fn(m, x, y):
        logits = m(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        return loss, {"acc": 100.0 * float((logits.argmax(1) == y).float().mean())}

    di = setup_distributed("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        hist = run_loop(model, step_fn, bundle.train, bundle.test, cfg, Path(tmp), param_groups(
            model, cfg.weight_decay, cfg.lr, None), di, desc="pretrain")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_save(out / "pretrained.safetensors", lambda t: save_file(state, str(t)))
    return hist["eval"][-1]


def build_demo(out: str | Path = DEMO_DIR, quick: bool = False, seed: int = 0) -> Path:
    """Rebuild the demo run folder (about 3-4 minutes on 2 CPU cores; ``quick`` takes seconds)."""
    from .models import DEMO_MODEL
    from .search import SearchConfig, search

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a 200k-parameter model: one thread beats two that wait for each other (5-20x on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dense = pretrain_demo(out, epochs=2 if quick else None, seed=seed)
    t1 = time.perf_counter()
    s = dict(DEMO_SEARCH)
    if quick:
        s.update(epochs=1, max_steps=6)
    cfg = SearchConfig(model=DEMO_MODEL, checkpoint=str((out / "pretrained.safetensors").resolve()), data="digits",
                       out=str(out), seed=seed, device="cpu", **s)
    try:
        res = search(cfg)
    finally:
        torch.set_num_threads(threads)
    t2 = time.perf_counter()
    for leftover in ("checkpoint.pt",):
        (out / leftover).unlink(missing_ok=True)
    atomic_write_json(out / "demo.json", {"dense_test": dense, "pretrain_seconds": round(t1 - t0, 1),
                                          "search_seconds": round(t2 - t1, 1), "quick": quick,
                                          "search": dataclasses.asdict(cfg)})
    return res.run_dir
