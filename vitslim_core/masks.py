"""Learnable ViT-Slim score masks on a timm VisionTransformer, attached with forward hooks.

Scores live in one submodule ``model.slim_masks`` (so optimizers can find them by name) and act
through forward hooks, so timm's own forward (fused or unfused attention, any scale) runs unchanged
and every state_dict key of the model stays as it was:

* attention: a hook on ``attn.qkv`` multiplies q, k and v of each head-dim by the same score;
* MLP: a hook on ``mlp.act`` multiplies the activation output of fc1;
* tokens: hooks on ``norm1`` and ``norm2`` multiply the normalised input of attention and MLP at
  patch positions by ``tanh(raw)``; prefix tokens (class, distillation, registers) are never masked.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

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


class _MaskHook:
    """Forward hook multiplying a module's output by a score (a class, not a closure, so that
    ``copy.deepcopy(model)`` makes the copy's hooks point at the copy's scores)."""

    def __init__(self, kind: str, score: nn.Module) -> None:
        self.kind, self.score = kind, score

    def __call__(self, module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
        s = self.score
        if self.kind == "qkv":  # out: (B, N, 3 * H * d), laid out as (3, H, d)
            return out * s.per_dim().reshape(-1).repeat(3)
        if self.kind == "mlp":  # out: (B, N, h)
            return out * s.score
        # token: out (B, N, C), N = prefix + patches
        if out.shape[1] != s.num_prefix + s.score.shape[0]:
            raise VitSlimError(
                f"token masks were made for {s.num_prefix}+{s.score.shape[0]} tokens, the input has "
                f"{out.shape[1]} (is the image size different from the one the masks were made for?)")
        return out * s.full()


def _hooked_modules(model: nn.Module):
    for blk in model.blocks:
        yield from (blk.attn.qkv, blk.mlp.act, blk.norm1, blk.norm2)


def get_masks(model: nn.Module) -> SlimMasks | None:
    """The model's SlimMasks, or None."""
    m = getattr(model, "slim_masks", None)
    return m if isinstance(m, SlimMasks) else None


def add_masks(model: nn.Module, attn: AttnMode = "head_dim") -> nn.Module:
    """Attach learnable score masks (all kept: 1.0, tokens tanh(3)) to a timm ViT, in place.

    Args:
        model: a timm VisionTransformer or VisionTransformerDistilled.
        attn: "head_dim" (H x d scores, the paper's default), "head" (H) or "uniform" (d).

    Returns:
        The same model, with ``model.slim_masks`` holding the scores.
    """
    if get_masks(model) is not None:
        raise VitSlimError("the model already has masks; call remove_masks(model) first")
    spec = arch_spec(model)
    ref = next(model.parameters())
    masks = SlimMasks(spec, attn).to(device=ref.device, dtype=ref.dtype)
    for l, blk in enumerate(model.blocks):
        blk.attn.qkv.register_forward_hook(_MaskHook("qkv", masks.attn[l]))
        blk.mlp.act.register_forward_hook(_MaskHook("mlp", masks.mlp[l]))
        blk.norm1.register_forward_hook(_MaskHook("token", masks.token[l]))
        blk.norm2.register_forward_hook(_MaskHook("token", masks.token[l]))
    model.slim_masks = masks
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Detach the masks and their hooks; the model computes exactly as before ``add_masks``."""
    masks = get_masks(model)
    if masks is None:
        return model
    for mod in _hooked_modules(model):
        for key in [k for k, h in mod._forward_hooks.items() if isinstance(h, _MaskHook)]:
            del mod._forward_hooks[key]
    del model.slim_masks
    return model


def is_mask_param(name: str) -> bool:
    """True for parameter names that belong to the masks (for optimizer groups)."""
    return name.startswith("slim_masks.") or ".slim_masks." in name
