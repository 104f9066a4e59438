"""Physical slimming: turn a plan into a smaller timm ViT, its binary-mask reference, and save/load.

``slim_model`` deep-copies a timm VisionTransformer and replaces its ``blocks`` by ``SlimBlock``s whose
linears are sliced to the kept units, so timm's own ``forward_features``/``forward_head`` run unchanged:

* tokens: a block first gathers the tokens it keeps (prefix tokens always stay first);
* attention: heads keep different numbers of dims ("ragged heads"); heads with equal kept dims form a
  group whose q, k and v rows are contiguous in ``qkv``, and each group is one attention call with the
  ORIGINAL scale head_dim**-0.5; heads with no dims vanish;
* MLP: fc1 rows and fc2 columns of the kept hidden units;
* a branch with no units left keeps only its constant output, ``ls(bias)``, as ``BranchBias``.

``apply_hard_masks`` computes the same function on the dense model with binary masks (a reference for
the tests: DESIGN invariant 3). ``save_slim``/``load_slim`` store a slim model as ``model.safetensors``
plus ``slim.json`` (base model recipe and plan); loading never unpickles anything.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import families
from .errors import BudgetError, PlanMismatchError, ScoreFileError, VitSlimError
from .io import atomic_dir, read_json
from .masks import get_masks, remove_masks
from .plan import SlimPlan
from .spec import arch_spec

SLIM_FORMAT = "vitslim-slim"
SLIM_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "slim.json"
MAX_SLIM_JSON = 64 << 20


# ====================================================================== slim modules
ROW_ALIGN = 16  # floats: output rows of CPU matmuls start at 64-byte boundaries


def _plain_path(x: torch.Tensor) -> bool:
    """True unless this is eager CPU inference (autograd, tracers and exporters need plain ops)."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return True
    if torch.jit.is_tracing() or getattr(torch.compiler, "is_compiling", bool)() \
            or getattr(torch.compiler, "is_exporting", bool)():
        return True
    try:
        return torch.is_autocast_enabled("cpu")  # out= matmuls would bypass autocast
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``, faster on CPU for output widths that are not a multiple of 16.

    Slicing leaves widths such as 1070; MKL then writes rows that start at odd addresses and runs far
    below its speed for 1072. Writing into a buffer whose rows are padded to ``ROW_ALIGN`` floats gives the
    same numbers as fast as an aligned width, with the same matmul (same FLOPs). The result is a view with
    padded rows, so it is used for inference on CPU only (no autograd, tracing or export).
    """
    out_f = layer.out_features
    if out_f % ROW_ALIGN == 0 or _plain_path(x):
        return layer(x)
    x2 = x.reshape(-1, x.shape[-1])
    ld = -(-out_f // ROW_ALIGN) * ROW_ALIGN
    out = x2.new_empty(x2.shape[0], ld)[:, :out_f]  # (rows, out_f), row stride ld
    if layer.bias is None:
        torch.mm(x2, layer.weight.t(), out=out)
    else:
        torch.addmm(layer.bias, x2, layer.weight.t(), out=out)
    return out.unflatten(0, x.shape[:-1])


_NON_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SlimAttention(nn.Module):
    """Self-attention over heads that keep different numbers of dims.

    ``qkv`` rows are laid out group by group, each group as (3, heads, dims); ``proj`` columns follow the
    same group order as (heads, dims).

    Args:
        qkv: Linear(C, 3 * A), A = kept dims over all heads.
        proj: Linear(A, C).
        groups: (heads, dims per head) of each group, in ``qkv`` order.
        scale: the original attention scale head_dim**-0.5.
        fused_attn: use ``F.scaled_dot_product_attention`` (False: explicit matmuls and softmax).
        attn_drop: dropout probability of the attention weights (training only).
        proj_drop: dropout after ``proj``.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, groups: list[tuple[int, int]], scale: float,
                 fused_attn: bool = True, attn_drop: float = 0.0, proj_drop: nn.Module | None = None) -> None:
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.groups = tuple((int(n), int(k)) for n, k in groups)
        self.scale = float(scale)
        self.fused_attn = bool(fused_attn)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    @property
    def attn_dim(self) -> int:
        return sum(n * k for n, k in self.groups)

    def _attend(self, qkv: torch.Tensor, heads: int, dims: int) -> torch.Tensor:
        """Attention of one group: (B, N, 3 * heads * dims) -> (B, heads, N, dims)."""
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, heads, dims).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, dims)
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            if q.is_cuda:
                if qkv.stride(1) % 8 or qkv.storage_offset() % 8 or dims % 8:
                    # fused kernels read 16-byte vectors: a slice of a qkv of arbitrary width is
                    # misaligned ("CUDA error: misaligned address" in bf16 retraining otherwise)
                    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
                # q, k, v are strided slices of one qkv tensor whose width is arbitrary after slimming;
                # cuDNN's attention accepted and then failed on such inputs (H200, torch 2.11, bf16
                # retraining), the other fused kernels check their alignment and fall back cleanly
                with sdpa_kernel(_NON_CUDNN):
                    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = linear(x, self.qkv)  # (B, N, 3A)
        parts, start = [], 0
        for heads, dims in self.groups:  # one attention call per group of heads with equal dims
            width = 3 * heads * dims
            o = self._attend(qkv[..., start:start + width], heads, dims)
            parts.append(o.transpose(1, 2).reshape(B, N, heads * dims))  # a view for fused attention
            start += width
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (B, N, A)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"groups={list(self.groups)}, scale={self.scale:.6g}, fused_attn={self.fused_attn}"


