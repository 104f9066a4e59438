"""The bundled runs: small ViTs trained from scratch on CPU, then searched.

``build_demo(out, data=...)`` rebuilds one of them end to end:
1. train the dense model from scratch on the training split (the "pretrained" model):
   ``digits-vit`` on scikit-learn's digits (``assets/demo``, the default) or ``fashion-vit`` on
   Fashion-MNIST (``assets/fashion``);
2. run the ViT-Slim search from those weights;
3. record the dense model's test accuracy next to the run, so the app can compare; for
   Fashion-MNIST also the accuracy-vs-FLOPs sweep (``sweep.json/.csv/.png``) and 100 test images
   (``samples.safetensors``) so token masks can be shown without the data set.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import VitSlimError
from .io import atomic_save, atomic_write_json

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_DIR = ASSETS / "demo"
FASHION_DIR = ASSETS / "fashion"
SAMPLES_FILE = "samples.safetensors"

# search settings for the demo (the paper's weights are tuned for DeiT-S's much larger unit counts)
DEMO_SEARCH: dict[str, Any] = dict(epochs=12, batch_size=64, lr=5e-4, mask_lr=2e-2, weight_decay=0.05,
                                   w_attn=4e-3, w_mlp=2e-3, w_token=4e-3, log_every=5)
# Fashion-MNIST: chosen by 1-5 epoch proxies from fashion-vit weights (masked val top-1 at the end).
# The digits weights kill 94% of the MLP units and 60% of the tokens in one epoch (81%); 1/4 and 1/10
# of them with weight lr 5e-4 and crop+flip augmentation still lose 2-4 points (85-87%). With weight
# lr 2e-4, mask lr 1e-2 and no augmentation (as in pretraining), w_attn 5e-4, w_mlp 1e-4 and
# w_token 1e-3 separate all three dimensions in 3 epochs (attn 24%, MLP 75%, tokens 21% of the scores
# below 0.1) at the dense accuracy (89.2%; slim at 30/50/70% FLOPs: 86.9/88.5/89.1% val); half of
# these weights barely move the tokens (3% below 0.1).
FASHION_SEARCH: dict[str, Any] = dict(epochs=3, batch_size=128, lr=2e-4, mask_lr=1e-2, weight_decay=0.05,
                                      w_attn=5e-4, w_mlp=1e-4, w_token=1e-3, augment=False, log_every=50)

DEMO_DATA = ("digits", "fashion-mnist")


def _demo_settings(data: str) -> tuple[str, dict[str, Any], int]:
    """(model name, search settings, torch threads) of the demo for a data set."""
    from .models import DEMO_MODEL, FASHION_MODEL

    if data == "digits":
        # a 200k-parameter model: one thread beats two that wait for each other (5-20x on a busy machine)
        return DEMO_MODEL, dict(DEMO_SEARCH), 1
    if data == "fashion-mnist":
        return FASHION_MODEL, dict(FASHION_SEARCH), 2
    raise VitSlimError(f"the demo is built for {' or '.join(DEMO_DATA)}, not {data!r}")


def pretrain(out: Path, data: str = "digits", epochs: int | None = None, seed: int = 0, max_steps: int = 0,
             data_root: str | Path = "data", download: bool = False) -> dict[str, Any]:
    """Train the demo model of ``data`` from scratch; writes ``out/pretrained.safetensors``.

    Returns:
        ``{"test": metrics, "val": metrics or None, "epochs", "steps", "seconds", "cpu_seconds"}``;
        the per-epoch evaluation runs on the validation split where the data has one, the final
        ``test`` numbers always on the test split.
    """
    from safetensors.torch import save_file
    from .data import load_data
    from .models import build_model, data_config, local_recipe
    from .train import LoopConfig, evaluate, param_groups, run_loop, setup_distributed, steps_per_epoch

    name, _, _ = _demo_settings(data)
    recipe = local_recipe(name)
    torch.manual_seed(seed)
    model, _ = build_model(name)
    dcfg = data_config(model)
    bundle = load_data(data, img_size=tuple(dcfg["input_size"][1:]), in_chans=dcfg["input_size"][0],
                       mean=dcfg["mean"], std=dcfg["std"], augment=recipe.get("augment", True), seed=seed,
                       data_root=data_root, download=download)
    spe = steps_per_epoch(len(bundle.train), recipe["batch_size"])
    cfg = LoopConfig(epochs=epochs or recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                     weight_decay=recipe["weight_decay"], warmup_steps=recipe.get("warmup_epochs", 0) * spe,
                     grad_clip=recipe.get("clip_grad", 0.0), min_lr_ratio=0.0, seed=seed, log_every=20,
                     device="cpu", max_steps=max_steps, eval_batch_size=256)
    smoothing = recipe.get("label_smoothing", 0.0)

    def step_fn(m, x, y):
        logits = m(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        return loss, {"acc": 100.0 * float((logits.argmax(1) == y).float().mean())}

    di = setup_distributed("cpu")
    eval_set, split = bundle.selection
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        hist = run_loop(model, step_fn, bundle.train, eval_set, cfg, Path(tmp), param_groups(
            model, cfg.weight_decay, cfg.lr, None), di, desc="pretrain", eval_split=split)
    last = hist["eval"][-1]
    test = last if split == "test" else {**evaluate(model, bundle.test, 256), "step": last["step"],
                                         "epoch": last["epoch"], "split": "test"}
    record = {"test": test, "val": last if split == "val" else None, "epochs": cfg.epochs, "steps": hist["step"],
              "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
              "history": hist}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_save(out / "pretrained.safetensors", lambda t: save_file(state, str(t)))
    return record


def pretrain_demo(out: Path, epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Train digits-vit from scratch; writes ``out/pretrained.safetensors``; returns test metrics."""
    return pretrain(out, "digits", epochs=epochs, seed=seed)["test"]


