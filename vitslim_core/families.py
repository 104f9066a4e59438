"""Parts of timm ViT families beyond the plain GELU-MLP VisionTransformer: what to mask, cost and slim.

Supported here (inside timm's ``VisionTransformer``):

* gated MLPs, ``GluMlp`` (packed gate and value rows in one ``fc1``, e.g. ``SwiGLUPacked`` of DINOv2-g)
  and ``SwiGLU`` (separate ``fc1_g`` / ``fc1_x``): one score per hidden unit, shared by its gate row and
  its value row. The score acts where it does for a plain MLP, on the input columns of ``fc2``, so masks,
  plans and the binary-mask reference need nothing new; the slim MLP keeps the gate and value rows of the
  kept units. Exact.
* the attention-pool head (``global_pool='map'``, SigLIP): kept dense. It reads every token that reaches
  the end (prefix + last layer's kept patches), so its key/value projection costs MACs per token.
  Exact.

Everything else that timm builds (EVA/rope, BEiT and relative-position ViTs, SAM, NaFlex, qk-norm,
sub-LN MLPs...) is refused by ``spec.check_supported`` with the part it cannot handle.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

# timm ViT classes outside VisionTransformer and the part of each that has no masks/slimming yet
UNSUPPORTED_CLASSES = {
    "Eva": "EVA-style blocks (EvaAttention/AttentionRope with rotary position embeddings, separate q/v biases, "
           "sub-LN SwiGLU MLPs, gamma layer scale)",
    "Beit": "BEiT relative position bias (per-block bias table) with separate q/v biases",
    "VisionTransformerRelPos": "relative position bias/MLP attention (RelPosAttention)",
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


def mlp_problem(mlp: nn.Module) -> str | None:
    """Why this MLP cannot be slimmed (None: fine)."""
    from timm.layers import GluMlp, SwiGLU
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return "has a hidden norm (a sub-LN over the MLP units, scale_mlp_norm) that is not supported"
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

    def __init__(self, fc1_g: nn.Linear, fc1_x: nn.Linear, act: nn.Module, fc2: nn.Linear,
                 drop1: nn.Module | None = None, drop2: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1_g, self.fc1_x, self.act, self.fc2 = fc1_g, fc1_x, act, fc2
        self.drop1 = drop1 if drop1 is not None else nn.Identity()
        self.drop2 = drop2 if drop2 is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .slim import linear
        h = self.act(linear(x, self.fc1_g)) * linear(x, self.fc1_x)  # (B, N, h')
        return self.drop2(self.fc2(self.drop1(h)))


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
    else:
        gate, value = slice_linear(mlp.fc1_g, rows=idx), slice_linear(mlp.fc1_x, rows=idx)
    return SlimGluMlp(gate, value, mlp.act, fc2, mlp.drop1, mlp.drop2)


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