class SlimMlp(nn.Module):
    """timm's Mlp with fewer hidden units: fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear,
                 drop1: nn.Module | None = None, drop2: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.drop1 = drop1 if drop1 is not None else nn.Identity()
        self.drop2 = drop2 if drop2 is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(linear(x, self.fc1)))))


class BranchBias(nn.Module):
    """A residual branch with no units left: it still adds its constant output ``ls(bias)``."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (C,), broadcast over (B, N, C) by the residual add; a copy, because a view of a parameter made
        # under no_grad still "requires grad" and confuses autograd hooks (FlopCounterMode's module tracker)
        return self.bias.clone()


class SlimBlock(nn.Module):
    """A block that first keeps some tokens, then runs its (possibly absent) branches.

    ``norm1``/``ls1``/``drop_path1`` (``norm2``/...) are timm's modules, or Identity when the branch is a
    ``BranchBias``; a branch is None when it adds nothing at all. A post-norm block (timm ResPostBlock,
    ``x + norm(branch(x))``) has Identity pre-norms and its norms in the ``ls1``/``ls2`` places.
    """

    def __init__(self, keep: torch.Tensor | None, norm1: nn.Module, attn: nn.Module | None, ls1: nn.Module,
                 drop_path1: nn.Module, norm2: nn.Module, mlp: nn.Module | None, ls2: nn.Module,
                 drop_path2: nn.Module) -> None:
        super().__init__()
        self.register_buffer("keep", keep, persistent=False)  # indices into the incoming sequence, or None
        self.norm1, self.attn, self.ls1, self.drop_path1 = norm1, attn, ls1, drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = norm2, mlp, ls2, drop_path2

    n_in: int | None = None  # set on the first block of a dynamic_img_size model: the plan's token count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_in is not None and x.shape[1] != self.n_in:
            from .errors import VitSlimError
            raise VitSlimError(f"the slim model was made for {self.n_in} tokens, the input has {x.shape[1]} "
                               "(is the image size different from the plan's?)")
        if self.keep is not None:
            x = x.index_select(1, self.keep)  # (B, P + kept patches, C)
        if self.attn is not None:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# ====================================================================== slicing helpers
def slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                 row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping output ``rows`` and input ``cols`` of ``layer``.

    ``row_scale`` multiplies the kept outputs (weight rows and bias), ``col_scale`` the kept inputs.
    """
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    if row_scale is not None:
        w = w * row_scale[:, None].to(w)
        b = b * row_scale.to(b) if b is not None else None
    if col_scale is not None:
        w = w * col_scale[None, :].to(w)
    out = skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def _branch_bias(out_layer: nn.Linear, ls: nn.Module) -> BranchBias | None:
    """The constant output of a branch whose units are all gone, or None when it adds nothing."""
    if out_layer.bias is None:
        return None
    with torch.no_grad():
        return BranchBias(ls(out_layer.bias.detach().clone()).detach().clone())


def _head_groups(keep: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Heads grouped by kept dims, most dims first: [(dims, head ids)]; heads with no dims are left out."""
    counts = keep.sum(1)
    return [(int(k), np.flatnonzero(counts == k)) for k in sorted(set(counts.tolist()), reverse=True) if k > 0]


def slim_attention(attn: nn.Module, keep: np.ndarray, fold: torch.Tensor | None = None) -> SlimAttention:
    """Slice a timm Attention to the kept head-dims.

    Args:
        attn: timm ``Attention`` with H heads of d dims.
        keep: (H, d) boolean keep mask (at least one True).
        fold: optional (H, d) scores multiplying q, k and v of each head-dim (folded into ``qkv``).
    """
    H, d = keep.shape
    rows, cols, groups = [], [], []
    for dims, heads in _head_groups(keep):
        flat = np.concatenate([h * d + np.flatnonzero(keep[h]) for h in heads])  # (heads * dims,) in q order
        rows.extend(s * H * d + flat for s in range(3))
        cols.append(flat)
        groups.append((len(heads), dims))
    dev = attn.qkv.weight.device
    rows_t = torch.as_tensor(np.concatenate(rows), device=dev)
    cols_t = torch.as_tensor(np.concatenate(cols), device=dev)
    row_scale = None
    if fold is not None:
        row_scale = fold.detach().reshape(-1).to(dev).repeat(3).index_select(0, rows_t)
    return SlimAttention(slice_linear(attn.qkv, rows=rows_t, row_scale=row_scale),
                         slice_linear(attn.proj, cols=cols_t), groups, scale=attn.scale,
                         fused_attn=getattr(attn, "fused_attn", True), attn_drop=attn.attn_drop.p,
                         proj_drop=attn.proj_drop)


def slim_mlp(mlp: nn.Module, keep: np.ndarray, fold: torch.Tensor | None = None) -> SlimMlp:
    """Slice a timm Mlp to the kept hidden units; ``fold`` scores multiply the activation output."""
    if families.is_glu(mlp) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        # GluMlp / SwiGLU (gate and value rows of a unit go together) or a sub-LN MLP
        return families.slim_glu_mlp(mlp, keep, fold)
    dev = mlp.fc1.weight.device
    idx = torch.as_tensor(np.flatnonzero(keep), device=dev)
    col_scale = fold.detach().to(dev).index_select(0, idx) if fold is not None else None
    return SlimMlp(slice_linear(mlp.fc1, rows=idx), mlp.act,
                   slice_linear(mlp.fc2, cols=idx, col_scale=col_scale), mlp.drop1, mlp.drop2)


def token_gather(prev: np.ndarray, cur: np.ndarray, num_prefix: int) -> np.ndarray | None:
    """Indices into a sequence of prefix + ``prev``-kept patches that keep prefix + ``cur`` patches.

    None when nothing is dropped (``cur`` equals ``prev``).
    """
    prev_idx, cur_idx = np.flatnonzero(prev), np.flatnonzero(cur)
    if len(cur_idx) == len(prev_idx):
        return None
    pos = np.searchsorted(prev_idx, cur_idx)  # position of each kept patch in the incoming sequence
    return np.concatenate([np.arange(num_prefix), num_prefix + pos]).astype(np.int64)


