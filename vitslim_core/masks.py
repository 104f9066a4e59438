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

Folding the scores into the weights keeps a search step within a few percent of a plain fine-tuning
step in time and activation memory: a multiplication after a layer would store one more activation
tensor per mask. The scores of each dimension are one (L, ...) parameter, and the per-layer factors
are computed once per forward of the model, so a step adds about 15 small operations per block
(``benchmarks/bench_search_step.py`` counts them). The token-masked norms store their output for the
token scores' gradient; ``add_masks(..., recompute_norms=True)`` recomputes it in backward instead.
"""
from __future__ import annotations

from typing import Any, Literal

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


class _LayerScore:
    """One layer's scores of one dimension: a view into the (L, ...) parameter of ``SlimMasks``.

    Not an ``nn.Module`` (no state_dict keys of its own); ``score`` is a fresh view of the shared
    parameter on every access, so in-place edits under ``no_grad`` write through to it.
    """

    kind = ""

    def __init__(self, owner: "SlimMasks", layer: int) -> None:
        self._owner, self.layer = owner, layer

    @property
    def score(self) -> torch.Tensor:
        return getattr(self._owner, f"{self.kind}_scores")[self.layer]

    def _step(self, key: str) -> torch.Tensor | None:
        """This layer's per-step tensor, computed once for all layers at the model's forward (or None)."""
        step = self._owner._step
        return None if step is None else step[key][self.layer]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, shape={tuple(self.score.shape)})"


class AttnScore(_LayerScore):
    """Scores of one attention layer: (H, d) per head-dim, (H,) per head or (d,) shared by all heads."""

    kind = "attn"

    @property
    def mode(self) -> str:
        return self._owner.attn_mode

    @property
    def num_heads(self) -> int:
        return self._owner.num_heads

    @property
    def head_dim(self) -> int:
        return self._owner.head_dim

    def per_dim(self) -> torch.Tensor:
        """The score of every head-dim, (H, d)."""
        return _per_dim(self.score, self.mode, self.num_heads, self.head_dim)

    def qkv_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores of the qkv output rows as (3 H d, 1) for the weight and (3 H d,) for the bias."""
        rows = self._step("qkv_rows")
        if rows is None:
            rows = self.per_dim().reshape(-1).repeat(3)  # (3 * H * d,), laid out as (3, H, d)
            return rows[:, None], rows
        return self._step("qkv_cols"), rows

    def l1(self) -> torch.Tensor:
        return self.score.abs().sum()


class MlpScore(_LayerScore):
    """Scores of one MLP layer's hidden units, (h,)."""

    kind = "mlp"

    def fc2_mask(self) -> torch.Tensor:
        """The scores of fc2's input columns, (1, h)."""
        m = self._step("fc2")
        return self.score[None, :] if m is None else m

    def l1(self) -> torch.Tensor:
        return self.score.abs().sum()


class TokenScore(_LayerScore):
    """Raw scores of one layer's patch positions, (M,).

    The mask value is tanh(raw) / tanh(3): the paper's tanh gate with its raw init of 3, scaled so
    the initial value is exactly 1 and fresh masks leave the model's logits unchanged.
    """

    kind = "token"

    @property
    def num_prefix(self) -> int:
        return self._owner.num_prefix

    def value(self) -> torch.Tensor:
        return token_value(self.score)

    def full(self) -> torch.Tensor:
        """Mask over the whole sequence (prefix tokens at 1), (N, 1) (or (1, N, 1) during a model forward)."""
        m = self._step("token")
        if m is not None:
            return m
        v = self.value()
        return torch.cat([v.new_ones(self.num_prefix), v])[:, None]

    def l1(self) -> torch.Tensor:
        return self.value().abs().sum()


def _per_dim(s: torch.Tensor, mode: str, H: int, d: int) -> torch.Tensor:
    """Scores as stored, (..., H, d) / (..., H) / (..., d), expanded to (..., H, d)."""
    if mode == "head":
        return s[..., None].expand(*s.shape, d)
    if mode == "uniform":
        return s[..., None, :].expand(*s.shape[:-1], H, d)
    return s


