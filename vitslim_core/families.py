"""Parts of timm ViT families beyond the plain GELU-MLP VisionTransformer: what to mask, cost and slim.

Inside timm's ``VisionTransformer`` (the block code of slim.py, with dispatch points here):

* gated MLPs, ``GluMlp`` (packed gate and value rows in one ``fc1``, e.g. ``SwiGLUPacked`` of DINOv2-g)
  and ``SwiGLU`` (separate ``fc1_g`` / ``fc1_x``): one score per hidden unit, shared by its gate row and
  its value row, acting on the input columns of ``fc2`` as for a plain MLP. Exact.
* the attention-pool head (``global_pool='map'``, SigLIP): kept dense; it reads the tokens that reach
  the end, so its key/value projection costs MACs per token. Exact.
* residual post-norm blocks (``ResPostBlock``, ``x + norm(branch(x))``): the norms take the layer-scale
  places of ``SlimBlock``; token scores scale each token's branch outputs. Exact.

timm ``Eva`` (EVA02, rope ViTs, DINOv3, PE, Sapiens2) and ``Beit``: their blocks are masked, costed and
slimmed here (``EvaSlimBlock``/``EvaSlimAttention``): rope (whole heads, rope rows of kept patches
gathered), q/k norms (whole heads), BEiT's relative position bias (rows/cols of kept tokens and kept heads
gathered), q/v biases, gamma layer scale, sub-LNs (sliced: not exact, see README).

timm ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``): ``RelPosAttention`` is masked and
slimmed by the same code; its ``rel_pos`` (RelPosMlp or RelPosBias, per block or shared) is kept whole and
its bias rows/cols of kept tokens and kept heads are gathered; post-norm ``ResPostRelPosBlock`` puts its
norms where a layer scale would be (``RelPosSlimBlock``). A RelPosMlp's MACs are counted (cost.py). Exact.

Everything else (SAM, NaFlex, grouped-query attention...) is refused by
``spec.check_supported`` with the part it cannot handle.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn

# timm ViT classes outside VisionTransformer and the part of each that has no masks/slimming yet
UNSUPPORTED_CLASSES = {
    "VisionTransformerSAM": "SAM windowed attention with decomposed relative positions and a conv neck",
    "NaFlexVit": "NaFlex variable-resolution patch embedding and masked attention",
}


def mlp_classes() -> tuple[type, ...]:
    """timm MLP classes whose hidden units can be masked at ``fc2``'s input (plain, GLU, SwiGLU)."""
    from timm.layers import GluMlp, Mlp, SwiGLU
    return (Mlp, GluMlp, SwiGLU)


def is_glu(mlp: nn.Module) -> bool:
    from timm.layers import GluMlp, SwiGLU
    return type(mlp) in (GluMlp, SwiGLU)


def mlp_problem(mlp: nn.Module, sub_ln: bool = False) -> str | None:
    """Why this MLP cannot be slimmed (None: fine); ``sub_ln`` allows a norm over the hidden units."""
    from timm.layers import GluMlp, SwiGLU
    norm = getattr(mlp, "norm", nn.Identity())
    if not isinstance(norm, nn.Identity):
        if not sub_ln:
            return "has a hidden norm (a sub-LN over the MLP units, scale_mlp_norm) that is not supported"
        problem = norm_problem(norm, mlp.fc2.in_features)
        if problem:
            return f"hidden norm {problem}"
    if type(mlp) is GluMlp:
        if mlp.chunk_dim != -1:
            return "is a convolutional GluMlp (gate and value split along channels)"
        if getattr(mlp, "use_conv", False) or not _plain_linear(mlp.fc1) or not _plain_linear(mlp.fc2):
            return "layers are not plain nn.Linear layers"
        if mlp.fc1.out_features != 2 * mlp.fc2.in_features:
            return "is a GluMlp whose fc1 is not twice its hidden width"
        return None
    if type(mlp) is SwiGLU:
        if not all(_plain_linear(l) for l in (mlp.fc1_g, mlp.fc1_x, mlp.fc2)):
            return "layers are not plain nn.Linear layers"
        if mlp.fc1_g.out_features != mlp.fc2.in_features or mlp.fc1_x.out_features != mlp.fc2.in_features:
            return "is a SwiGLU whose gate/value widths differ from fc2's input"
        return None
    if getattr(mlp, "use_conv", False) or not _plain_linear(mlp.fc1) or not _plain_linear(mlp.fc2):
        return "layers are not plain nn.Linear layers"
    return None


def norm_problem(norm: nn.Module, width: int) -> str | None:
    """Why a norm over ``width`` pruned units cannot be sliced (None: fine)."""
    from timm.layers import LayerNorm, RmsNorm
    if type(norm) not in (nn.LayerNorm, LayerNorm, RmsNorm):
        return f"{type(norm).__name__} is not a LayerNorm/RmsNorm"
    if tuple(norm.normalized_shape) != (width,):
        return f"normalises {tuple(norm.normalized_shape)}, not the {width} units"
    return None