def slim_block(blk: nn.Module, plan: SlimPlan, layer: int, attn_fold: torch.Tensor | None = None,
               mlp_fold: torch.Tensor | None = None) -> SlimBlock:
    """Slim one timm Block with layer ``layer`` of ``plan`` (scores optionally folded in)."""
    spec = plan.spec
    prev = plan.token[layer - 1] if layer > 0 else np.ones(spec.num_patches, bool)
    gather = token_gather(prev, plan.token[layer], spec.num_prefix_tokens)
    dev = next(blk.parameters()).device
    keep = torch.as_tensor(gather, device=dev) if gather is not None else None
    ident = nn.Identity
    if families.is_post_norm(blk):  # ResPostBlock, x + norm(branch(x)): its norms go where a layer scale is
        pre1, out1, pre2, out2 = ident(), blk.norm1, ident(), blk.norm2
    else:
        pre1, out1, pre2, out2 = blk.norm1, blk.ls1, blk.norm2, blk.ls2
    if plan.attn[layer].any():
        attn = slim_attention(blk.attn, plan.attn[layer], attn_fold)
        norm1, ls1, dp1 = pre1, out1, blk.drop_path1
    else:  # the branch adds ls1(proj.bias) whatever its input, so norm1 and ls1 go
        attn = _branch_bias(blk.attn.proj, out1)
        norm1, ls1, dp1 = ident(), ident(), ident()
    if plan.mlp[layer].any():
        mlp = slim_mlp(blk.mlp, plan.mlp[layer], mlp_fold)
        norm2, ls2, dp2 = pre2, out2, blk.drop_path2
    else:
        mlp = _branch_bias(blk.mlp.fc2, out2)
        norm2, ls2, dp2 = ident(), ident(), ident()
    return SlimBlock(keep, norm1, attn, ls1, dp1, norm2, mlp, ls2, dp2)


def _fold_scores(model: nn.Module, fold_scores: bool) -> tuple[list, list]:
    masks = get_masks(model) if fold_scores else None
    L = len(model.blocks)
    if masks is None:
        return [None] * L, [None] * L
    with torch.no_grad():
        return ([m.per_dim().detach().clone() for m in masks.attn],
                [m.score.detach().clone() for m in masks.mlp])


def _plan_for(model: nn.Module, plan: SlimPlan) -> SlimPlan:
    """Check the plan fits the model; return it with the model's exact spec if cost-relevant facts differ."""
    if not isinstance(plan, SlimPlan):
        raise VitSlimError(f"expected a SlimPlan, got {type(plan).__name__}")
    spec = arch_spec(model)
    spec.check_same_shape(plan.spec)
    same = dataclasses.replace(spec, model_name=plan.spec.model_name, model_kwargs=plan.spec.model_kwargs)
    if same == plan.spec:
        return plan
    # e.g. a plan from a score file of a model with other biases or classes: keep costs exact for this model
    return SlimPlan(same, plan.attn, plan.mlp, plan.token, dict(plan.info))


# ====================================================================== public API
def slim_model(model: nn.Module, plan: SlimPlan, fold_scores: bool = True) -> nn.Module:
    """A physically slimmed copy of a timm ViT (the input is not modified).

    Args:
        model: a timm VisionTransformer / VisionTransformerDistilled, optionally with masks (``add_masks``).
        plan: which attention dims, MLP units and tokens to keep.
        fold_scores: fold the model's current attention/MLP scores into the kept weights (kept tokens
            always count as 1). Without masks, or with False, kept units count as 1.

    Returns:
        A copy of the same timm class whose ``blocks`` are ``SlimBlock``s, without masks, carrying
        ``slim_plan`` (so ``count_cost(slim)`` gives its exact MACs and parameters).

    Raises:
        PlanMismatchError: the plan was made for another architecture.
    """
    plan = _plan_for(model, plan)
    attn_fold, mlp_fold = _fold_scores(model, fold_scores)
    slim = copy.deepcopy(model)
    remove_masks(slim)
    if plan.spec.family in ("eva", "beit", "relpos"):  # timm Eva / Beit call each block with rope / rel-pos bias
        slim.blocks = nn.ModuleList(families.slim_eva_block(slim, blk, plan, l, attn_fold[l], mlp_fold[l])
                                    for l, blk in enumerate(slim.blocks))
    else:
        slim.blocks = nn.Sequential(*[slim_block(blk, plan, l, attn_fold[l], mlp_fold[l])
                                      for l, blk in enumerate(slim.blocks)])
        if getattr(slim, "dynamic_img_size", False):  # any grid reaches the blocks: refuse all but the plan's
            slim.blocks[0].n_in = plan.spec.num_tokens
    slim.slim_plan = plan
    return slim