class SlimMasks(nn.Module):
    """All scores of a model, one parameter per dimension holding every layer.

    Parameters: ``attn_scores`` (L, H, d) / (L, H) / (L, d), ``mlp_scores`` (L, h), ``token_scores``
    (L, M) raw. ``attn[l]``, ``mlp[l]``, ``token[l]`` are per-layer views with the accessors of the
    per-layer score modules of earlier versions (whose state_dict keys ``attn.{l}.score`` still load).

    One parameter per dimension keeps the step short: one l1 sum, one tanh over all token scores and
    three optimizer updates per step instead of three per layer. At every forward of the model the
    per-layer factors (qkv rows, fc2 columns, full token masks) are computed once for all layers and
    split into views (``begin_step``); the masked layers read them until the forward ends.

    Args:
        spec: the architecture.
        attn_mode: see ``add_masks``.
        recompute_norms: recompute the token-masked norms in backward instead of storing their output
            (less activation memory, more operations per step).
    """

    def __init__(self, spec: ArchSpec, attn_mode: AttnMode = "head_dim", recompute_norms: bool = False) -> None:
        super().__init__()
        if attn_mode not in ATTN_MODES:
            raise VitSlimError(f"attention mask mode must be one of {', '.join(ATTN_MODES)}, got {attn_mode!r}")
        L, H, d = spec.depth, spec.num_heads, spec.head_dim
        self.attn_mode, self.num_heads, self.head_dim = attn_mode, H, d
        self.num_prefix, self.depth, self.recompute_norms = spec.num_prefix_tokens, L, recompute_norms
        shape = {"head_dim": (H, d), "head": (H,), "uniform": (d,)}[attn_mode]
        self.attn_scores = nn.Parameter(torch.ones(L, *shape))
        self.mlp_scores = nn.Parameter(torch.ones(L, spec.mlp_hidden))
        self.token_scores = nn.Parameter(torch.full((L, spec.num_patches), TOKEN_INIT))
        self.attn = tuple(AttnScore(self, l) for l in range(L))
        self.mlp = tuple(MlpScore(self, l) for l in range(L))
        self.token = tuple(TokenScore(self, l) for l in range(L))
        self._step: dict[str, tuple[torch.Tensor, ...]] | None = None
        self._l1_weights: tuple = (None, None)

    def attn_per_dim(self) -> torch.Tensor:
        """Every layer's score of every head-dim, (L, H, d)."""
        return _per_dim(self.attn_scores, self.attn_mode, self.num_heads, self.head_dim)

    def token_values(self) -> torch.Tensor:
        """Token mask values of every layer, (L, M)."""
        return token_value(self.token_scores)

    def l1_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum of |score| over all layers for attention, MLP and tokens (|tanh(raw)| for tokens)."""
        return self.attn_scores.abs().sum(), self.mlp_scores.abs().sum(), self.token_values().abs().sum()

    def l1_loss(self, w_attn: float, w_mlp: float, w_token: float) -> torch.Tensor:
        """``w_attn * sum|attn| + w_mlp * sum|mlp| + w_token * sum|token value|`` in one weighted sum."""
        terms = torch.stack([self.attn_scores.abs().sum(), self.mlp_scores.abs().sum(),
                             torch.tanh(self.token_scores).abs().sum()])
        key = (w_attn, w_mlp, w_token, terms.device, terms.dtype)
        if self._l1_weights[0] != key:  # made once, not at every step
            self._l1_weights = (key, terms.new_tensor([w_attn, w_mlp, w_token / TOKEN_SCALE]))
        return terms @ self._l1_weights[1]

    # ------------------------------------------------------------------ per-step factors
    def step_factors(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """What the masked layers multiply by, for all layers at once, split into per-layer views."""
        L = self.depth
        rows = self.attn_per_dim().reshape(L, -1).repeat(1, 3)  # (L, 3 H d), laid out as (3, H, d)
        v = F.pad(self.token_values(), (self.num_prefix, 0), value=1.0)  # (L, N): prefix tokens at 1
        # shapes as the masked layers broadcast them, so that their gradients need no reshape
        return {"qkv_rows": rows.unbind(0), "qkv_cols": rows.view(L, -1, 1).unbind(0),
                "fc2": self.mlp_scores.view(L, 1, -1).unbind(0), "token": v.view(L, 1, -1, 1).unbind(0)}

    def begin_step(self, *_: Any) -> None:
        """Forward pre-hook of the model: compute the factors of this forward once."""
        self._step = self.step_factors()

    def end_step(self, *_: Any) -> None:
        """Forward hook of the model (also after an error): layers called on their own compute their own."""
        self._step = None

    # ------------------------------------------------------------------ state_dict of earlier versions
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for kind in ("attn", "mlp", "token"):
            old = [f"{prefix}{kind}.{l}.score" for l in range(self.depth)]
            if f"{prefix}{kind}_scores" not in state_dict and all(k in state_dict for k in old):
                state_dict[f"{prefix}{kind}_scores"] = torch.stack([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _RowMaskedLinear(nn.Linear):
    """qkv with per-output scores: ``(x W^T + b) * m`` computed as ``x (W*m)^T + b*m``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols, rows = self._vitslim_score.qkv_masks()  # (3 H d, 1), (3 H d,)
        bias = None if self.bias is None else self.bias * rows
        return F.linear(x, self.weight * cols, bias)


