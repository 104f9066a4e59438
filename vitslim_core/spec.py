"""ArchSpec: the numbers of a timm ViT that the cost model, plans and the app need (no weights)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from . import families
from .errors import PlanMismatchError, UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Shape of a supported timm VisionTransformer.

    Args:
        depth: number of transformer blocks L.
        embed_dim: residual width C.
        num_heads: heads per block H.
        head_dim: dims per head d (H * d may differ from C).
        mlp_hidden: MLP hidden width h.
        num_prefix_tokens: P, class + distillation + register tokens (never masked).
        grid: patch grid (rows, cols); M = rows * cols patch tokens.
        patch_size: (ph, pw) of the patch embedding convolution.
        in_chans: image channels.
        num_classes: classifier outputs (0 means no head).
        num_out_heads: 1, or 2 for distilled DeiT (head + head_dist).
        global_pool: 'token' or 'avg' (or '' for none).
        qkv_bias, proj_bias, fc1_bias, fc2_bias: which linears carry a bias.
        norm1_params, norm2_params: parameters of one norm1 / norm2 layer.
        ls_params: parameters of one LayerScale (0 when absent).
        dense_params: parameter count of the whole dense model.
        mlp_glu: the MLP is gated (GluMlp / SwiGLU): fc1 has a gate and a value row per hidden unit.
        pool_token_macs, pool_fixed_macs: MACs of an attention-pool head (``global_pool='map'``) per token
            that reaches it and in total otherwise (0 without one).
        pool_prefix: the attention-pool head reads the prefix tokens too (timm's ``pool_include_prefix``).
        family: "" for timm VisionTransformer, "eva" / "beit" / "relpos" for timm Eva / Beit /
            VisionTransformerRelPos (blocks slimmed by families.py).
        attn_extra_params: parameters of one block's relative position bias table or RelPosMlp (0 when absent).
        attn_extra_macs: MACs of one block's relative position MLP (RelPosMlp; counted where attention is kept).
        fixed_extra_macs: MACs of a relative position MLP shared by all blocks (vit_srelpos).
        qkv_bias_parts: how many of q, k, v carry a bias when ``qkv_bias`` (EVA: q and v, so 2).
        head_only: attention units must be whole heads (rotary embeddings rotate pairs of head dims, a q/k
            norm normalises each head).
        qk_norm_params: parameters of one block's q and k norms (0 when absent).
        mlp_norm_params, attn_norm_params: parameters per unit of a sub-LN over the MLP hidden units / over
            all attention dims (EVA02's scale_mlp / scale_attn_inner); slimming through one is not exact.
        mlp_ls: the MLP branch has the layer scale too (False: EVA's attn_only_layer_scale).
        model_name / model_kwargs: how to rebuild it with ``vitslim_core.models``.
    """

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    num_classes: int
    num_out_heads: int
    global_pool: str
    qkv_bias: bool
    proj_bias: bool
    fc1_bias: bool
    fc2_bias: bool
    norm1_params: int
    norm2_params: int
    ls_params: int
    dense_params: int
    mlp_glu: bool = False
    pool_token_macs: int = 0
    pool_fixed_macs: int = 0
    pool_prefix: bool = True
    family: str = ""
    qkv_bias_parts: int = 3
    head_only: bool = False
    qk_norm_params: int = 0
    mlp_ls: bool = True
    mlp_norm_params: int = 0
    attn_norm_params: int = 0
    attn_extra_params: int = 0
    attn_extra_macs: int = 0
    fixed_extra_macs: int = 0
    model_name: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Whether a slim model equals the binary-masked one (no sub-LN over pruned units)."""
        return self.mlp_norm_params == 0 and self.attn_norm_params == 0

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def img_size(self) -> tuple[int, int]:
        return (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], error: type[Exception] = PlanMismatchError) -> "ArchSpec":
        """Parse and type-check a description (``error`` is raised for anything malformed)."""
        if not isinstance(d, dict):
            raise error("architecture description is not a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in names if n not in d and n not in _OPTIONAL]
        if missing:
            raise error(f"architecture description lacks {', '.join(sorted(missing))}")
        kw: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                if f.name not in d:
                    continue
                v = d[f.name]
                if f.name in ("grid", "patch_size"):
                    v = tuple(_strict_int(x) for x in v)
                    if len(v) != 2 or min(v) < 1:
                        raise ValueError(f"{f.name} must be two positive integers")
                elif f.name in ("qkv_bias", "proj_bias", "fc1_bias", "fc2_bias", "mlp_glu", "pool_prefix", "head_only", "mlp_ls"):
                    if not isinstance(v, bool):
                        raise ValueError(f"{f.name} must be true or false")
                elif f.name == "family":
                    if v not in ("", "eva", "beit", "relpos"):
                        raise ValueError(f"unknown model family {str(v)[:20]!r}")
                elif f.name == "global_pool" or f.name == "model_name":
                    v = str(v)
                elif f.name == "model_kwargs":
                    if not isinstance(v, dict):
                        raise ValueError("model_kwargs must be a mapping")
                    v = dict(v)
                else:
                    v = _strict_int(v)
                    if v < 0 or (v == 0 and f.name in ("depth", "embed_dim", "num_heads", "head_dim", "mlp_hidden",
                                                       "in_chans", "num_out_heads", "dense_params")):
                        raise ValueError(f"{f.name} must be positive")
                if f.name in _LIMITS and max(v if isinstance(v, tuple) else (v,)) > _LIMITS[f.name]:
                    raise ValueError(f"{f.name} is larger than {_LIMITS[f.name]}")
                kw[f.name] = v
            units = {"attention dims": kw["depth"] * kw["num_heads"] * kw["head_dim"],
                     "MLP units": kw["depth"] * kw["mlp_hidden"],
                     "tokens": kw["depth"] * kw["grid"][0] * kw["grid"][1]}
            for what, n in units.items():
                if n > MAX_UNITS:
                    raise ValueError(f"{n} {what} in all layers is more than {MAX_UNITS}")
        except (TypeError, ValueError) as e:
            raise error(f"architecture description is damaged ({e})") from None
        return cls(**kw)

    def shape_key(self) -> tuple:
        """What must match between a plan/score file and a model (names and weights may differ)."""
        return (self.depth, self.embed_dim, self.num_heads, self.head_dim, self.mlp_hidden,
                self.num_prefix_tokens, tuple(self.grid))

    def check_same_shape(self, other: "ArchSpec", what: str = "plan") -> None:
        if self.shape_key() != other.shape_key():
            raise PlanMismatchError(
                f"{what} was made for another architecture ({_describe(other)}) "
                f"but the model is {_describe(self)}")


# Fields added after format version 1 was fixed: files without them describe plain models (defaults).
_OPTIONAL = ("model_name", "model_kwargs", "mlp_glu", "pool_token_macs", "pool_fixed_macs", "pool_prefix",
             "family", "qkv_bias_parts", "head_only", "qk_norm_params", "mlp_ls", "mlp_norm_params",
             "attn_norm_params", "attn_extra_params", "attn_extra_macs", "fixed_extra_macs")

# Upper bounds of a description read from a file (ViT-g/14 at 518 px is far inside them): a damaged or
# hostile header must not make plans allocate or compute for absurd sizes.
_LIMITS = {"depth": 1024, "embed_dim": 1 << 16, "num_heads": 1024, "head_dim": 4096, "mlp_hidden": 1 << 18,
           "num_prefix_tokens": 1024, "grid": 1024, "patch_size": 1024, "in_chans": 64, "num_classes": 1 << 20,
           "num_out_heads": 2, "norm1_params": 1 << 40, "norm2_params": 1 << 40, "ls_params": 1 << 40,
           "dense_params": 1 << 40, "pool_token_macs": 1 << 40, "pool_fixed_macs": 1 << 50, "qkv_bias_parts": 3, "qk_norm_params": 1 << 30, "mlp_norm_params": 2,
           "attn_norm_params": 2, "attn_extra_params": 1 << 30, "attn_extra_macs": 1 << 40, "fixed_extra_macs": 1 << 40}
MAX_UNITS = 1 << 24  # per dimension, over all layers


# The model arguments a recipe (in a score file, a slim.json, a run's weights) may carry: the ones that
# fix the architecture of a supported model, each with the kind of value it takes. Anything else in a
# file (checkpoint_path, pretrained_cfg, device, cache_dir...) could make timm read files, download or
# allocate on a device, so it is refused before timm sees it.
RECIPE_KWARGS: dict[str, str] = {
    "img_size": "size", "patch_size": "size", "in_chans": "count", "num_classes": "count",
    "global_pool": "name", "embed_dim": "count", "depth": "count", "num_heads": "count",
    "mlp_ratio": "number", "qkv_bias": "flag", "qk_norm": "flag", "proj_bias": "flag",
    "init_values": "number?", "class_token": "flag", "no_embed_class": "flag", "reg_tokens": "count",
    "pre_norm": "flag", "final_norm": "flag", "fc_norm": "flag?", "dynamic_img_size": "flag",
    "dynamic_img_pad": "flag", "pos_embed": "name", "drop_rate": "number", "pos_drop_rate": "number",
    "patch_drop_rate": "number", "proj_drop_rate": "number", "attn_drop_rate": "number",
    "drop_path_rate": "number",
    "rel_pos_type": "name", "rel_pos_dim": "count", "shared_rel_pos": "flag",  # VisionTransformerRelPos
}
_MAX_RECIPE_INT = 1 << 20
_MAX_RECIPE_SIZE = 16384


def recipe_kwargs_problem(kwargs: Any) -> str | None:
    """Why model kwargs from a file are not a plain architecture description (None: fine).

    Only the keys of ``RECIPE_KWARGS`` with values of their kind (bounded integers, finite numbers,
    booleans, short names) pass.
    """
    if not isinstance(kwargs, dict):
        return "model kwargs must be a mapping"
    for key, value in kwargs.items():
        kind = RECIPE_KWARGS.get(key) if isinstance(key, str) else None
        if kind is None:
            return f"model kwargs may not contain {str(key)[:40]!r} (only architecture settings are read from files)"
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if not _kind_ok(kind, value):
            return f"model kwargs have an unusable {key}={_short(value)}"
    return None


def _kind_ok(kind: str, v: Any) -> bool:
    def integer(x: Any, lo: int, hi: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi
    if kind == "count":
        return integer(v, 0, _MAX_RECIPE_INT)
    if kind == "size":
        if isinstance(v, (list, tuple)):
            return len(v) == 2 and all(integer(x, 1, _MAX_RECIPE_SIZE) for x in v)
        return integer(v, 1, _MAX_RECIPE_SIZE)
    if kind == "number":
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and 0 <= v <= _MAX_RECIPE_INT)
    if kind == "flag":
        return isinstance(v, bool)
    if kind == "name":
        return isinstance(v, str) and len(v) <= 32 and v.replace("_", "").isalnum() or v == ""
    return False


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def recipe_problem(spec: ArchSpec, kwargs: Any) -> str | None:
    """Why model kwargs read from a file contradict the architecture they were saved with (None: fine).

    Checked before anything is built: a damaged or hostile recipe (depth 10**6, mlp_ratio 1e9, a
    checkpoint_path...) would otherwise reach timm or allocate a huge model before the shape check
    could refuse it. ``models.rebuild_model(recipe, expect=spec)`` then builds it on the meta device
    and compares the result with ``spec`` before allocating anything.
    """
    problem = recipe_kwargs_problem(kwargs)
    if problem:
        return problem

    def pair(v: Any) -> tuple | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return (v, v)
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in v):
            return tuple(v)
        return None

    want = {"depth": spec.depth, "embed_dim": spec.embed_dim, "num_heads": spec.num_heads,
            "num_classes": spec.num_classes, "in_chans": spec.in_chans}
    for key, value in want.items():
        if key in kwargs and (isinstance(kwargs[key], bool) or kwargs[key] != value):
            return f"model kwargs say {key}={kwargs[key]!r} but the architecture has {value}"
    for key, value in (("img_size", spec.img_size), ("patch_size", spec.patch_size)):
        if key not in kwargs or kwargs[key] is None:
            continue
        got = pair(kwargs[key])
        if got is not None and key == "img_size" and all(p > 0 for p in spec.patch_size):
            # timm floors the patch grid: img_size 100 with 16-px patches is a 96-px (6x6) model
            got = tuple(g // p * p for g, p in zip(got, spec.patch_size))
        if got != tuple(value):
            return f"model kwargs say {key}={kwargs[key]!r} but the architecture has {list(value)}"
    ratio = kwargs.get("mlp_ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or spec.mlp_hidden not in _hidden_widths(spec, ratio):
            return f"model kwargs say mlp_ratio={ratio!r} but the MLP width is {spec.mlp_hidden}"
    reg = kwargs.get("reg_tokens")
    if reg is not None and (isinstance(reg, bool) or not isinstance(reg, int) or not 0 <= reg <= spec.num_prefix_tokens):
        return f"model kwargs say reg_tokens={reg!r} but the model has {spec.num_prefix_tokens} prefix tokens"
    return None


def _hidden_widths(spec: ArchSpec, ratio: float) -> tuple[int, ...]:
    """MLP widths an mlp_ratio can give: C * ratio, or half of it for a packed GluMlp (gate + value rows)."""
    h = int(spec.embed_dim * ratio)
    return (h, h // 2) if spec.mlp_glu else (h,)


def _strict_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _describe(s: ArchSpec) -> str:
    return (f"depth {s.depth}, {s.num_heads} heads x {s.head_dim} dims, MLP {s.mlp_hidden}, "
            f"{s.num_prefix_tokens}+{s.grid[0]}x{s.grid[1]} tokens")


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _base_type(module: nn.Module) -> type:
    """The class a layer had before ``add_masks`` swapped in its masked subclass."""
    return module.__dict__.get("_vitslim_orig_class", type(module))


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError naming the first part ViT-Slim cannot handle."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if families.is_eva(model) or families.is_beit(model):  # timm Eva (EVA02, rope ViTs, DINOv3, PE), Beit
        problem = families.eva_problem(model) if families.is_eva(model) else families.beit_problem(model)
        if problem:
            raise UnsupportedModelError(f"{type(model).__name__} {problem}")
        return
    if families.is_relpos(model):  # timm VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*)
        problem = families.relpos_problem(model)
        if problem:
            raise UnsupportedModelError(f"{type(model).__name__} {problem}")
        return
    if not isinstance(model, VisionTransformer):
        part = families.UNSUPPORTED_CLASSES.get(type(model).__name__)
        if part:
            raise UnsupportedModelError(f"{type(model).__name__}: {part} is not supported yet")
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer "
            "(ViT-Slim supports ViT/DeiT-style models: plain blocks, standard attention, plain or gated MLP)")
    pool = getattr(model, "attn_pool", None)
    if pool is not None:  # kept dense (families.py)
        problem = families.attn_pool_problem(pool)
        if problem:
            raise UnsupportedModelError(problem)
    # dynamic_img_size=True: masked and slimmed for the default grid (token masks and the slim model refuse
    # another number of tokens with a one-line error)
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise UnsupportedModelError("patch dropout is not supported (set patch_drop_rate=0)")
    pe = model.patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d):
        raise UnsupportedModelError(f"patch embedding {type(pe).__name__} without a Conv2d projection")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block and not families.is_post_norm(blk):  # ResPostBlock: x + norm(branch(x))
            raise UnsupportedModelError(f"block {i} is {type(blk).__name__}; only timm's pre-norm Block and the "
                                        "post-norm ResPostBlock are supported")
        problem = families.post_norm_problem(i, blk)
        if problem:
            raise UnsupportedModelError(problem)
        a = blk.attn
        if type(a) is not Attention:
            raise UnsupportedModelError(
                f"block {i} attention is {type(a).__name__} (rope/other attention variants are not supported)")
        for part in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(a, part, nn.Identity()), nn.Identity):
                raise UnsupportedModelError(f"block {i} attention uses {part} (qk/scale norm is not supported)")
        if getattr(a, "gate", None) is not None:
            raise UnsupportedModelError(f"block {i} attention is gated (not supported)")
        if _base_type(a.qkv) is not nn.Linear or _base_type(a.proj) is not nn.Linear:
            raise UnsupportedModelError(f"block {i} attention projections are not plain nn.Linear layers")
        m = blk.mlp
        if type(m) not in families.mlp_classes():  # Mlp, GluMlp, SwiGLU (families.py)
            raise UnsupportedModelError(
                f"block {i} MLP is {type(m).__name__} (supported: timm Mlp, GluMlp, SwiGLU)")
        problem = families.mlp_problem(m)
        if problem:
            raise UnsupportedModelError(f"block {i} MLP {type(m).__name__} {problem}")


def arch_spec(model: nn.Module, model_name: str = "", model_kwargs: dict | None = None) -> ArchSpec:
    """Describe a supported timm ViT (raises UnsupportedModelError otherwise)."""
    check_supported(model)
    blk0 = model.blocks[0]
    a, m = blk0.attn, blk0.mlp
    shapes = {(b.attn.num_heads, families.head_dim(b.attn), b.mlp.fc2.in_features, type(b.mlp)) for b in model.blocks}
    if len(shapes) != 1:
        raise UnsupportedModelError("blocks of different widths are not supported")
    pe = model.patch_embed
    has_dist = getattr(model, "head_dist", None) is not None
    num_classes = int(getattr(model, "num_classes", 0))
    masks_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("slim_masks."))
    ls = getattr(blk0, "ls1", None)
    pool_macs = families.attn_pool_macs(getattr(model, "attn_pool", None))
    eva = families.eva_spec_fields(model) if families.family_of(model) else {}
    return dataclasses.replace(ArchSpec(
        depth=len(model.blocks),
        embed_dim=int(model.embed_dim),
        num_heads=int(a.num_heads),
        head_dim=families.head_dim(a),
        mlp_hidden=int(m.fc2.in_features),
        num_prefix_tokens=int(model.num_prefix_tokens),
        grid=tuple(int(g) for g in pe.grid_size),
        patch_size=tuple(int(p) for p in pe.proj.kernel_size),
        in_chans=int(pe.proj.in_channels),
        num_classes=num_classes,
        num_out_heads=2 if has_dist else 1,
        global_pool=str(model.global_pool),
        qkv_bias=a.qkv is not None and a.qkv.bias is not None,
        proj_bias=a.proj.bias is not None,
        fc1_bias=families.fc1_has_bias(m),
        fc2_bias=m.fc2.bias is not None,
        norm1_params=_numel(blk0.norm1),
        norm2_params=_numel(blk0.norm2),
        ls_params=0 if ls is None or isinstance(ls, nn.Identity) else _numel(ls),
        dense_params=_numel(model) - masks_params,
        mlp_glu=families.is_glu(m),
        pool_token_macs=pool_macs[0],
        pool_fixed_macs=pool_macs[1],
        pool_prefix=bool(getattr(model, "pool_include_prefix", True)),
        model_name=model_name,
        model_kwargs=dict(model_kwargs or {}),
    ), **eva)
