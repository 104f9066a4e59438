"""Named training recipes: ``--recipe paper`` selects the official ViT-Slim settings.

The official code (github.com/Arnav0400/ViT-Slim, DeiT's training script with timm) searches DeiT-S with
``search.py`` and retrains with ``retrain.py``; its README runs both on 4 GPUs at batch 256 each. What it
effectively applies, and what the preset sets:

search: 50 epochs (the script's default), AdamW at a constant 5e-4 (``--sched none``, no warm-up), weight
decay 1e-3, drop path 0.1, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, global batch 1024, and l1
weights 2e-4 / 5e-5 / 1e-4 divided by the 4 processes: 5e-5 / 1.25e-5 / 2.5e-5 (our weights do not
depend on the number of processes, so the preset states the effective ones).

retrain: 300 epochs, cosine from 5e-4 x 1024 / 512 = 1e-3 to 1e-5 after 5 warm-up epochs, weight decay
0.05, drop path 0.1, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, no distillation, global batch 1024.

Not reproduced: RandAugment, random erasing, repeated augmentation and the EMA model of DeiT's script
(README, "Where we differ from the official code").
"""
from __future__ import annotations

from typing import Any

RECIPES = ("paper",)

PAPER_SEARCH: dict[str, Any] = dict(
    epochs=50, batch_size=1024, lr=5e-4, schedule="constant", warmup_steps=0, weight_decay=1e-3,
    drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1, w_attn=5e-5, w_mlp=1.25e-5, w_token=2.5e-5,
)
PAPER_RETRAIN: dict[str, Any] = dict(
    epochs=300, batch_size=1024, lr=1e-3, schedule="cosine", warmup_epochs=5, min_lr_ratio=1e-5 / 1e-3,
    weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1, distill="none",
)


def recipe(name: str, job: str) -> dict[str, Any]:
    """The settings of recipe ``name`` for ``job`` ("search" or "retrain"), as config field values."""
    from .errors import VitSlimError
    if name not in RECIPES:
        raise VitSlimError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    if job not in ("search", "retrain"):
        raise VitSlimError(f"recipes are for search or retrain, not {job!r}")
    return dict(PAPER_SEARCH if job == "search" else PAPER_RETRAIN)