def write_samples(out: Path, data_root: str | Path = "data", download: bool = False, per_class: int = 10) -> Path:
    """Save the first ``per_class`` test images of every Fashion-MNIST class to ``out/samples.safetensors``."""
    from .fashion import find_files, pick_samples, read_fashion, save_samples

    _, _, images, labels = read_fashion(find_files(None, data_root, download))
    idx = pick_samples(labels, per_class)
    save_samples(out / SAMPLES_FILE, images[idx], labels[idx], idx)
    return out / SAMPLES_FILE


def build_demo(out: str | Path = DEMO_DIR, quick: bool = False, seed: int = 0, data: str = "digits",
               data_root: str | Path = "data", download: bool = False, threads: int | None = None) -> Path:
    """Rebuild a bundled run folder (``quick`` takes seconds to a minute).

    Args:
        out: the run folder (default: the bundled digits demo; ``FASHION_DIR`` for Fashion-MNIST).
        quick: a much shorter run (for tests).
        seed: training, augmentation and search seed.
        data: ``digits`` (about 3-4 minutes on 2 CPU cores) or ``fashion-mnist`` (about 30 minutes).
        data_root: where torchvision keeps Fashion-MNIST when it is not in Debian's folder.
        download: let torchvision download Fashion-MNIST when it is nowhere.
        threads: torch CPU threads while building (default: 1 for digits, 2 for Fashion-MNIST).
    """
    from .search import SearchConfig, search

    model, settings, default_threads = _demo_settings(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    extra: dict[str, Any] = {}
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        if data == "digits":
            dense = pretrain_demo(out, epochs=2 if quick else None, seed=seed)
        else:
            record = pretrain(out, data, epochs=1 if quick else None, seed=seed, max_steps=20 if quick else 0,
                              data_root=data_root, download=download)
            dense = record["test"]
            extra.update(dense_val=record["val"], pretrain_epochs=record["epochs"], pretrain_steps=record["steps"],
                         pretrain_cpu_seconds=record["cpu_seconds"])
        t1, c1 = time.perf_counter(), time.process_time()
        if quick:
            settings.update(epochs=1, max_steps=6)
        cfg = SearchConfig(model=model, checkpoint=str((out / "pretrained.safetensors").resolve()), data=data,
                           out=str(out), seed=seed, device="cpu", data_root=str(data_root), download=download,
                           **settings)
        res = search(cfg)
        t2, c2 = time.perf_counter(), time.process_time()
        if data != "digits":
            from .sweep import DEFAULT_BUDGETS, sweep, write_sweep
            rows = sweep(out, (0.5, 1.0) if quick else DEFAULT_BUDGETS, batch_size=256, data_root=data_root)
            write_sweep(rows, out)
            write_samples(out, data_root, download)
            extra.update(search_cpu_seconds=round(c2 - c1, 1), search_eval=res.history["eval"][-1],
                         sweep_seconds=round(time.perf_counter() - t2, 1), threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    for leftover in ("checkpoint.pt",):
        (out / leftover).unlink(missing_ok=True)
    atomic_write_json(out / "demo.json", {"dense_test": dense, "pretrain_seconds": round(t1 - t0, 1),
                                          "search_seconds": round(t2 - t1, 1), "quick": quick, **extra,
                                          "search": dataclasses.asdict(cfg)})
    return res.run_dir
