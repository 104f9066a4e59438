"""Learnable ViT-Slim score masks on a timm VisionTransformer.

Scores live in one submodule ``model.slim_masks`` (so optimizers find them by name). They act by
swapping the class of a few existing layers for a masked subclass (as ToMe patches timm), so timm's
own forward runs unchanged (fused or unfused attention, original scale) and every state_dict key of
the model stays as it was:

* attention: ``attn.qkv`` computes ``x @ (W * m)^T + b * m``, i.e. q, k and v of each head-dim
  multiplied by the same score m;
* MLP: ``mlp.fc2`` reads its input columns scaled by the scores, i.e. the activation output of fc1
  multiplied by the score of each hidden unit;
* tokens: ``norm1`` and ``norm2`` multiply their output at patch positions by the token value;
  prefix tokens (class, distillation, registers) are never masked.

Folding the scores into the weights (and recomputing the cheap norm in backward) keeps a search step
within a few percent of a plain fine-tuning step in time and activation memory: a multiplication
after a layer would store one more activation tensor per mask.
"""
from __future__ import annotations

from typing import Literal

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import families
from .errors import VitSlimError
from .spec import ArchSpec, arch_spec

AttnMode = Literal["head_dim", "head", "uniform"]
ATTN_MODES = ("head_dim", "head", "uniform")
TOKEN_INIT = 3.0
TOKEN_SCALE = float(torch.tanh(torch.tensor(TOKEN_INIT, dtype=torch.float64)))


def token_value(raw: torch.Tensor) -> torch.Tensor:
    """Token mask value from raw scores: tanh(raw) / tanh(3), so the initial raw 3 gives 1."""
    return torch.tanh(raw) / TOKEN_SCALE


class AttnScore(nn.Module):
    """Scores of one attention layer: (H, d) per head-dim, (H,) per head or (d,) shared by all heads."""

    def __init__(self, num_heads: int, head_dim: int, mode: AttnMode = "head_dim") -> None:
        super().__init__()
        if mode not in ATTN_MODES:
            raise VitSlimError(f"attention mask mode must be one of {', '.join(ATTN_MODES)}, got {mode!r}")
        self.mode, self.num_heads, self.head_dim = mode, num_heads, head_dim
        shape = {"head_dim": (num_heads, head_dim), "head": (num_heads,), "uniform": (head_dim,)}[mode]
        self.score = nn.Parameter(torch.ones(shape))

    def per_dim(self) -> torch.Tensor:
        """The score of every head-dim, (H, d)."""
        s = self.score
        if self.mode == "head":
            return s[:, None].expand(self.num_heads, self.head_dim)
        if self.mode == "uniform":
            return s[None, :].expand(self.num_heads, self.head_dim)
        return s

    def l1(self) -> torch.Tensor:
        return self.score.abs().sum()


class MlpScore(nn.Module):
    """Scores of one MLP layer's hidden units, (h,)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Parameter(torch.ones(hidden))

    def l1(self) -> torch.Tensor:
        return self.score.abs().sum()


class TokenScore(nn.Module):
    """Raw scores of one layer's patch positions, (M,).

    The mask value is tanh(raw) / tanh(3): the paper's tanh gate with its raw init of 3, scaled so
    the initial value is exactly 1 and fresh masks leave the model's logits unchanged.
    """

    def __init__(self, num_patches: int, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.score = nn.Parameter(torch.full((num_patches,), TOKEN_INIT))

    def value(self) -> torch.Tensor:
        return token_value(self.score)

    def full(self) -> torch.Tensor:
        """Mask over the whole sequence (prefix tokens at 1), (N, 1)."""
        v = self.value()
        return torch.cat([v.new_ones(self.num_prefix), v])[:, None]

    def l1(self) -> torch.Tensor:
        return self.value().abs().sum()


class SlimMasks(nn.Module):
    """All scores of a model: ``attn[l]``, ``mlp[l]``, ``token[l]``."""

    def __init__(self, spec: ArchSpec, attn_mode: AttnMode = "head_dim") -> None:
        super().__init__()
        self.attn_mode = attn_mode
        self.attn = nn.ModuleList(AttnScore(spec.num_heads, spec.head_dim, attn_mode) for _ in range(spec.depth))
        self.mlp = nn.ModuleList(MlpScore(spec.mlp_hidden) for _ in range(spec.depth))
        self.token = nn.ModuleList(TokenScore(spec.num_patches, spec.num_prefix_tokens) for _ in range(spec.depth))

    def l1_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum of |score| over all layers for attention, MLP and tokens (|tanh(raw)| for tokens)."""
        return (sum(m.l1() for m in self.attn), sum(m.l1() for m in self.mlp), sum(m.l1() for m in self.token))