def norm_unit_params(norm: nn.Module) -> int:
    """Parameters per unit of a sub-LN (weight and bias: 2; RMS weight: 1; none: 0)."""
    if isinstance(norm, nn.Identity):
        return 0
    return sum(p.numel() for p in norm.parameters()) // int(np.prod(norm.normalized_shape))


def slice_norm(norm: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A copy of a LayerNorm/RmsNorm over the kept units ``idx`` only (not exact: statistics change)."""
    if isinstance(norm, nn.Identity):
        return norm
    import copy
    out = copy.deepcopy(norm)
    out.normalized_shape = (int(idx.numel()),)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(norm, name, None)
            if isinstance(p, nn.Parameter):
                setattr(out, name, nn.Parameter(p.detach().index_select(0, idx).clone()))
    return out


def _plain_linear(layer: nn.Module) -> bool:
    return layer.__dict__.get("_vitslim_orig_class", type(layer)) is nn.Linear


def fc1_has_bias(mlp: nn.Module) -> bool:
    fc1 = mlp.fc1_x if hasattr(mlp, "fc1_x") else mlp.fc1
    return fc1.bias is not None


def mlp_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a timm Mlp / GluMlp / SwiGLU feeds into fc2: (B, N, h) (the place where MLP scores act)."""
    from timm.layers import GluMlp, SwiGLU
    if type(mlp) is GluMlp:
        x1, x2 = mlp.fc1(x).chunk(2, dim=-1)
        h = x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2
    elif type(mlp) is SwiGLU:
        h = mlp.act(mlp.fc1_g(x)) * mlp.fc1_x(x)
    else:
        h = mlp.act(mlp.fc1(x))
    return mlp.norm(mlp.drop1(h))


class SlimGluMlp(nn.Module):
    """A gated MLP with fewer hidden units: ``fc2(drop(act(fc1_g x) * fc1_x x))``.

    Args:
        fc1_g: Linear(C, h') the gate rows of the kept units.
        fc1_x: Linear(C, h') the value rows of the kept units.
        act: the gate's activation (SiLU for SwiGLU).
        fc2: Linear(h', C).
    """

    def __init__(self, fc1_g: nn.Linear | None, fc1_x: nn.Linear, act: nn.Module, fc2: nn.Linear,
                 drop1: nn.Module | None = None, drop2: nn.Module | None = None, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1_g, self.fc1_x, self.act, self.fc2 = fc1_g, fc1_x, act, fc2
        self.drop1 = drop1 if drop1 is not None else nn.Identity()
        self.norm = norm if norm is not None else nn.Identity()  # a sub-LN over the kept units
        self.drop2 = drop2 if drop2 is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .slim import linear
        if self.fc1_g is None:  # a plain MLP with a sub-LN
            h = self.act(linear(x, self.fc1_x))
        else:
            h = self.act(linear(x, self.fc1_g)) * linear(x, self.fc1_x)  # (B, N, h')
        return self.drop2(self.fc2(self.norm(self.drop1(h))))


def slim_glu_mlp(mlp: nn.Module, keep: np.ndarray, fold: torch.Tensor | None = None) -> SlimGluMlp:
    """Slice a GluMlp or SwiGLU to the kept hidden units (gate and value rows of each unit go together)."""
    from timm.layers import GluMlp
    from .slim import slice_linear
    dev = mlp.fc2.weight.device
    idx = torch.as_tensor(np.flatnonzero(keep), device=dev)
    col_scale = fold.detach().to(dev).index_select(0, idx) if fold is not None else None
    fc2 = slice_linear(mlp.fc2, cols=idx, col_scale=col_scale)
    if type(mlp) is GluMlp:
        h = mlp.fc2.in_features
        first, second = slice_linear(mlp.fc1, rows=idx), slice_linear(mlp.fc1, rows=idx + h)
        gate, value = (second, first) if mlp.gate_last else (first, second)  # fc1 rows are (x1 | x2)
    elif hasattr(mlp, "fc1_g"):
        gate, value = slice_linear(mlp.fc1_g, rows=idx), slice_linear(mlp.fc1_x, rows=idx)
    else:  # plain Mlp with a sub-LN
        gate, value = None, slice_linear(mlp.fc1, rows=idx)
    return SlimGluMlp(gate, value, mlp.act, fc2, mlp.drop1, mlp.drop2, slice_norm(mlp.norm, idx))


def attn_pool_problem(pool: nn.Module) -> str | None:
    """Why an attention-pool head cannot be costed exactly (None: fine)."""
    from timm.layers import AttentionPoolLatent
    if type(pool) is not AttentionPoolLatent:
        return f"attention-pool head {type(pool).__name__} is not timm's AttentionPoolLatent"
    if getattr(pool, "pos_embed", None) is not None:
        return "attention-pool head with its own position embedding is not supported"
    return None


def attn_pool_macs(pool: nn.Module | None) -> tuple[int, int]:
    """(MACs per token reaching the pool, fixed MACs) of a timm AttentionPoolLatent; (0, 0) without one.

    Per token: its key/value projection and its share of q @ k^T and attn @ v for every latent query.
    Fixed: the query projection of the latents, the output projection and the pool's MLP.
    """
    if pool is None:
        return 0, 0
    lat = int(pool.latent_len)
    C = int(pool.q.out_features)
    per_token = pool.kv.in_features * pool.kv.out_features + 2 * lat * C
    fixed = lat * (pool.q.in_features * pool.q.out_features + pool.proj.in_features * pool.proj.out_features)
    if getattr(pool, "mlp", None) is not None:
        fixed += lat * sum(m.in_features * m.out_features for m in pool.mlp.modules() if isinstance(m, nn.Linear))
    return int(per_token), int(fixed)


# ====================================================================== EVA-style models (timm ``Eva``)
# EvaBlock with EvaAttention or AttentionRope: rotary position embeddings (rope) on the patch tokens,
# q/k/v biases in any layout (EVA's q and v biases with a zero k bias, or a biased qkv), gamma layer
# scale, plain / GluMlp / SwiGLU MLPs, an optional attention-pool head, abs pos embed and class token
# optional. Rope rotates pairs of head dims and acts per head, so with rope the attention units are whole
# heads (attn="head"): a kept head keeps all its dims and its rotary embedding, which is then exact.
# A dropped token takes its rotary embedding with it: the slim model gathers the embeddings of the
# patches it keeps.


def is_eva(model: nn.Module) -> bool:
    return type(model).__name__ == "Eva" and type(model).__module__ == "timm.models.eva"


def is_beit(model: nn.Module) -> bool:
    return type(model).__name__ == "Beit" and type(model).__module__ == "timm.models.beit"


def is_relpos(model: nn.Module) -> bool:
    return (type(model).__name__ == "VisionTransformerRelPos"
            and type(model).__module__ == "timm.models.vision_transformer_relpos")


def family_of(model: nn.Module) -> str:
    """"eva", "beit" or "relpos" for the timm classes whose blocks families.py slims, "" otherwise."""
    return "eva" if is_eva(model) else ("beit" if is_beit(model) else ("relpos" if is_relpos(model) else ""))


def is_eva_attention(attn: nn.Module) -> bool:
    """EvaAttention, AttentionRope, BEiT's Attention or RelPosAttention (masked and slimmed here)."""
    from timm.layers.attention import AttentionRope
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention
    from timm.models.vision_transformer_relpos import RelPosAttention
    return attn.__dict__.get("_vitslim_orig_class", type(attn)) in (EvaAttention, AttentionRope, BeitAttention,
                                                                    RelPosAttention)


def head_dim(attn: nn.Module) -> int:
    """Dims per head (BEiT's attention does not store it)."""
    d = getattr(attn, "head_dim", None)
    return int(d) if d is not None else int(attn.qkv.out_features // 3 // attn.num_heads)


def rel_bias(attn: nn.Module, shared: torch.Tensor | None = None) -> torch.Tensor | None:
    """BEiT's relative position bias of one block (its own table plus the shared one), (1|, H, N, N);
    for RelPosAttention its ``rel_pos`` module's bias (RelPosBias table or RelPosMlp), else the shared one."""
    rel_pos = getattr(attn, "rel_pos", None)
    if rel_pos is not None:
        return rel_pos.get_bias()
    table = getattr(attn, "relative_position_bias_table", None)
    bias = attn._get_rel_pos_bias() if table is not None else None
    if shared is not None:
        bias = shared if bias is None else bias + shared
    return bias


def beit_problem(model: nn.Module) -> str | None:
    """Why this timm Beit cannot be masked and slimmed (None: fine)."""
    from timm.models.beit import Block
    if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        return f"patch embedding {type(model.patch_embed).__name__} without a Conv2d projection"
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            return f"block {i} is {type(blk).__name__}"
        if not is_eva_attention(blk.attn):
            return f"block {i} attention is {type(blk.attn).__name__}"
        problem = _scale_and_mlp_problem(i, blk)
        if problem:
            return problem
    return None


def _scale_and_mlp_problem(i: int, blk: nn.Module) -> str | None:
    """The layer-scale and MLP checks that Eva and BEiT blocks share (None: fine)."""
    if getattr(blk, "gamma_1", None) is None and getattr(blk, "gamma_2", None) is not None:
        return f"block {i} has layer scale on the MLP branch only, not supported"
    if type(blk.mlp) not in mlp_classes():
        return f"block {i} MLP is {type(blk.mlp).__name__}"
    problem = mlp_problem(blk.mlp, sub_ln=True)
    if problem:
        return f"block {i} MLP {type(blk.mlp).__name__} {problem}"
    return None


def eva_problem(model: nn.Module) -> str | None:
    """Why this timm Eva cannot be masked and slimmed (None: fine)."""
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
    if getattr(model, "patch_drop", None) is not None:
        return "patch dropout is not supported (set patch_drop_rate=0)"
    if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        return f"patch embedding {type(model.patch_embed).__name__} without a Conv2d projection"
    rope = getattr(model, "rope", None)
    if rope is not None and not hasattr(rope, "feat_shape"):
        return f"rotary embedding {type(rope).__name__} without a fixed grid is not supported"
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (EvaBlock, EvaBlockPostNorm):
            return f"block {i} is {type(blk).__name__}"
        a = blk.attn
        if not is_eva_attention(a):
            return f"block {i} attention is {type(a).__name__}"
        if getattr(a, "num_kv_groups", 1) != 1:
            return f"block {i} attention uses grouped-query attention (num_kv_heads < num_heads), not supported"
        if a.gate is not None:
            return f"block {i} attention is gated (not supported)"
        if not isinstance(a.norm, nn.Identity):  # scale_attn_inner: a sub-LN over all heads (not exact)
            problem = norm_problem(a.norm, a.num_heads * a.head_dim)
            if problem:
                return f"block {i} attention inner norm {problem}"
        problem = _scale_and_mlp_problem(i, blk)
        if problem:
            return problem
        problem = post_norm_problem(i, blk)
        if problem:
            return problem
        if not _plain_linear(a.proj) or not all(_plain_linear(l) for l in _qkv_linears(a)):
            return f"block {i} attention projections are not plain nn.Linear layers"
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        return attn_pool_problem(pool)
    return None


def rel_pos_problem(rel_pos: nn.Module | None) -> str | None:
    from timm.layers import RelPosBias, RelPosMlp
    if rel_pos is None or type(rel_pos) in (RelPosBias, RelPosMlp):
        return None
    return f"relative position module {type(rel_pos).__name__} is not supported"


def rel_pos_macs(rel_pos: nn.Module | None) -> int:
    """MACs of one ``get_bias()`` of a RelPosMlp (its MLP over all relative log-coordinates); 0 otherwise."""
    from timm.layers import RelPosMlp
    if type(rel_pos) is not RelPosMlp:
        return 0
    n = int(np.prod(rel_pos.rel_coords_log.shape[:-1]))
    return n * sum(l.in_features * l.out_features for l in rel_pos.mlp.modules() if isinstance(l, nn.Linear))


def is_post_norm(blk: nn.Module) -> bool:
    """A residual post-norm block, ``x + norm(branch(x))`` (timm ResPostBlock, ResPostRelPosBlock,
    EvaBlockPostNorm): its norms act on the branch outputs, where a layer scale would be."""
    from timm.models.eva import EvaBlockPostNorm
    from timm.models.vision_transformer import ResPostBlock
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock
    return type(blk) in (ResPostBlock, ResPostRelPosBlock, EvaBlockPostNorm)


def post_norm_problem(i: int, blk: nn.Module) -> str | None:
    """A post-norm block needs output biases: an emptied branch still adds norm(bias), a constant."""
    if is_post_norm(blk) and (blk.attn.proj.bias is None or blk.mlp.fc2.bias is None):
        return f"block {i} is post-norm with a bias-free output projection (not supported)"
    return None


def relpos_problem(model: nn.Module) -> str | None:
    """Why this timm VisionTransformerRelPos cannot be masked and slimmed (None: fine)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer_relpos import RelPosBlock, ResPostRelPosBlock
    if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        return f"patch embedding {type(model.patch_embed).__name__} without a Conv2d projection"
    if getattr(model.patch_embed, "dynamic_img_size", False):
        return "dynamic_img_size=True is not supported: token masks need a fixed patch grid"
    problem = rel_pos_problem(model.shared_rel_pos)
    if problem:
        return problem
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (RelPosBlock, ResPostRelPosBlock):
            return f"block {i} is {type(blk).__name__}"
        a = blk.attn
        if not is_eva_attention(a):
            return f"block {i} attention is {type(a).__name__}"
        problem = rel_pos_problem(a.rel_pos)
        if problem:
            return f"block {i} {problem}"
        if type(blk.mlp) is not Mlp:
            return f"block {i} MLP is {type(blk.mlp).__name__}"
        problem = mlp_problem(blk.mlp)
        if problem:
            return f"block {i} MLP {type(blk.mlp).__name__} {problem}"
        if not _plain_linear(a.proj) or not _plain_linear(a.qkv):
            return f"block {i} attention projections are not plain nn.Linear layers"
        problem = post_norm_problem(i, blk)
        if problem:
            return problem
    return None


def _qkv_linears(attn: nn.Module) -> list[nn.Linear]:
    return [attn.qkv] if attn.qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]


def qkv_parts(attn: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The q/k/v weight (3A, C) of an Eva attention and its q, k, v bias parameters (None: no bias)."""
    if attn.qkv is not None:
        w = attn.qkv.weight
        if attn.qkv.bias is not None:
            return w, list(attn.qkv.bias.chunk(3))
        q_bias = getattr(attn, "q_bias", None)
        v_bias = getattr(attn, "v_bias", None)
        return w, [q_bias, None, v_bias]  # EVA's k bias is a zero buffer
    lin = (attn.q_proj, attn.k_proj, attn.v_proj)
    return torch.cat([l.weight for l in lin]), [l.bias for l in lin]


def _full_bias(parts: list[torch.Tensor | None], A: int, ref: torch.Tensor) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    return torch.cat([p if p is not None else ref.new_zeros(A) for p in parts])


def eva_spec_fields(model: nn.Module) -> dict:
    """ArchSpec fields of a timm Eva that differ from what VisionTransformer's reading gives."""
    blk0 = model.blocks[0]
    a = blk0.attn
    qn, kn = getattr(a, "q_norm", nn.Identity()), getattr(a, "k_norm", nn.Identity())
    _, parts = qkv_parts(a)
    table = getattr(a, "relative_position_bias_table", None)
    extra = 0 if table is None else table.numel()
    if is_relpos(model):
        rp = a.rel_pos
        extra = 0 if rp is None else sum(p.numel() for p in rp.parameters())
        ls = getattr(blk0, "ls1", nn.Identity())
        return {"family": "relpos", "qkv_bias": parts[0] is not None, "attn_extra_params": extra,
                "attn_extra_macs": rel_pos_macs(rp), "fixed_extra_macs": rel_pos_macs(model.shared_rel_pos),
                "ls_params": 0 if isinstance(ls, nn.Identity) else ls.gamma.numel(),
                "qk_norm_params": sum(p.numel() for p in (*qn.parameters(), *kn.parameters())),
                "head_only": not isinstance(qn, nn.Identity) or not isinstance(kn, nn.Identity)}
    return {"family": family_of(model), "qkv_bias": any(p is not None for p in parts),
            "attn_extra_params": extra,
            "qkv_bias_parts": max(1, sum(p is not None for p in parts)),
            "ls_params": 0 if getattr(blk0, "gamma_1", None) is None else blk0.gamma_1.numel(),
            "mlp_norm_params": norm_unit_params(getattr(blk0.mlp, "norm", nn.Identity())),
            "attn_norm_params": norm_unit_params(getattr(a, "norm", nn.Identity())),
            "mlp_ls": getattr(blk0, "gamma_2", None) is not None or getattr(blk0, "gamma_1", None) is None,
            "qk_norm_params": sum(p.numel() for p in (*qn.parameters(), *kn.parameters())),
            # rope rotates pairs of head dims and a q/k norm normalises each head: prune whole heads
            "head_only": getattr(model, "rope", None) is not None or not isinstance(qn, nn.Identity)
            or not isinstance(kn, nn.Identity)}


def rope_for_block(model: nn.Module, rope: torch.Tensor | None, l: int) -> torch.Tensor | None:
    if rope is not None and getattr(model, "rope_mixed", False):
        return rope[l]  # (H, M, 2d): per-depth, per-head
    return rope


def eva_attention(attn: nn.Module, x: torch.Tensor, mult: torch.Tensor | None = None,
                  rope: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """An Eva attention's forward with q, k and v of each head-dim multiplied by ``mult`` (H, d).

    The multiplication is folded into the projection's weight and bias (as for the plain ViT); rope is
    linear and acts per head, so with whole-head scores it commutes with the mask. ``key_bias`` (N,):
    0 for kept keys, -inf for dropped ones (the binary-mask reference); ``bias``: BEiT's relative position
    bias (1, H, N, N).
    """
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    B, N, _ = x.shape
    H, d = attn.num_heads, head_dim(attn)
    w, parts = qkv_parts(attn)
    b = _full_bias(parts, H * d, w)
    if mult is not None:
        m = mult.reshape(-1).repeat(3)  # (3 * H * d,)
        w = w * m[:, None]
        b = None if b is None else b * m
    qkv = torch.nn.functional.linear(x, w, b)
    q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
    # a per-head q/k norm undoes the scores of q and k; a whole head still goes with its v (head_only)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    if key_bias is not None:
        bias = key_bias.view(1, 1, 1, N) if bias is None else bias + key_bias.view(1, 1, 1, N)
    if attn.fused_attn:
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale)
    else:
        s = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            s = s + bias
        o = attn.attn_drop(s.softmax(dim=-1)) @ v
    o = o.transpose(1, 2).reshape(B, N, H * d)
    return attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(o)))


def _masked_eva_forward(self, x, rope=None, attn_mask=None, is_causal=False, shared_rel_pos_bias=None):
    if attn_mask is not None or is_causal:
        from .errors import VitSlimError
        raise VitSlimError("masked EVA attention does not take an attention mask")
    return eva_attention(self, x, self._vitslim_score.per_dim(), rope, bias=rel_bias(self, shared_rel_pos_bias))


def _masked_relpos_forward(self, x, shared_rel_pos=None):
    return eva_attention(self, x, self._vitslim_score.per_dim(), bias=rel_bias(self, shared_rel_pos))


@functools.lru_cache(maxsize=None)
def masked_attention_class(base: type) -> type:
    """A subclass of an Eva attention class whose q/k/v are multiplied by the attention scores."""
    fwd = _masked_relpos_forward if base.__name__ == "RelPosAttention" else _masked_eva_forward
    return type(f"Masked{base.__name__}", (base,), {"forward": fwd})


class EvaHardMasked(nn.Module):
    """The dense Eva with BINARY masks (the reference of DESIGN invariant 3), like slim.HardMaskedViT."""

    def __init__(self, model: nn.Module, plan, attn_mult: torch.Tensor, mlp_mult: torch.Tensor,
                 key_bias: torch.Tensor, final_keep: torch.Tensor) -> None:
        super().__init__()
        self.model, self.plan = model, plan
        self.register_buffer("attn_mult", attn_mult, persistent=False)  # (L, H, d)
        self.register_buffer("mlp_mult", mlp_mult, persistent=False)    # (L, h)
        self.register_buffer("key_bias", key_bias, persistent=False)    # (L, N)
        self.register_buffer("final_keep", final_keep, persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        shared = None
        if is_relpos(m):
            return self._relpos_features(x)
        if is_beit(m):
            x = m.patch_embed(x)
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = m.pos_drop(x if m.pos_embed is None else x + m.pos_embed)
            rope = None
            shared = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        else:
            x, rope = m._pos_embed(m.patch_embed(x))
            x = m.norm_pre(x)
        for l, blk in enumerate(m.blocks):
            if is_post_norm(blk):  # EvaBlockPostNorm: x + norm(branch(x))
                a = eva_attention(blk.attn, x, self.attn_mult[l], rope_for_block(m, rope, l), self.key_bias[l])
                x = x + blk.drop_path1(blk.norm1(a))
                x = x + blk.drop_path2(blk.norm2(blk.mlp.fc2(mlp_hidden(blk.mlp, x) * self.mlp_mult[l])))
                continue
            a = eva_attention(blk.attn, blk.norm1(x), self.attn_mult[l], rope_for_block(m, rope, l), self.key_bias[l],
                              rel_bias(blk.attn, shared))
            x = x + blk.drop_path1(a if blk.gamma_1 is None else blk.gamma_1 * a)
            h = blk.mlp.fc2(mlp_hidden(blk.mlp, blk.norm2(x)) * self.mlp_mult[l])
            x = x + blk.drop_path2(h if blk.gamma_2 is None else blk.gamma_2 * h)
        return m.norm(x.index_select(1, self.final_keep))

    def _relpos_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        if m.cls_token is not None:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        shared = m.shared_rel_pos.get_bias() if m.shared_rel_pos is not None else None
        for l, blk in enumerate(m.blocks):
            post = is_post_norm(blk)
            inp = x if post else blk.norm1(x)
            a = eva_attention(blk.attn, inp, self.attn_mult[l], None, self.key_bias[l], rel_bias(blk.attn, shared))
            x = x + blk.drop_path1(blk.norm1(a) if post else blk.ls1(a))
            h = blk.mlp.fc2(mlp_hidden(blk.mlp, x if post else blk.norm2(x)) * self.mlp_mult[l])
            x = x + blk.drop_path2(blk.norm2(h) if post else blk.ls2(h))
        return m.norm(x.index_select(1, self.final_keep))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.forward_features(x))


class EvaSlimAttention(nn.Module):
    """Eva attention over kept heads (ragged dims only without rope), the original scale, gathered rope.

    ``qkv`` rows are (q | k | v), each laid out group by group as (heads, dims); ``heads`` holds the
    original ids of the kept heads in that order (per-head rope is gathered with it) and ``patches`` the
    original ids of the patches this layer keeps (their rope rows are gathered).
    """

    def __init__(self, qkv: nn.Linear, biases: list[torch.Tensor | None], proj: nn.Linear,
                 groups: list[tuple[int, int]], heads: torch.Tensor, patches: torch.Tensor, src: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj = qkv, proj
        A = qkv.out_features // 3
        self.attn_dim = A
        self.q_bias, self.k_bias, self.v_bias = (None if b is None else nn.Parameter(b) for b in biases)
        self.groups = tuple((int(n), int(k)) for n, k in groups)
        self.register_buffer("heads", heads, persistent=False)
        self.register_buffer("patches", patches, persistent=False)
        self.scale = float(src.scale)
        self.fused_attn = bool(src.fused_attn)
        self.num_prefix_tokens = int(getattr(src, "num_prefix_tokens", 0))  # rope skips them (EVA)
        self.rotate_half = bool(getattr(src, "rotate_half", False))
        self.attn_drop, self.proj_drop = src.attn_drop, src.proj_drop
        self.q_norm = getattr(src, "q_norm", nn.Identity())  # over the d dims of one (whole) head
        self.k_norm = getattr(src, "k_norm", nn.Identity())
        self.norm = nn.Identity()  # scale_attn_inner: a sub-LN over the kept dims (set by slim_eva_attention)
        self.rel_pos = getattr(src, "rel_pos", None)  # RelPosAttention: RelPosBias / RelPosMlp, kept whole
        table = getattr(src, "relative_position_bias_table", None)  # BEiT: kept whole, gathered per forward
        self.relative_position_bias_table = table
        self.register_buffer("relative_position_index", None if table is None else src.relative_position_index,
                             persistent=False)
        self.register_buffer("tokens", None, persistent=False)  # original ids of the kept tokens (BEiT)

    def _rel_bias(self, shared: torch.Tensor | None) -> torch.Tensor | None:
        """The relative position bias of the kept heads and tokens, (H', N', N')."""
        bias = None
        if self.rel_pos is not None:
            bias = self.rel_pos.get_bias()[0]  # (H, N0, N0)
        elif self.relative_position_bias_table is not None:
            n0 = self.relative_position_index.shape[0]
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n0, n0, -1)
            bias = bias.permute(2, 0, 1)  # (H, N0, N0)
        if shared is not None:
            shared = shared.reshape(shared.shape[-3:])
            bias = shared if bias is None else bias + shared
        if bias is None:
            return None
        bias = bias.index_select(0, self.heads)
        return bias.index_select(1, self.tokens).index_select(2, self.tokens)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat
        from .slim import linear
        B, N, _ = x.shape
        rel = self._rel_bias(shared_rel_pos_bias)
        A = self.attn_dim
        qkv = linear(x, self.qkv)  # (B, N, 3A)
        b = _full_bias([self.q_bias, self.k_bias, self.v_bias], A, self.qkv.weight)
        if b is not None:
            qkv = qkv + b
        if rope is not None:
            rope = rope.index_select(-2, self.patches)  # rope of the kept patches
            if rope.dim() == 3:  # per-head rope (H, M, 2d)
                rope = rope.index_select(0, self.heads)
        parts, start, h0 = [], 0, 0
        npt = self.num_prefix_tokens
        for heads, dims in self.groups:
            w = heads * dims
            q, k, v = (qkv[..., i * A + start:i * A + start + w].reshape(B, N, heads, dims).transpose(1, 2)
                       for i in range(3))  # (B, heads, N, dims)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                r = rope[h0:h0 + heads] if rope.dim() == 3 else rope
                q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], r, half=self.rotate_half)], 2).type_as(v)
                k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], r, half=self.rotate_half)], 2).type_as(v)
            b = None if rel is None else rel[h0:h0 + heads].unsqueeze(0)  # (1, heads, N, N)
            if self.fused_attn:
                o = torch.nn.functional.scaled_dot_product_attention(
                    q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=b,
                    dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
            else:
                s = (q * self.scale) @ k.transpose(-2, -1)
                o = self.attn_drop((s if b is None else s + b).softmax(dim=-1)) @ v
            parts.append(o.transpose(1, 2).reshape(B, N, w))
            start += w
            h0 += heads
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return self.proj_drop(self.proj(self.norm(out)))


class EvaSlimBlock(nn.Module):
    """An EvaBlock that first keeps some tokens, then runs its (possibly absent) branches.

    Called by timm's ``Eva.forward_features`` as ``blk(x, rope=..., attn_mask=..., is_causal=...)``.
    """

    def __init__(self, keep: torch.Tensor | None, n_in: int, norm1: nn.Module, attn: nn.Module | None,
                 ls1: nn.Module, drop_path1: nn.Module, norm2: nn.Module, mlp: nn.Module | None, ls2: nn.Module,
                 drop_path2: nn.Module) -> None:
        super().__init__()
        self.register_buffer("keep", keep, persistent=False)
        self.n_in = int(n_in)
        self.norm1, self.attn, self.ls1, self.drop_path1 = norm1, attn, ls1, drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = norm2, mlp, ls2, drop_path2

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        from .errors import VitSlimError
        if attn_mask is not None or is_causal:
            raise VitSlimError("a slim EVA model does not take an attention mask")
        if x.shape[1] != self.n_in:
            raise VitSlimError(f"the slim model was made for {self.n_in} tokens at this block, the input has "
                               f"{x.shape[1]} (is the image size different from the plan's?)")
        if self.keep is not None:
            x = x.index_select(1, self.keep)
        if self.attn is not None:
            a = self.attn(self.norm1(x), rope, shared_rel_pos_bias) if isinstance(self.attn, EvaSlimAttention) \
                else self.attn(x)
            x = x + self.drop_path1(self.ls1(a))
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class RelPosSlimBlock(EvaSlimBlock):
    """An EvaSlimBlock called as timm's VisionTransformerRelPos calls its blocks: ``blk(x, shared_rel_pos=...)``.

    A post-norm block (ResPostRelPosBlock) is built with norm1/norm2 in the layer-scale places and
    identity pre-norms: ``x + drop_path(norm(branch(x)))``.
    """

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, shared_rel_pos_bias=shared_rel_pos)