class _ColMaskedLinear(nn.Linear):
    """fc2 whose input units are scaled by the MLP scores: ``(a * m) W^T + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self._vitslim_score.fc2_mask(), self.bias)


def _token_scaled(module: nn.Module, base_forward, x: torch.Tensor) -> torch.Tensor:
    s = module._vitslim_score
    mask = s.full()  # (N, 1) or (1, N, 1)
    if x.shape[1] != mask.shape[-2]:
        raise VitSlimError(
            f"token masks were made for {s.num_prefix}+{mask.shape[-2] - s.num_prefix} tokens, the input has "
            f"{x.shape[1]} (is the image size different from the one the masks were made for?)")
    if s._owner.recompute_norms and torch.is_grad_enabled() and x.requires_grad:
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


def add_masks(model: nn.Module, attn: AttnMode | None = None, recompute_norms: bool = False) -> nn.Module:
    """Attach learnable score masks (all kept: 1.0, tokens tanh(3)) to a timm ViT, in place.

    Args:
        model: a timm VisionTransformer or VisionTransformerDistilled.
        attn: "head_dim" (H x d scores, the paper's default), "head" (H) or "uniform" (d). None: "head_dim",
            or "head" for models whose attention units must be whole heads (rotary embeddings).
        recompute_norms: recompute the token-masked norm outputs in backward instead of storing them
            (two activations of (B, N, C) less per block, about 10 more operations per block and step).

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
    masks = SlimMasks(spec, attn, recompute_norms).to(device=ref.device, dtype=ref.dtype)
    for l, blk in enumerate(model.blocks):
        _swap(*_attn_target(blk), masks.attn[l])
        _swap(blk.mlp.fc2, _ColMaskedLinear, masks.mlp[l])
        _swap(blk.norm1, _masked_norm_class(type(blk.norm1)), masks.token[l])
        _swap(blk.norm2, _masked_norm_class(type(blk.norm2)), masks.token[l])
    model.slim_masks = masks
    # the per-layer factors are computed once per forward of the whole model (not kept beyond it)
    model.register_forward_pre_hook(masks.begin_step)
    model.register_forward_hook(masks.end_step, always_call=True)
    return model


def _remove_step_hooks(model: nn.Module, masks: SlimMasks) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is masks]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


def remove_masks(model: nn.Module) -> nn.Module:
    """Detach the masks and restore the masked layers' classes; the model computes exactly as before."""
    masks = get_masks(model)
    if masks is None:
        return model
    for mod in _masked_modules(model):
        _unswap(mod)
    _remove_step_hooks(model, masks)
    masks.end_step()
    del model.slim_masks
    return model


def is_mask_param(name: str) -> bool:
    """True for parameter names that belong to the masks (for optimizer groups)."""
    return name.startswith("slim_masks.") or ".slim_masks." in name