class HardMaskedViT(nn.Module):
    """The dense model with BINARY masks: the reference that a slim model must equal (DESIGN invariant 3).

    Dropped attention dims and MLP units are multiplied by 0 and kept ones by their score (or 1); tokens
    dropped at layer l are excluded as keys at layer l, and only the last layer's kept tokens reach the
    final norm and the head.
    """

    def __init__(self, model: nn.Module, plan: SlimPlan, attn_mult: torch.Tensor, mlp_mult: torch.Tensor,
                 key_bias: torch.Tensor, final_keep: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.register_buffer("attn_mult", attn_mult, persistent=False)  # (L, 3*H*d) multiplies the qkv output
        self.register_buffer("mlp_mult", mlp_mult, persistent=False)    # (L, h) multiplies the act output
        self.register_buffer("key_bias", key_bias, persistent=False)    # (L, N): 0 kept key, -inf dropped
        self.register_buffer("final_keep", final_keep, persistent=False)  # prefix + last layer's patches

    def _attention(self, attn: nn.Module, x: torch.Tensor, l: int) -> torch.Tensor:
        B, N, _ = x.shape
        H, d = attn.num_heads, attn.head_dim
        qkv = attn.qkv(x) * self.attn_mult[l]
        q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
        bias = self.key_bias[l].view(1, 1, 1, N)
        if attn.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        else:
            a = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            x = a @ v
        return attn.proj(x.transpose(1, 2).reshape(B, N, H * d))

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, l: int) -> torch.Tensor:
        return mlp.fc2(families.mlp_hidden(mlp, x) * self.mlp_mult[l])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for l, blk in enumerate(m.blocks):
            if families.is_post_norm(blk):  # ResPostBlock: x + norm(branch(x))
                x = x + blk.norm1(self._attention(blk.attn, x, l))
                x = x + blk.norm2(self._mlp(blk.mlp, x, l))
                continue
            x = x + blk.ls1(self._attention(blk.attn, blk.norm1(x), l))
            x = x + blk.ls2(self._mlp(blk.mlp, blk.norm2(x), l))
        x = x.index_select(1, self.final_keep)  # outputs of dropped tokens are ignored
        return m.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def apply_hard_masks(model: nn.Module, plan: SlimPlan, fold_scores: bool = True) -> HardMaskedViT:
    """A copy of ``model`` computing the masked model with binary masks (see ``HardMaskedViT``).

    Args:
        model: a timm ViT, optionally with masks.
        plan: the units and tokens to keep.
        fold_scores: kept attention/MLP units are multiplied by their current score (else by 1).
    """
    plan = _plan_for(model, plan)
    attn_fold, mlp_fold = _fold_scores(model, fold_scores)
    dense = remove_masks(copy.deepcopy(model))
    ref = next(dense.parameters())
    s = plan.spec
    attn_mult = torch.as_tensor(plan.attn, dtype=ref.dtype, device=ref.device)  # (L, H, d)
    mlp_mult = torch.as_tensor(plan.mlp, dtype=ref.dtype, device=ref.device)    # (L, h)
    for l in range(s.depth):
        if attn_fold[l] is not None:
            attn_mult[l] *= attn_fold[l].to(attn_mult)
            mlp_mult[l] *= mlp_fold[l].to(mlp_mult)
    kept = np.concatenate([np.ones((s.depth, s.num_prefix_tokens), bool), plan.token], axis=1)  # (L, N)
    key_bias = torch.zeros(kept.shape, dtype=ref.dtype, device=ref.device)
    key_bias[torch.as_tensor(~kept, device=ref.device)] = float("-inf")
    final_keep = torch.as_tensor(np.flatnonzero(kept[-1]), device=ref.device)
    if s.family in ("eva", "beit", "relpos"):
        return families.EvaHardMasked(dense, plan, attn_mult, mlp_mult, key_bias, final_keep)
    attn_mult = attn_mult.reshape(s.depth, 1, -1).repeat(1, 3, 1).reshape(s.depth, -1)  # same for q, k, v
    return HardMaskedViT(dense, plan, attn_mult, mlp_mult, key_bias, final_keep)


