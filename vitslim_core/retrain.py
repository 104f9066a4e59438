"""The retrain job: train the PHYSICALLY slimmed model (so retraining itself is faster).

Optional distillation from the unslimmed searched model (soft or hard targets), timm's mixup/cutmix
and label smoothing, the cosine schedule of the shared loop, AMP on CUDA, torchrun DDP, checkpoints
and resume. The output folder gets ``best/`` and ``last/`` slim-model folders, ``plan.json`` and
``history.json``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import VitSlimError
from .io import atomic_write_json, prepare_out_dir, refuse_overlap
from .masks import remove_masks
from .plan import SlimPlan, plan_for_flops, plan_for_ratios
from .train import (LoopConfig, cleanup_distributed, make_mixup, param_groups, run_loop, setup_distributed,
                    supervised_step)


@dataclass
class RetrainConfig(LoopConfig):
    """Settings of a retraining run (also recorded in its history)."""

    run: str = ""
    out: str = "runs/retrain"
    plan: str | None = None
    flops: float | None = None
    attn: float | None = None
    mlp: float | None = None
    token: float | None = None
    multiple: int | None = None
    data: str | None = None
    data_root: str = "data"
    download: bool = False
    distill: str = "soft"  # none | soft | hard
    distill_tau: float = 1.0
    distill_alpha: float = 0.5
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    augment: bool = True
    epochs: int = 5
    lr: float = 2e-4

    @classmethod
    def from_recipe(cls, name: str = "paper", **overrides: Any) -> "RetrainConfig":
        """The settings of a named recipe (``recipes.py``; "paper": the official ViT-Slim retrain), with
        ``overrides`` on top (e.g. ``model=``, ``data=``, ``out=``)."""
        from .recipes import recipe
        return cls(**{**recipe(name, "retrain"), "recipe": name, **overrides})

    def validate(self) -> None:
        if not self.run:
            raise VitSlimError("retrain needs a search run folder (scores + searched weights)")
        if self.distill not in ("none", "soft", "hard"):
            raise VitSlimError("--distill must be none, soft or hard")
        budgets = [self.plan is not None, self.flops is not None,
                   any(v is not None for v in (self.attn, self.mlp, self.token))]
        if sum(budgets) != 1:
            raise VitSlimError("give exactly one budget: a plan file, --flops, or --attn/--mlp/--token")
        if not 0 <= self.drop_path < 1:
            raise VitSlimError(f"drop path rate must be in [0, 1), got {self.drop_path}")


@dataclass
class RetrainResult:
    out: Path
    plan: SlimPlan
    best_top1: float | None
    history: dict[str, Any] = field(repr=False)


def resolve_plan(scores, cfg: RetrainConfig) -> SlimPlan:
    if cfg.plan is not None:
        plan = SlimPlan.load(cfg.plan)
        scores.spec.check_same_shape(plan.spec, "plan file")
        return plan
    if cfg.flops is not None:
        return plan_for_flops(scores, cfg.flops, multiple=cfg.multiple)
    return plan_for_ratios(scores, attn=cfg.attn or 1.0, mlp=cfg.mlp or 1.0, token=cfg.token or 1.0,
                           multiple=cfg.multiple)


def retrain(cfg: RetrainConfig | None = None, *, resume: bool = False,
            on_log: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
            **overrides: Any) -> RetrainResult:
    """Slim the searched model of ``cfg.run`` to a budget and retrain it.

    Args:
        cfg: settings; keyword ``overrides`` replace its fields.
        resume: continue from ``out/checkpoint.pt`` (the plan is read back from ``out/plan.json``).
        on_log: receives every history record (for live plots).
        should_stop: polled every step; True stops after a checkpoint.
    """
    from .data import load_for
    from .run_folder import load_run
    from .search import versions
    from .slim import save_slim, slim_model

    cfg = dataclasses.replace(cfg or RetrainConfig(), **overrides)
    cfg.validate()
    out = Path(cfg.out)
    refuse_overlap(out, [cfg.run, cfg.plan])  # retraining clears best/, last/ and the checkpoint of out
    di = setup_distributed(cfg.device)
    try:
        scores, searched = load_run(cfg.run)
        if resume and not (out / "checkpoint.pt").is_file():
            raise VitSlimError(f"no checkpoint to resume from at {out / 'checkpoint.pt'}; start it again without --resume")
        plan = SlimPlan.load(out / "plan.json") if resume else resolve_plan(scores, cfg)
        torch.manual_seed(cfg.seed)
        model = slim_model(searched, plan)
        set_drop_path(model, cfg.drop_path)
        dmeta = dict(scores.meta.get("data") or {})
        model.slim_data = dmeta
        bundle = load_for(dmeta, cfg.data, input_size=(scores.spec.in_chans, *scores.spec.img_size),
                          augment=cfg.augment, seed=cfg.seed, data_root=cfg.data_root, download=cfg.download)
        data_name = bundle.spec
        if bundle.num_classes != scores.spec.num_classes:
            raise VitSlimError(f"dataset {data_name} has {bundle.num_classes} classes, the model "
                               f"{scores.spec.num_classes}")
        teacher = None
        if cfg.distill != "none":
            teacher = searched.eval().requires_grad_(False).to(di.device)  # masked at its soft scores
        else:
            remove_masks(searched)
        model.to(di.device)
        step_fn = _retrain_step(cfg, teacher, bundle.num_classes)
        if di.master:
            prepare_out_dir(out)
            if not resume:
                _clear_outputs(out)
                plan.save(out / "plan.json")
        best = {"top1": -1.0}

        def on_checkpoint(history: dict) -> None:
            # idempotent, so that a resume can call it again for the checkpoint it starts from:
            # best/ is (re)written when the latest evaluation is of the model in memory and is the
            # best so far, unless best/eval.json says it already holds that step
            save_slim(model, out / "last")
            evals = history.get("eval") or []
            best["top1"] = max([e["top1"] for e in evals] or [-1.0])
            ev = evals[-1] if evals else None
            if ev is not None and ev["step"] == history.get("step") and _best_step(out) != ev["step"] \
                    and all(e["top1"] < ev["top1"] for e in evals[:-1]):
                save_slim(model, out / "best", extra_json={"eval.json": ev})  # one step: weights with their eval
            atomic_write_json(out / "history.json", {**history, "config": dataclasses.asdict(cfg),
                                                     "plan": plan.summary(), "versions": versions()})

        groups = param_groups(model, cfg.weight_decay, cfg.lr, None)
        eval_set, eval_split = bundle.selection  # best/ is chosen on val where the data has one
        history = run_loop(model, step_fn, bundle.train, eval_set, cfg, out, groups, di, resume=resume,
                           on_log=on_log, on_checkpoint=on_checkpoint if di.master else None,
                           should_stop=should_stop, desc="retrain", eval_split=eval_split)
        if di.master:
            on_checkpoint(history)
        return RetrainResult(out, plan, best["top1"] if best["top1"] >= 0 else None, history)
    finally:
        cleanup_distributed()


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly over the blocks to ``rate`` (timm's rule), on a slim model's blocks."""
    from timm.layers import DropPath
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        for name, norm in (("drop_path1", "norm1"), ("drop_path2", "norm2")):
            # a branch without units (BranchBias, no norm) adds a constant: nothing to drop
            if hasattr(blk, name) and not isinstance(getattr(blk, norm, nn.Identity()), nn.Identity):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())


def _clear_outputs(out: Path) -> None:
    """A fresh run into a folder used before: drop the old run's best/ and last/ models (ours only:
    folders holding slim.json) and its checkpoint, so nothing of it is mistaken for the new run's."""
    import shutil
    for sub in ("best", "last"):
        d = out / sub
        if d.is_dir() and ((d / "slim.json").exists() or (d / "eval.json").exists()):
            shutil.rmtree(d, ignore_errors=True)
    (out / "checkpoint.pt").unlink(missing_ok=True)


def _best_step(out: Path) -> int | None:
    from .io import read_json
    from .errors import ScoreFileError
    try:
        return int(read_json(out / "best" / "eval.json", "evaluation record")["step"])
    except (ScoreFileError, KeyError, TypeError, ValueError):
        return None


def _retrain_step(cfg: RetrainConfig, teacher: nn.Module | None, num_classes: int):
    return supervised_step(teacher, make_mixup(cfg.mixup, cfg.cutmix, cfg.label_smoothing, num_classes),
                           cfg.label_smoothing, cfg.distill_tau, cfg.distill_alpha, hard=cfg.distill == "hard")
