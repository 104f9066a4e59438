"""The search job: learn ViT-Slim score masks on a pretrained timm ViT in one training run.

loss = task loss (cross-entropy, optionally distilled from the unmasked model)
     + w_attn * sum|attn| + w_mlp * sum|mlp| + w_token * sum|tanh-token|

The run folder gets ``scores.safetensors``, ``model.safetensors`` and ``history.json``; a checkpoint is
written every ``checkpoint_every`` steps and at every epoch end, so ``resume=True`` continues exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import VitSlimError
from .io import prepare_out_dir, refuse_overlap
from .masks import ATTN_MODES, add_masks, get_masks, is_mask_param
from .run_folder import RUN_FILES, write_run_folder
from .scores import MaskScores
from .train import (LoopConfig, cleanup_distributed, distill_loss, make_mixup, param_groups, run_loop,
                    setup_distributed, task_loss)

ALIVE = 0.1  # a unit whose |mask value| is below this counts as "pruned" in progress displays


@dataclass
class SearchConfig(LoopConfig):
    """Everything a search needs; it is also what the run folder records.

    The l1 weights default to what the official DeiT-S search effectively applied: its README passes
    2e-4 / 5e-5 / 1e-4 but the script divides them by the number of processes (4 GPUs), while ours do
    not depend on the number of processes (``recipes.py``).
    """

    model: str = "digits-vit"
    data: str = "digits"
    data_root: str = "data"
    download: bool = False
    out: str = "runs/search"
    pretrained: bool = False
    checkpoint: str | None = None
    img_size: int | None = None
    attn_mode: str | None = None  # None: "head_dim", or "head" where the model needs whole heads (rope, qk-norm)
    w_attn: float = 5e-5
    w_mlp: float = 1.25e-5
    w_token: float = 2.5e-5
    search_attn: bool = True
    search_mlp: bool = True
    search_token: bool = True
    distill: bool = False
    distill_tau: float = 1.0
    distill_alpha: float = 0.5
    masks_only: bool = False
    mask_lr: float | None = None
    drop_path: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = True
    epochs: int = 10
    lr: float = 1e-4

    @classmethod
    def from_recipe(cls, name: str = "paper", **overrides: Any) -> "SearchConfig":
        """The settings of a named recipe (``recipes.py``; "paper": the official ViT-Slim search), with
        ``overrides`` on top (e.g. ``model=``, ``data=``, ``out=``)."""
        from .recipes import recipe
        return cls(**{**recipe(name, "search"), "recipe": name, **overrides})

    def validate(self) -> None:
        if self.attn_mode is not None and self.attn_mode not in ATTN_MODES:
            raise VitSlimError(f"--attn-mode must be one of {', '.join(ATTN_MODES)}")
        for k in ("w_attn", "w_mlp", "w_token", "lr", "weight_decay"):
            if getattr(self, k) < 0:
                raise VitSlimError(f"{k} must be >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise VitSlimError("epochs and batch size must be positive")
        if not (self.search_attn or self.search_mlp or self.search_token):
            raise VitSlimError("nothing to search: enable at least one of attention, MLP and tokens")


@dataclass
class SearchResult:
    run_dir: Path
    scores: MaskScores
    history: dict[str, Any] = field(repr=False)


def versions() -> dict[str, str]:
    import timm
    from . import __version__
    return {"vitslim": __version__, "timm": timm.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def prepare(cfg: SearchConfig):
    """Build the model (with its weights) and the data for a search or retrain."""
    from .data import load_for
    from .models import build_model, data_config
    n_cls = num_classes_of(cfg.data)
    kw = {"drop_path_rate": cfg.drop_path} if cfg.drop_path else {}
    model, recipe = build_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                                num_classes=n_cls, img_size=cfg.img_size, **kw)
    dcfg = data_config(model)
    bundle = load_for(dcfg, cfg.data, augment=cfg.augment, seed=cfg.seed, data_root=cfg.data_root,
                      download=cfg.download)
    data_meta = {"name": cfg.data, "class_names": list(bundle.class_names), "num_classes": bundle.num_classes,
                 **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dcfg.items()}}
    return model, recipe, bundle, data_meta


def num_classes_of(data: str) -> int:
    """Classes of a dataset spec without loading it (the model head must be built first)."""
    from .errors import DataError
    kind, _, path = data.partition(":")
    fixed = {"digits": 10, "synthetic": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
    if kind == "imagefolder":
        train = Path(path) / "train"
        if not train.is_dir() or not (Path(path) / "val").is_dir():
            raise DataError(f"data path {path} has no train/ and val/ folders (ImageNet layout)")
        n = sum(1 for p in train.iterdir() if p.is_dir())
        if n == 0:
            raise DataError(f"{train} has no class folders")
        return n
    if kind in fixed:
        return fixed[kind]
    raise DataError(f"unknown dataset {data!r}: use digits, synthetic[:N], fashion-mnist[:PATH], imagefolder:PATH, "
                    f"cifar10:PATH or cifar100:PATH")


def search(cfg: SearchConfig | None = None, *, resume: bool = False,
           on_log: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
           **overrides: Any) -> SearchResult:
    """Run a ViT-Slim search and write the run folder ``cfg.out``.

    Args:
        cfg: settings; keyword ``overrides`` replace its fields (``search(epochs=2, data="digits")``).
        resume: continue from ``out/checkpoint.pt``.
        on_log: receives every history record (for live plots).
        should_stop: polled every step; True stops after a checkpoint (resume later).
    """
    cfg = dataclasses.replace(cfg or SearchConfig(), **overrides)
    cfg.validate()
    run_dir = Path(cfg.out)
    if cfg.checkpoint:  # the weights to start from must not be among the files the search writes
        for name in RUN_FILES:
            refuse_overlap(run_dir / name, [cfg.checkpoint])
    di = setup_distributed(cfg.device)
    try:
        if di.master:
            prepare_out_dir(run_dir)  # fail now, not at the first checkpoint
        torch.manual_seed(cfg.seed)
        model, recipe, bundle, data_meta = prepare(cfg)
        teacher = None
        if cfg.distill:
            teacher = copy.deepcopy(model).eval().requires_grad_(False).to(di.device)
        add_masks(model, cfg.attn_mode)
        masks = get_masks(model)
        frozen = {"attn": not cfg.search_attn, "mlp": not cfg.search_mlp, "token": not cfg.search_token}
        for kind, off in frozen.items():
            getattr(masks, f"{kind}_scores").requires_grad_(not off)
        model.to(di.device)
        trainable = None
        if cfg.masks_only:
            trainable = lambda n, p: is_mask_param(n) or "norm" in n  # noqa: E731
        groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.mask_lr, trainable)
        for g in groups:  # frozen score dims must not sneak back in through their group
            g["params"] = [p for p in g["params"] if p.requires_grad]
        groups = [g for g in groups if g["params"]]
        step_fn = _search_step(masks, cfg, teacher, bundle.num_classes)
        meta = {"model": recipe, "data": data_meta, "versions": versions(),
                "search": {**{k: v for k, v in asdict(cfg).items()},
                           "searched": {"attn": cfg.search_attn, "mlp": cfg.search_mlp, "token": cfg.search_token}}}

        def write_run(history: dict) -> None:
            write_run_folder(run_dir, model, meta, history)

        eval_set, eval_split = bundle.selection  # per-epoch numbers on val where the data has one
        history = run_loop(model, step_fn, bundle.train, eval_set, cfg, run_dir, groups, di, resume=resume,
                           on_log=on_log, on_checkpoint=write_run, should_stop=should_stop, desc="search",
                           eval_split=eval_split)
        history["config"] = meta["search"]
        if di.master:
            write_run(history)
        scores = MaskScores.from_model(model, meta)
        return SearchResult(run_dir, scores, history)
    finally:
        cleanup_distributed()


def _search_step(masks, cfg: SearchConfig, teacher: nn.Module | None, num_classes: int):
    w = (cfg.w_attn if cfg.search_attn else 0.0, cfg.w_mlp if cfg.search_mlp else 0.0,
         cfg.w_token if cfg.search_token else 0.0)

    mixup = make_mixup(cfg.mixup, cfg.cutmix, cfg.label_smoothing, num_classes)

    def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        task, logits, x_in, logs = task_loss(model, x, y, mixup, cfg.label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x_in)
            task = (1 - cfg.distill_alpha) * task + cfg.distill_alpha * distill_loss(logits, t_logits, cfg.distill_tau)
        loss = task + masks.l1_loss(*w)
        with torch.no_grad():
            logs = {"task_loss": float(task.detach()), **logs, **alive_fractions(masks)}
        return loss, logs
    return step_fn


@torch.no_grad()
def alive_fractions(masks) -> dict[str, float]:
    """Fraction of units per dimension whose |mask value| >= ALIVE (one device-to-host copy)."""
    fr = torch.stack([(v.abs() >= ALIVE).float().mean()
                      for v in (masks.attn_per_dim(), masks.mlp_scores, masks.token_values())]).tolist()
    return dict(zip(("attn", "mlp", "token"), fr))