# ====================================================================== files
SLIM_FOLDER_FILES = frozenset({WEIGHTS_FILE, META_FILE, "eval.json", "model.pt2", "model.onnx"})
"""What a slim-model folder may hold; saving over a folder with anything else is refused."""


def save_slim(model: nn.Module, out_dir: str | Path, extra_json: dict[str, Any] | None = None) -> Path:
    """Write a slim model as ``out_dir/model.safetensors`` + ``out_dir/slim.json``.

    The folder switches from its old contents to the new ones in one step (``io.atomic_dir``): a crash
    leaves the old slim model or the new one, never new weights with an old plan. An existing folder
    may only hold slim-model files (``SLIM_FOLDER_FILES``); exports of the old version go with it.

    Args:
        model: a model from ``slim_model``. ``model.slim_data`` (mean/std/input_size/class_names), if
            present, is stored as ``data``.
        out_dir: the folder.
        extra_json: further small JSON files written in the same step (e.g. ``{"eval.json": {...}}``).
    """
    from safetensors.torch import save_file
    plan = getattr(model, "slim_plan", None)
    if not isinstance(plan, SlimPlan):
        raise VitSlimError("the model is not a slim model (no slim_plan); make one with slim_model(model, plan)")
    if not plan.spec.model_name:
        raise VitSlimError("the slim model's plan does not name its base model, so it could not be rebuilt; "
                           "make the plan from scores that record the model (arch_spec(model, model_name=...))")
    out = Path(out_dir)
    extra = dict(extra_json or {})
    bad = sorted(set(extra) - (SLIM_FOLDER_FILES - {WEIGHTS_FILE, META_FILE}))
    if bad:
        raise VitSlimError(f"save_slim cannot write {', '.join(bad)} (allowed: eval.json)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = _weights_digest(tensors)
    md = {"format": SLIM_FORMAT, "sha256": digest}
    meta: dict[str, Any] = {"format": SLIM_FORMAT, "format_version": SLIM_VERSION,
                            "model": {"name": plan.spec.model_name, "kwargs": dict(plan.spec.model_kwargs)},
                            "plan": plan.to_dict(), "weights_sha256": digest}
    data = getattr(model, "slim_data", None)
    if data is not None:
        meta["data"] = data
    with atomic_dir(out, replaceable=SLIM_FOLDER_FILES) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=md)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        for name, obj in extra.items():
            (tmp / name).write_text(json.dumps(obj, indent=1) + "\n")
    return out


def _build_base(name: str, kwargs: dict[str, Any], spec: Any) -> nn.Module:
    """The base architecture with random weights, never downloading anything; checked against the
    plan's architecture on the meta device before it is allocated."""
    from .models import rebuild_model
    try:
        return rebuild_model({"name": name, "kwargs": dict(kwargs)}, expect=spec)
    except (ScoreFileError, PlanMismatchError):
        raise
    except VitSlimError as e:
        raise ScoreFileError(f"cannot build the base model {name[:60]!r} ({e})") from None
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ScoreFileError(f"cannot build the base model {name[:60]!r} ({reason})") from None