class _RowMaskedLinear(nn.Linear):
    """qkv with per-output scores: ``(x W^T + b) * m`` computed as ``x (W*m)^T + b*m``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._vitslim_score.per_dim().reshape(-1).repeat(3)  # (3 * H * d,), laid out as (3, H, d)
        bias = None if self.bias is None else self.bias * m
        return F.linear(x, self.weight * m[:, None], bias)


class _ColMaskedLinear(nn.Linear):
    """fc2 whose input units are scaled by the MLP scores: ``(a * m) W^T + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self._vitslim_score.score[None, :], self.bias)


def _token_scaled(module: nn.Module, base_forward, x: torch.Tensor) -> torch.Tensor:
    s = module._vitslim_score
    if x.shape[1] != s.num_prefix + s.score.shape[0]:
        raise VitSlimError(
            f"token masks were made for {s.num_prefix}+{s.score.shape[0]} tokens, the input has "
            f"{x.shape[1]} (is the image size different from the one the masks were made for?)")
    mask = s.full()  # (N, 1)
    if torch.is_grad_enabled() and x.requires_grad:
        # recompute the norm in backward instead of storing its unmasked output
        return checkpoint(lambda t, m: base_forward(module, t) * m, x, mask, use_reentrant=False)
    return base_forward(module, x) * mask


@functools.lru_cache(maxsize=None)
def _masked_norm_class(base: type) -> type:
    """A subclass of the norm's own class whose output is scaled by the token mask."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _token_scaled(self, base.forward, x)
    return type(f"TokenMasked{base.__name__}", (base,), {"forward": forward})


def _swap(module: nn.Module, cls: type, score: nn.Module) -> None:
    object.__setattr__(module, "_vitslim_orig_class", type(module))
    object.__setattr__(module, "_vitslim_score", score)  # not a submodule: keys stay unchanged
    module.__class__ = cls


def _unswap(module: nn.Module) -> None:
    orig = module.__dict__.pop("_vitslim_orig_class", None)
    module.__dict__.pop("_vitslim_score", None)
    if orig is not None:
        module.__class__ = orig


def _attn_target(blk: nn.Module) -> tuple[nn.Module, type]:
    """The layer that carries a block's attention scores and its masked class (families.py: EVA)."""
    if families.is_eva_attention(blk.attn):
        return blk.attn, families.masked_attention_class(blk.attn.__dict__.get("_vitslim_orig_class", type(blk.attn)))
    return blk.attn.qkv, _RowMaskedLinear


def _masked_modules(model: nn.Module):
    for blk in model.blocks:
        yield from (_attn_target(blk)[0], blk.mlp.fc2, blk.norm1, blk.norm2)


def get_masks(model: nn.Module) -> SlimMasks | None:
    """The model's SlimMasks, or None."""
    m = getattr(model, "slim_masks", None)
    return m if isinstance(m, SlimMasks) else None


def add_masks(model: nn.Module, attn: AttnMode | None = None) -> nn.Module:
    """Attach learnable score masks (all kept: 1.0, tokens tanh(3)) to a timm ViT, in place.

    Args:
        model: a timm VisionTransformer or VisionTransformerDistilled.
        attn: "head_dim" (H x d scores, the paper's default), "head" (H) or "uniform" (d). None: "head_dim",
            or "head" for models whose attention units must be whole heads (rotary embeddings).

    Returns:
        The same model, with ``model.slim_masks`` holding the scores.
    """
    if get_masks(model) is not None:
        raise VitSlimError("the model already has masks; call remove_masks(model) first")
    spec = arch_spec(model)
    if attn is None:
        attn = "head" if spec.head_only else "head_dim"
    if spec.head_only and attn != "head":
        raise VitSlimError(f"this model has rotary embeddings (they rotate pairs of head dims) or a per-head q/k "
                           f"norm, so its attention is pruned by whole heads: use attn='head' (got {attn!r})")
    ref = next(model.parameters())
    masks = SlimMasks(spec, attn).to(device=ref.device, dtype=ref.dtype)
    for l, blk in enumerate(model.blocks):
        _swap(*_attn_target(blk), masks.attn[l])
        _swap(blk.mlp.fc2, _ColMaskedLinear, masks.mlp[l])
        _swap(blk.norm1, _masked_norm_class(type(blk.norm1)), masks.token[l])
        _swap(blk.norm2, _masked_norm_class(type(blk.norm2)), masks.token[l])
    model.slim_masks = masks
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Detach the masks and restore the masked layers' classes; the model computes exactly as before."""
    masks = get_masks(model)
    if masks is None:
        return model
    for mod in _masked_modules(model):
        _unswap(mod)
    del model.slim_masks
    return model


def is_mask_param(name: str) -> bool:
    """True for parameter names that belong to the masks (for optimizer groups)."""
    return name.startswith("slim_masks.") or ".slim_masks." in name
