"""Analytic MACs and parameters of a dense or slimmed ViT.

We quote MACs as "FLOPs", as DeiT does (DeiT-S = 4.6 G). Only matrix products are counted, exactly
what ``torch.utils.flop_counter.FlopCounterMode`` counts (divided by 2) with fused attention off:

* patch embedding:  M * C * in_chans * ph * pw
* block l, with N_l = P + kept tokens, A_l = kept attention dims (all heads), h_l = kept MLP units:
  qkv N*C*3A + q@k^T N*N*A + attn@v N*N*A + proj N*A*C + fc1 N*C*h + fc2 N*h*C
  (a gated MLP, GluMlp/SwiGLU, has a gate and a value row per unit: fc1 costs N*C*2h)
* attention-pool head (``global_pool='map'``, kept dense): ``pool_token_macs`` per token reaching it
  (prefix + the last layer's kept patches) plus ``pool_fixed_macs``
* relative position MLP (timm RelPosMlp, vit_relpos): its MLP over all relative coordinates, once per
  block with attention left (``attn_extra_macs``) or once per image when shared (``fixed_extra_macs``)
* classifier: C * classes (times 2 for distilled DeiT's two heads).

A branch with no units left costs nothing; the slim model keeps only its output bias.

This module knows architectures (``ArchSpec``) and widths only: a plan is anything with a ``spec`` and
a ``widths()`` method (``SlimPlan``), so ``plan.py`` builds on it and nothing here imports ``plan.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .spec import ArchSpec


class PlanLike(Protocol):
    """What the cost model reads of a plan: its architecture and its per-layer widths."""

    spec: ArchSpec

    def widths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-layer (attention dims, MLP units, tokens including prefix)."""
        ...


@dataclass(frozen=True)
class Cost:
    """MACs ("FLOPs") and parameters of one image's forward pass, with the dense reference."""

    macs: int
    params: int
    dense_macs: int
    dense_params: int

    @property
    def flops_ratio(self) -> float:
        return self.macs / self.dense_macs

    @property
    def params_ratio(self) -> float:
        return self.params / self.dense_params

    @property
    def gflops(self) -> float:
        return self.macs / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "params": self.params, "dense_macs": self.dense_macs,
                "dense_params": self.dense_params, "flops_ratio": self.flops_ratio,
                "params_ratio": self.params_ratio}


def layer_macs(spec: ArchSpec, attn_dims, mlp_units, tokens):
    """MACs of blocks with A attention dims, h MLP units and N tokens (numpy arrays broadcast)."""
    C = spec.embed_dim
    A = np.asarray(attn_dims, dtype=np.int64)
    h = np.asarray(mlp_units, dtype=np.int64)
    N = np.asarray(tokens, dtype=np.int64)
    return N * (4 * C * A + (2 + spec.mlp_glu) * C * h) + 2 * N * N * A + (A > 0) * spec.attn_extra_macs


def pool_macs(spec: ArchSpec, last_tokens):
    """MACs of the attention-pool head for the tokens leaving the last block (0 without one)."""
    n = np.asarray(last_tokens, dtype=np.int64) - (0 if spec.pool_prefix else spec.num_prefix_tokens)
    return spec.pool_token_macs * n


def layer_params(spec: ArchSpec, attn_dims, mlp_units):
    """Parameters of blocks with A attention dims and h MLP units; an empty branch keeps its bias."""
    C = spec.embed_dim
    A = np.asarray(attn_dims, dtype=np.int64)
    h = np.asarray(mlp_units, dtype=np.int64)
    attn = (A > 0) * (spec.norm1_params + spec.ls_params + 4 * A * C + spec.qkv_bias_parts * A * spec.qkv_bias
                     + spec.qk_norm_params + spec.attn_norm_params * A + spec.attn_extra_params) + C * spec.proj_bias
    glu = int(spec.mlp_glu)
    mlp = (h > 0) * (spec.norm2_params + spec.ls_params * spec.mlp_ls + (2 + glu) * h * C + (1 + glu) * h * spec.fc1_bias
                     + spec.mlp_norm_params * h) \
        + C * spec.fc2_bias
    return attn + mlp


def fixed_macs(spec: ArchSpec) -> int:
    """MACs outside the blocks that do not depend on a plan: patch embedding, pool head's fixed part, classifier."""
    ph, pw = spec.patch_size
    return (spec.num_patches * spec.embed_dim * spec.in_chans * ph * pw + spec.pool_fixed_macs + spec.fixed_extra_macs
            + spec.embed_dim * spec.num_classes * spec.num_out_heads)


def fixed_params(spec: ArchSpec) -> int:
    """Parameters outside the blocks (embeddings, final norm, heads)."""
    return spec.dense_params - spec.depth * int(layer_params(spec, spec.attn_dim, spec.mlp_hidden))


def dense_macs(spec: ArchSpec) -> int:
    return (fixed_macs(spec) + spec.depth * int(layer_macs(spec, spec.attn_dim, spec.mlp_hidden, spec.num_tokens))
            + int(pool_macs(spec, spec.num_tokens)))


def count_cost(arch_or_model: Any, plan: PlanLike | None = None) -> Cost:
    """MACs and parameters per image of a model, an architecture or a plan.

    Args:
        arch_or_model: an ArchSpec, a timm ViT (masks ignored), a slimmed model, a MaskScores,
            a SlimPlan, or a timm model name (built on the meta device, no weights).
        plan: optional SlimPlan to apply to the architecture.
    """
    spec, plan = _resolve(arch_or_model, plan)
    d_macs = dense_macs(spec)
    if plan is None:
        return Cost(d_macs, spec.dense_params, d_macs, spec.dense_params)
    spec.check_same_shape(plan.spec)
    A, h, N = plan.widths()
    macs = fixed_macs(spec) + int(layer_macs(spec, A, h, N).sum()) + int(pool_macs(spec, N[-1]))
    params = fixed_params(spec) + int(layer_params(spec, A, h).sum())
    return Cost(macs, params, d_macs, spec.dense_params)


def _is_plan(obj: Any) -> bool:
    return isinstance(getattr(obj, "spec", None), ArchSpec) and callable(getattr(obj, "widths", None))


def _resolve(obj: Any, plan: PlanLike | None) -> tuple[ArchSpec, PlanLike | None]:
    if isinstance(obj, ArchSpec):
        return obj, plan
    if _is_plan(obj):  # a SlimPlan
        return obj.spec, plan if plan is not None else obj
    if isinstance(getattr(obj, "spec", None), ArchSpec):  # MaskScores
        return obj.spec, plan
    if isinstance(obj, str):
        import timm
        import torch
        from .errors import VitSlimError
        from .spec import arch_spec
        try:
            with torch.device("meta"):
                m = timm.create_model(obj)
        except RuntimeError as e:
            raise VitSlimError(f"unknown model {obj!r} ({str(e).splitlines()[0]})") from None
        return arch_spec(m, model_name=obj), plan
    slim_plan = getattr(obj, "slim_plan", None)  # a physically slimmed model carries its plan
    if _is_plan(slim_plan):
        return slim_plan.spec, plan if plan is not None else slim_plan
    from .spec import arch_spec
    return arch_spec(obj), plan
