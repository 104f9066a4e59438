"""Building models: timm names, hub weights, local checkpoints and the two small ViTs built here
(``digits-vit`` for the bundled digits demo, ``fashion-vit`` for the Fashion-MNIST run).

``build_model`` returns the model and a JSON-able recipe; ``rebuild_model(recipe)`` makes the same
architecture again (random init, no download), which is how saved runs record their model.
Checkpoints are read with safetensors or ``torch.load(weights_only=True)``, never unpickled freely.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn as nn

from .data import DIGITS_MEAN, DIGITS_STD
from .errors import VitSlimError
from .fashion import MEAN as FASHION_MEAN, STD as FASHION_STD

if TYPE_CHECKING:
    from .spec import ArchSpec

DEMO_MODEL = "digits-vit"
FASHION_MODEL = "fashion-vit"
LOCAL_MODELS = (DEMO_MODEL, FASHION_MODEL)  # built here from an architecture dict, not by timm

# The demo: a small ViT for scikit-learn's 8x8 digits upscaled to 16x16 (8x8 grid of 2x2 patches,
# so token masks have 64 positions to choose from, and 6 blocks for the FLOPs solver to balance).
DEMO_ARCH: dict[str, Any] = dict(
    img_size=16, patch_size=2, in_chans=1, num_classes=10,
    embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, qkv_bias=True,
)

# From-scratch recipe for the demo: 97.5-98.9% on the held-out digits split (4 seeds) in 15
# epochs, ~8 s of CPU per epoch. AdamW (no weight decay on biases, norms, pos_embed, cls_token),
# linear warmup then cosine to 0 (per step), gradient clipping, the random-affine digits
# augmentation. Batch 16 matters: the tiny ViT needs steps, not samples, to leave its first plateau.
DEMO_TRAIN: dict[str, Any] = dict(
    epochs=15, batch_size=16, lr=1e-3, weight_decay=0.05, warmup_epochs=2, schedule="cosine",
    label_smoothing=0.1, clip_grad=1.0, drop_path_rate=0.0, augment=True,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

_DEMO_CFG: dict[str, Any] = dict(
    architecture=DEMO_MODEL, input_size=(1, 16, 16), interpolation="bilinear", crop_pct=1.0,
    crop_mode="center", mean=DIGITS_MEAN, std=DIGITS_STD, num_classes=10,
    first_conv="patch_embed.proj", classifier="head",
)

# Fashion-MNIST at its native 28x28: a 7x7 grid of 4x4 patches (49 token positions), 4 heads of
# 16 dims and a 2x MLP in 6 blocks; sized so that a from-scratch run fits 15 minutes of 2 CPU cores.
FASHION_ARCH: dict[str, Any] = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10,
    embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, qkv_bias=True,
)

# From-scratch recipe for fashion-vit (see FASHION_ARCH): AdamW, 1 warmup epoch then cosine to 0 (per
# step), label smoothing, gradient clipping, no augmentation. Measured (seed 0, 10 epochs, val/test top-1):
# this recipe 89.2/89.3; horizontal flip 89.1/88.8; random crop (2 px padding) + flip at lr 1e-3
# 86.7/86.8 (no augmentation at lr 1e-3: 88.8/88.8). In ten epochs the model underfits (train 93%),
# so augmentation only slows it down. Batch 64 costs no more per epoch than 128 on 2 CPU cores.
FASHION_TRAIN: dict[str, Any] = dict(
    epochs=10, batch_size=64, lr=2e-3, weight_decay=0.05, warmup_epochs=1, schedule="cosine",
    label_smoothing=0.1, clip_grad=1.0, drop_path_rate=0.0, augment=False,
)

_FASHION_CFG: dict[str, Any] = dict(
    architecture=FASHION_MODEL, input_size=(1, 28, 28), interpolation="bilinear", crop_pct=1.0,
    crop_mode="center", mean=FASHION_MEAN, std=FASHION_STD, num_classes=10,
    first_conv="patch_embed.proj", classifier="head",
)


def local_arch(name: str) -> dict[str, Any]:
    """The architecture dict of a model built here (``digits-vit`` or ``fashion-vit``), as a copy."""
    if name == DEMO_MODEL:
        return dict(DEMO_ARCH)
    if name == FASHION_MODEL:
        return dict(FASHION_ARCH)
    raise VitSlimError(f"{name!r} is not one of the models built here ({', '.join(LOCAL_MODELS)})")


def local_recipe(name: str) -> dict[str, Any]:
    """The from-scratch training recipe of a model built here, as a copy."""
    local_arch(name)  # the name check
    return dict(DEMO_TRAIN if name == DEMO_MODEL else FASHION_TRAIN)


def _local_cfg(name: str) -> dict[str, Any]:
    local_arch(name)
    return dict(_DEMO_CFG if name == DEMO_MODEL else _FASHION_CFG)


# ----------------------------------------------------------------------------- public API


def build_model(name: str, *, pretrained: bool = False, checkpoint: str | Path | None = None,
                num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                in_chans: int | None = None, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Create a timm model (or the digits demo), optionally with weights.

    Args:
        name: a timm model name (``deit_small_patch16_224``, tags allowed), ``DEMO_MODEL``
            (``digits-vit``) or ``FASHION_MODEL`` (``fashion-vit``).
        pretrained: download timm's pretrained weights (hub); offline this fails with a hint.
        checkpoint: a local ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict to load instead
            (takes precedence over ``pretrained``).
            Unset ``num_classes``/``in_chans``/``img_size`` are taken from it; a different
            ``num_classes`` drops its classifier, a different ``img_size`` resamples its
            position embedding (timm's adaptation).
        num_classes: classifier outputs (default: the checkpoint's, else the model's).
        img_size: input side or (H, W).
        in_chans: input channels.
        **kwargs: further timm model arguments (``drop_path_rate``, ``global_pool``...), JSON-able.

    Returns:
        ``(model, recipe)``; ``rebuild_model(recipe)`` rebuilds the architecture.

    Raises:
        VitSlimError: unknown name, missing/corrupt checkpoint, weights that do not fit,
            unreachable hub.
    """
    if not isinstance(name, str) or not name.strip():
        raise VitSlimError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name not in LOCAL_MODELS:
        _check_timm_name(name)
    for key, value, low in (("num_classes", num_classes, 0), ("in_chans", in_chans, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise VitSlimError(f"{key} must be an integer >= {low}, got {value!r}")
    arch = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if value is not None:
            arch[key] = _jsonable_size(value) if key == "img_size" else value
    _check_jsonable(arch)

    if checkpoint is not None:
        path = _check_checkpoint_path(checkpoint)
        shapes = _checkpoint_shapes(path)
        arch = _fill_from_checkpoint(name, arch, shapes)
        model = _load_local(name, path, arch) if name in LOCAL_MODELS else _load_timm(name, path, arch, shapes)
    elif pretrained:
        if name in LOCAL_MODELS:
            raise VitSlimError(f"{name} has no downloadable weights; train it or pass --checkpoint FILE")
        model = _create_timm(name, arch, pretrained=True)
    else:
        model = _construct(name, arch)
    return model, make_recipe(name, model, arch)


def rebuild_model(recipe: dict[str, Any], expect: "ArchSpec | None" = None) -> nn.Module:
    """Rebuild the architecture a recipe describes, with random weights and no download.

    Args:
        recipe: ``{"name": str, "kwargs": dict}`` as returned by ``build_model``; only the architecture
            settings of ``spec.RECIPE_KWARGS`` may appear (a recipe usually comes from a file).
        expect: the architecture the recipe must give (e.g. a score file's). The model is first built on
            the meta device (no memory) and compared with it, so a recipe naming a far larger model is
            refused before anything is allocated.

    Raises:
        VitSlimError: a malformed recipe, one timm cannot build, or one that does not give ``expect``.
    """
    from .spec import arch_spec, recipe_kwargs_problem

    if not isinstance(recipe, dict) or not isinstance(recipe.get("name"), str) \
            or not isinstance(recipe.get("kwargs", {}), dict):
        raise VitSlimError('model recipe must look like {"name": "<model>", "kwargs": {...}}')
    unknown = sorted(set(recipe) - {"name", "kwargs"})
    if unknown:
        raise VitSlimError(f"model recipe has unknown fields: {', '.join(unknown)}")
    kwargs = dict(recipe.get("kwargs", {}))
    weights = sorted({"pretrained", "checkpoint"} & set(kwargs))
    if weights:
        raise VitSlimError(f"model recipe must not name weights ({', '.join(weights)}); it rebuilds random init")
    problem = recipe_kwargs_problem(kwargs)
    if problem:
        raise VitSlimError(f"model recipe for {recipe['name'][:60]!r}: {problem}")
    if expect is not None:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            probe, _ = build_model(recipe["name"], **kwargs)
        got = arch_spec(probe)
        same = (got.shape_key() == expect.shape_key() and got.dense_params == expect.dense_params
                and got.in_chans == expect.in_chans and tuple(got.patch_size) == tuple(expect.patch_size)
                and got.num_classes == expect.num_classes)
        if not same:
            raise VitSlimError(f"the model recipe ({recipe['name'][:60]}) builds {_describe_arch(got)}, "
                               f"but the file describes {_describe_arch(expect)}")
    model, _ = build_model(recipe["name"], **kwargs)
    return model


def _describe_arch(s: "ArchSpec") -> str:
    return (f"depth {s.depth}, {s.num_heads} heads x {s.head_dim} dims, MLP {s.mlp_hidden}, "
            f"{s.num_prefix_tokens}+{s.grid[0]}x{s.grid[1]} tokens, {s.num_classes} classes, "
            f"{s.dense_params:,} parameters")


def make_recipe(name: str, model: nn.Module, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able recipe of a built model: its name plus the kwargs that fix its architecture."""
    kw = dict(kwargs or {})
    kw["num_classes"] = int(getattr(model, "num_classes", kw.get("num_classes", 0)))
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        kw["img_size"] = _jsonable_size(tuple(int(v) for v in pe.img_size))
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        kw["in_chans"] = int(proj.in_channels)
    if name in LOCAL_MODELS:
        # the whole architecture goes in the recipe, so old runs survive new defaults
        kw = {**local_arch(name), **kw}
        kw["patch_size"] = _jsonable_size(kw["patch_size"])
    _check_jsonable(kw)
    from .spec import recipe_kwargs_problem
    problem = recipe_kwargs_problem(kw)
    if problem:
        raise VitSlimError(f"{name}: {problem}; runs record only these model arguments")
    return {"name": name, "kwargs": kw}


def data_config(model: nn.Module) -> dict[str, Any]:
    """Preprocessing the model expects: input_size (C, H, W), mean, std, interpolation, crop_pct.

    timm's pretrained config, corrected to the model's real input size and channel count (timm
    reports the pretrained resolution even when the model was built for another one).
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model) if getattr(model, "pretrained_cfg", None) else \
        resolve_data_config(args={})
    c, h, w = cfg["input_size"]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        h, w = (int(v) for v in pe.img_size)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        c = int(proj.in_channels)
    out = {
        "input_size": (c, h, w),
        "mean": _stats_for_channels(cfg["mean"], c),
        "std": _stats_for_channels(cfg["std"], c),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
    return out


def is_demo_model(model: nn.Module) -> bool:
    """Whether a model was built as the digits demo."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") == DEMO_MODEL


# ----------------------------------------------------------------------------- construction


def _build_local(name: str, **kwargs: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    kw = {**local_arch(name), **kwargs}
    try:
        model = VisionTransformer(**kw)
    except TypeError as err:
        raise VitSlimError(f"{name} does not accept these arguments: {_first_line(err)}") from None
    except (ValueError, AssertionError, RuntimeError) as err:  # e.g. embed_dim not divisible by heads
        raise VitSlimError(f"cannot build {name}: {_first_line(err)}") from None
    _init_sincos_positions(model)
    cfg = _local_cfg(name)
    cfg["num_classes"] = model.num_classes
    # timm sets pretrained_cfg on every model it builds; data_config() reads the data's stats here
    model.pretrained_cfg = cfg
    return model


def _init_sincos_positions(model: nn.Module) -> None:
    """Start the (still learnable) position embedding of the patches at 2-D sin-cos values.

    With timm's near-zero default the tiny demo spends its first epochs on a plateau learning
    where its patches are; from sin-cos it knows the grid at step one and needs far fewer epochs.
    """
    from timm.layers import build_sincos2d_pos_embed

    pos = getattr(model, "pos_embed", None)
    dim = int(model.embed_dim)
    if pos is None or dim % 4:
        return
    offset = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
    grid = [int(g) for g in model.patch_embed.grid_size]
    with torch.no_grad():
        table = build_sincos2d_pos_embed(grid, dim=dim, device=pos.device, dtype=pos.dtype)  # (M, C)
        pos[0, offset:] = table  # prefix positions keep timm's init: the class token must not be ~0


def _create_timm(name: str, arch: dict[str, Any], **extra: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, **arch, **extra)
    except TypeError as err:
        raise VitSlimError(f"{name} does not accept these arguments: {_first_line(err)}") from None
    except Exception as err:
        if not extra.get("pretrained"):
            raise VitSlimError(f"cannot build {name}: {_first_line(err)}") from None
        raise VitSlimError(f"cannot get pretrained weights for {name} ({_first_line(err)}); "
                           "download them where there is internet and pass --checkpoint FILE") from None


def _construct(name: str, arch: dict[str, Any]) -> nn.Module:
    return _build_local(name, **arch) if name in LOCAL_MODELS else _create_timm(name, arch)


def _check_timm_name(name: str) -> None:
    import timm
    from timm.models import split_model_name_tag

    base, _ = split_model_name_tag(name)
    if timm.is_model(base):
        return
    choices = [*timm.list_models(), *LOCAL_MODELS]
    close = difflib.get_close_matches(base, choices, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
    raise VitSlimError(f"unknown model {name!r}{hint}")


# ----------------------------------------------------------------------------- checkpoints


def _check_checkpoint_path(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise VitSlimError(f"checkpoint {path} does not exist")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise VitSlimError(f"checkpoint {path} should be one of {', '.join(CHECKPOINT_SUFFIXES)}")
    return path


def _read_state_dict(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint (unwrapping ``state_dict``/``model``/EMA keys and ``module.``)."""
    from timm.models import clean_state_dict

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            ckpt: Any = load_file(str(path), device="cpu")
        else:
            try:
                ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # old (non-zip) torch files cannot be memory-mapped
                ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip readers raise different types
        raise VitSlimError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    if isinstance(ckpt, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise VitSlimError(f"checkpoint {path} holds no state dict of tensors")
    return clean_state_dict(ckpt)


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # reads the header only
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:
            raise VitSlimError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
        if not shapes:
            raise VitSlimError(f"checkpoint {path} holds no tensors")
        return shapes
    return {k: tuple(v.shape) for k, v in _read_state_dict(path, mmap=True).items()}


def _model_cfg(name: str) -> dict[str, Any]:
    if name in LOCAL_MODELS:
        return _local_cfg(name)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _fill_from_checkpoint(name: str, arch: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Take num_classes, in_chans and img_size from the checkpoint where the caller left them unset."""
    arch = dict(arch)
    cfg = _model_cfg(name)
    classifiers = _as_tuple(cfg.get("classifier", "head"))
    head = shapes.get(f"{classifiers[0]}.weight") if classifiers else None
    if "num_classes" not in arch and head is not None:
        arch["num_classes"] = int(head[0])
    first_conv = _as_tuple(cfg.get("first_conv", "patch_embed.proj"))
    conv = shapes.get(f"{first_conv[0]}.weight") if first_conv else None
    if "in_chans" not in arch and conv is not None and len(conv) == 4:
        arch["in_chans"] = int(conv[1])
    pos = shapes.get("pos_embed")
    if "img_size" not in arch and pos is not None and len(pos) == 3:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            probe = _construct(name, arch)
        if hasattr(probe, "pos_embed") and getattr(probe, "pos_embed") is not None \
                and tuple(probe.pos_embed.shape) != pos and hasattr(probe, "patch_embed"):
            prefix = 0 if getattr(probe, "no_embed_class", False) else int(getattr(probe, "num_prefix_tokens", 0))
            side = math.isqrt(max(pos[1] - prefix, 0))
            if side > 0 and side * side == pos[1] - prefix:
                ph, pw = probe.patch_embed.patch_size
                arch["img_size"] = _jsonable_size((side * ph, side * pw))
    return arch


def _load_local(name: str, path: Path, arch: dict[str, Any]) -> nn.Module:
    model = _build_local(name, **arch)
    state = _read_state_dict(path)
    own = model.state_dict()
    head_rows, own_rows = state.get("head.weight"), own.get("head.weight")
    if head_rows is not None and (own_rows is None or head_rows.shape != own_rows.shape):
        # a different num_classes was asked for: start that head afresh, load the rest strictly
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in own.items() if k.startswith("head.")})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise VitSlimError(f"checkpoint {path} does not fit {name}: {_load_problem(err)}") from None
    return model


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _timm_load_messages() -> Iterator[list[str]]:
    """Collect what timm's loader logs (it reports keys it skipped only through logging)."""
    logger = logging.getLogger("timm.models._builder")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _load_timm(name: str, path: Path, arch: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    cfg = _model_cfg(name)
    classifiers = _as_tuple(cfg.get("classifier"))
    head = shapes.get(f"{classifiers[0]}.weight") if classifiers else None
    overlay: dict[str, Any] = dict(file=str(path))
    # tell timm what the checkpoint holds, so it keeps the head (and the input conv) when they fit
    if head is not None:
        overlay["num_classes"] = int(head[0])
    else:
        # a headless checkpoint: keep the model's usual head, randomly initialised
        overlay["num_classes"] = -1
        arch = {**arch, "num_classes": arch.get("num_classes", int(cfg.get("num_classes") or 1000))}
    first_conv = _as_tuple(cfg.get("first_conv"))
    conv = shapes.get(f"{first_conv[0]}.weight") if first_conv else None
    if conv is not None and len(conv) == 4 and cfg.get("input_size"):
        overlay["input_size"] = (int(conv[1]), *cfg["input_size"][1:])
    import timm

    try:
        with _timm_load_messages() as messages:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **arch)
    except TypeError as err:
        raise VitSlimError(f"{name} does not accept these arguments: {_first_line(err)}") from None
    except Exception as err:  # torch/timm raise RuntimeError, KeyError, AssertionError... on misfits
        raise VitSlimError(f"checkpoint {path} does not fit {name}: {_load_problem(err)}") from None
    # timm loads non-strictly once it drops a head; anything but the head left out is an error
    skipped = [k for k in _keys_in(messages, "Missing") + _keys_in(messages, "Unexpected")
               if k.rsplit(".", 1)[0] not in classifiers]
    if skipped:
        more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise VitSlimError(f"checkpoint {path} does not fit {name}: weights {', '.join(skipped[:3])}{more} "
                           "are missing or extra")
    return model


def _keys_in(messages: list[str], kind: str) -> list[str]:
    keys: list[str] = []
    for msg in messages:
        m = re.match(rf"{kind} keys \((.*)\) (discovered|found)", msg)
        if m:
            keys += [k.strip() for k in m.group(1).split(",") if k.strip()]
    return keys


def _load_problem(err: BaseException) -> str:
    """One line out of torch's multi-line load_state_dict error."""
    text = str(err)
    problems = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    if not problems:
        return _first_line(err)
    first = problems[0]
    m = re.match(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[.*?\])\) from "
                 r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)", first)
    if m:
        first = f"{m.group(1)} is {m.group(2)} in the checkpoint but {m.group(3)} in the model"
    elif len(first) > 200:
        first = first[:200] + "..."
    more = f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return first + more


# ----------------------------------------------------------------------------- small helpers


def _stats_for_channels(values: Any, chans: int) -> tuple[float, ...]:
    vals = tuple(float(v) for v in _as_tuple(values))
    if len(vals) == chans:
        return vals
    # e.g. a gray model with RGB statistics: one averaged value per channel
    return (sum(vals) / len(vals),) * chans


def _jsonable_size(value: Any) -> int | list[int]:
    if isinstance(value, (tuple, list)):
        vals = [int(v) for v in value]
        return vals[0] if len(vals) == 2 and vals[0] == vals[1] else vals
    return int(value)


def _check_jsonable(kwargs: dict[str, Any]) -> None:
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        bad = [k for k, v in kwargs.items() if not _is_jsonable(v)]
        raise VitSlimError(f"model arguments must be plain JSON values (numbers, strings, lists); "
                           f"not {', '.join(bad) or 'these'}") from None


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