def load_slim(path: str | Path) -> nn.Module:
    """Load a folder written by ``save_slim`` (weights are checked against the plan; no pickle).

    Raises:
        ScoreFileError: missing or damaged files, another format or version.
        PlanMismatchError: weights that do not fit the plan.
    """
    from safetensors import SafetensorError, safe_open
    folder = Path(path)
    if not folder.is_dir():
        raise ScoreFileError(f"slim model folder {folder} does not exist")
    meta = read_json(folder / META_FILE, "slim model description", max_bytes=MAX_SLIM_JSON)
    src = f"slim model {folder}"
    if not isinstance(meta, dict) or meta.get("format") != SLIM_FORMAT:
        raise ScoreFileError(f"{src}: {META_FILE} is not a vitslim slim-model description")
    if meta.get("format_version") != SLIM_VERSION:
        raise ScoreFileError(f"{src} has slim format version {meta.get('format_version')!r}; "
                             f"this vitslim reads version {SLIM_VERSION}")
    recipe = meta.get("model")
    if (not isinstance(recipe, dict) or not isinstance(recipe.get("name"), str) or not recipe["name"]
            or not isinstance(recipe.get("kwargs", {}), dict)):
        raise ScoreFileError(f"{src}: {META_FILE} lacks the base model name and kwargs")
    try:
        plan = SlimPlan.from_dict(meta.get("plan"), source=f"{src} plan")
    except BudgetError as e:
        raise ScoreFileError(f"{src} plan is damaged ({e})") from None
    from .spec import recipe_problem
    problem = recipe_problem(plan.spec, recipe.get("kwargs") or {})
    if problem:
        raise PlanMismatchError(f"{src}: the plan does not fit the base model ({problem})")
    if meta.get("data") is not None:
        from .data import data_config_problem
        problem = data_config_problem(meta["data"])
        if problem:
            raise ScoreFileError(f"{src}: {META_FILE} has a damaged data config ({problem})")
        size, want_size = meta["data"].get("input_size"), [plan.spec.in_chans, *plan.spec.img_size]
        if size is not None and [int(v) for v in size] != want_size:
            raise ScoreFileError(f"{src}: {META_FILE} says the input is {str(size)[:40]}, the model's is {want_size}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ScoreFileError(f"{src} lacks {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            digest = (f.metadata() or {}).get("sha256")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ScoreFileError(f"{weights} is not a readable safetensors file ({reason})") from None
    if digest is not None and digest != _weights_digest(state):  # files from before the digest have none
        raise ScoreFileError(f"{weights} is damaged (its checksum does not match its contents)")
    want = meta.get("weights_sha256")
    if want is not None and want != digest:  # weights and description from different saves
        raise ScoreFileError(f"{src}: {WEIGHTS_FILE} and {META_FILE} are from different saves "
                             "(copied together by hand, or written by an old vitslim that was interrupted)")
    base = _build_base(recipe["name"], recipe.get("kwargs") or {}, plan.spec)
    slim = slim_model(base, plan, fold_scores=False)
    _check_state(slim, state, src)
    slim.load_state_dict(state, strict=True)
    data = meta.get("data")
    if data is not None:
        slim.slim_data = data
    return slim.eval()


def _weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of all tensors (catches bit rot and bad copies)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], src: str) -> None:
    """One-line PlanMismatchError when the saved weights do not fit the slim model built from the plan."""
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")] if extra else [])
        raise PlanMismatchError(f"{src}: the weights do not match the plan ({'; '.join(parts)})")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise PlanMismatchError(f"{src}: the weights do not match the plan ({k} has shape "
                                    f"{tuple(state[k].shape)}, the plan needs {tuple(v.shape)})")
        if not state[k].is_floating_point() and v.is_floating_point():
            raise PlanMismatchError(f"{src}: {k} has dtype {state[k].dtype}, expected a float tensor")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise ScoreFileError(f"{src}: {k} contains NaN or infinite weights")