def _gamma(blk: nn.Module, name: str) -> nn.Module:
    from timm.layers import LayerScale
    g = getattr(blk, name)
    if g is None:
        return nn.Identity()
    ls = LayerScale(g.numel(), device=g.device, dtype=g.dtype)
    with torch.no_grad():
        ls.gamma.copy_(g)
    return ls


def slim_eva_block(model: nn.Module, blk: nn.Module, plan, layer: int, attn_fold: torch.Tensor | None,
                   mlp_fold: torch.Tensor | None) -> EvaSlimBlock:
    """Slim one EvaBlock with layer ``layer`` of ``plan`` (scores optionally folded in)."""
    from .slim import _branch_bias, _head_groups, slice_linear, slim_mlp, token_gather
    spec = plan.spec
    P = spec.num_prefix_tokens
    prev = plan.token[layer - 1] if layer > 0 else np.ones(spec.num_patches, bool)
    gather = token_gather(prev, plan.token[layer], P)
    dev = blk.norm1.weight.device if getattr(blk.norm1, "weight", None) is not None else next(blk.parameters()).device
    keep = torch.as_tensor(gather, device=dev) if gather is not None else None
    n_in = P + int(prev.sum())
    ident = nn.Identity
    relpos = spec.family == "relpos"
    post = is_post_norm(blk)  # ResPostRelPosBlock, EvaBlockPostNorm
    if post:  # x + norm(branch(x)): the norm sits where a layer scale would
        ls1, ls2, pre1, pre2 = blk.norm1, blk.norm2, ident(), ident()
    elif relpos:
        ls1, ls2, pre1, pre2 = blk.ls1, blk.ls2, blk.norm1, blk.norm2
    else:
        ls1, ls2, pre1, pre2 = _gamma(blk, "gamma_1"), _gamma(blk, "gamma_2"), blk.norm1, blk.norm2
    a_keep = plan.attn[layer]
    if a_keep.any():
        attn = slim_eva_attention(blk.attn, a_keep, attn_fold, np.flatnonzero(plan.token[layer]), spec.head_only)
        attn.tokens = torch.as_tensor(np.concatenate([np.arange(P), P + np.flatnonzero(plan.token[layer])]),
                                      device=dev)
        norm1, dp1 = pre1, blk.drop_path1
    else:
        attn = _branch_bias(blk.attn.proj, ls1)
        norm1, ls1, dp1 = ident(), ident(), ident()
    if plan.mlp[layer].any():
        mlp = slim_mlp(blk.mlp, plan.mlp[layer], mlp_fold)
        norm2, dp2 = pre2, blk.drop_path2
    else:
        mlp = _branch_bias(blk.mlp.fc2, ls2)
        norm2, ls2, dp2 = ident(), ident(), ident()
    return (RelPosSlimBlock if relpos else EvaSlimBlock)(keep, n_in, norm1, attn, ls1, dp1, norm2, mlp, ls2, dp2)


def slim_eva_attention(attn: nn.Module, keep: np.ndarray, fold: torch.Tensor | None, patches: np.ndarray,
                       head_only: bool) -> EvaSlimAttention:
    from .errors import PlanMismatchError
    from .slim import _head_groups
    H, d = keep.shape  # noqa: F841
    if head_only and not np.all(keep.all(1) | ~keep.any(1)):
        raise PlanMismatchError("this model has rotary embeddings or a q/k norm: a plan must keep whole heads "
                                "(make it from scores searched with attn='head')")
    w, parts = qkv_parts(attn)
    dev = w.device
    groups, cols, heads = [], [], []
    for dims, ids in _head_groups(keep):
        groups.append((len(ids), dims))
        heads.extend(ids.tolist())
        cols.extend((h * d + np.flatnonzero(keep[h])).tolist() for h in ids)
    cols_t = torch.as_tensor(np.concatenate([np.asarray(c) for c in cols]), device=dev)  # (A',) into H*d
    A = H * d
    rows = torch.cat([cols_t + i * A for i in range(3)])
    scale = None if fold is None else fold.detach().reshape(-1).to(dev).index_select(0, cols_t)
    with torch.no_grad():
        wq = w.detach().index_select(0, rows)
        if scale is not None:
            wq = wq * scale.repeat(3)[:, None]
        qkv = nn.Linear(w.shape[1], rows.numel(), bias=False, device=dev, dtype=w.dtype)
        qkv.weight.copy_(wq)
        biases = []
        for p in parts:
            if p is None:
                biases.append(None)
                continue
            b = p.detach().index_select(0, cols_t)
            biases.append((b * scale if scale is not None else b).clone())
    from .slim import slice_linear
    proj = slice_linear(attn.proj, cols=cols_t)
    out = EvaSlimAttention(qkv, biases, proj, groups, torch.as_tensor(heads, device=dev),
                           torch.as_tensor(patches, device=dev), attn)
    out.norm = slice_norm(getattr(attn, "norm", nn.Identity()), cols_t)
    return out
