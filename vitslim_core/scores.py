"""MaskScores: the searched score tensors of a model plus everything the app needs without weights."""
from __future__ import annotations

import json
import math

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import ScoreFileError
from .io import atomic_save
from .masks import ATTN_MODES, get_masks, token_value
from .spec import ArchSpec, arch_spec

FORMAT = "vitslim-scores"
FORMAT_VERSION = 1
MAX_SCORE_FILE = 512 << 20
RESERVED = frozenset({"format", "format_version", "arch", "attn_mode"})


@dataclass
class MaskScores:
    """Scores of every layer and dimension.

    Attributes:
        spec: the architecture the scores belong to.
        attn_mode: "head_dim" (attn[l] is (H, d)), "head" ((H,)) or "uniform" ((d,)).
        attn, mlp, token: one float32 tensor per layer; token holds RAW scores (value = tanh(raw)/tanh(3)).
        meta: JSON-able facts: model recipe, dataset, class names, mean/std, search config, versions.
    """

    spec: ArchSpec
    attn_mode: str
    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    token: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: nn.Module, meta: dict[str, Any] | None = None) -> "MaskScores":
        """Copy the current scores out of a model that has masks (see ``add_masks``)."""
        masks = get_masks(model)
        if masks is None:
            raise ScoreFileError("the model has no masks; call add_masks(model) first")
        spec = arch_spec(model, **_recipe_kwargs(meta))
        grab = lambda mods: [m.score.detach().float().cpu().clone() for m in mods]  # noqa: E731
        return cls(spec, masks.attn_mode, grab(masks.attn), grab(masks.mlp), grab(masks.token), dict(meta or {}))

    @classmethod
    def dense(cls, spec: ArchSpec, attn_mode: str = "head_dim", meta: dict | None = None) -> "MaskScores":
        """Scores at their initial values (nothing searched yet)."""
        from .masks import TOKEN_INIT
        shape = {"head_dim": (spec.num_heads, spec.head_dim), "head": (spec.num_heads,), "uniform": (spec.head_dim,)}
        L = spec.depth
        return cls(spec, attn_mode, [torch.ones(shape[attn_mode]) for _ in range(L)],
                   [torch.ones(spec.mlp_hidden) for _ in range(L)],
                   [torch.full((spec.num_patches,), TOKEN_INIT) for _ in range(L)], dict(meta or {}))

    def load_into(self, model: nn.Module) -> None:
        """Write these scores into a model's masks (shapes must match)."""
        masks = get_masks(model)
        if masks is None or masks.attn_mode != self.attn_mode:
            raise ScoreFileError(f"the model needs masks in mode {self.attn_mode!r} (add_masks(model, attn=...))")
        arch_spec(model).check_same_shape(self.spec, "score file")
        with torch.no_grad():
            for mods, vals in ((masks.attn, self.attn), (masks.mlp, self.mlp), (masks.token, self.token)):
                for m, v in zip(mods, vals):
                    m.score.copy_(v)

    # ---------------------------------------------------------------- checks
    def fingerprint(self) -> tuple:
        """Changes whenever a score tensor is replaced or edited in place (keys the plan caches)."""
        return (self.attn_mode, tuple((id(t), t._version) for kind in (self.attn, self.mlp, self.token) for t in kind))

    def validate(self) -> None:
        bad = RESERVED & set(self.meta)
        if bad:
            raise ScoreFileError(f"meta keys {', '.join(sorted(bad))} are reserved for the score file header")
        s = self.spec
        if self.attn_mode not in ATTN_MODES:
            raise ScoreFileError(f"unknown attention mask mode {self.attn_mode!r}")
        want = {"attn": {"head_dim": (s.num_heads, s.head_dim), "head": (s.num_heads,),
                         "uniform": (s.head_dim,)}[self.attn_mode],
                "mlp": (s.mlp_hidden,), "token": (s.num_patches,)}
        for kind in ("attn", "mlp", "token"):
            vals = getattr(self, kind)
            if len(vals) != s.depth:
                raise ScoreFileError(f"score file has {len(vals)} {kind} layers, the architecture has {s.depth}")
            for l, v in enumerate(vals):
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != want[kind]:
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ScoreFileError(f"{kind}.{l} has shape {got}, expected {want[kind]}")
                if not v.is_floating_point():
                    raise ScoreFileError(f"{kind}.{l} has dtype {v.dtype}, expected a float tensor")
                if not torch.isfinite(v).all():
                    raise ScoreFileError(f"{kind}.{l} contains NaN or infinite scores")

    # ---------------------------------------------------------------- views (numpy, for plans and plots)
    def attn_values(self) -> np.ndarray:
        """Signed score of every head-dim, (L, H, d)."""
        s = self.spec
        out = np.empty((s.depth, s.num_heads, s.head_dim), dtype=np.float64)
        for l, v in enumerate(self.attn):
            v = v.double().numpy()
            out[l] = v[:, None] if self.attn_mode == "head" else (v[None, :] if self.attn_mode == "uniform" else v)
        return out

    def attn_units(self) -> np.ndarray:
        """Importance |score| of each attention unit as stored: (L, H, d), (L, H) or (L, d)."""
        return np.abs(np.stack([v.double().numpy() for v in self.attn]))

    def mlp_values(self) -> np.ndarray:
        return np.stack([v.double().numpy() for v in self.mlp])

    def token_values(self) -> np.ndarray:
        """Token mask values tanh(raw)/tanh(3), (L, M)."""
        return np.stack([token_value(v.double()).numpy() for v in self.token])

    def token_grid(self) -> np.ndarray:
        """Token values on the patch grid, (L, rows, cols)."""
        return self.token_values().reshape(self.spec.depth, *self.spec.grid)

    # ---------------------------------------------------------------- files
    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": self.spec.to_dict(),
                "attn_mode": self.attn_mode, **self.meta}

    def save(self, path: str | Path) -> Path:
        """Write ``scores.safetensors`` atomically (a run folder path means ``folder/scores.safetensors``)."""
        from safetensors.torch import save_file
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path = path / "scores.safetensors"
        tensors = {}
        for kind in ("attn", "mlp", "token"):
            for l, v in enumerate(getattr(self, kind)):
                tensors[f"{kind}.{l}"] = v.detach().float().cpu().contiguous()
        md = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "vitslim": json.dumps(self.header())}
        atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=md))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MaskScores":
        """Read a score file (or a run folder holding ``scores.safetensors``), validating everything."""
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        if path.is_dir():
            path = path / "scores.safetensors"
        if not path.is_file():
            raise ScoreFileError(f"score file {path} does not exist")
        if path.stat().st_size > MAX_SCORE_FILE:
            raise ScoreFileError(f"{path} is too large for a score file")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise ScoreFileError(f"{path} is not a vitslim score file (no '{FORMAT}' metadata)")
                if md.get("format_version") != str(FORMAT_VERSION):
                    raise ScoreFileError(f"{path} has score format version {md.get('format_version')!r}; "
                                         f"this vitslim reads version {FORMAT_VERSION}")
                header = json.loads(md.get("vitslim", ""))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except ScoreFileError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise ScoreFileError(f"{path} is not a readable safetensors score file ({reason})") from None
        if not isinstance(header, dict) or not isinstance(header.get("arch"), dict):
            raise ScoreFileError(f"{path} has a damaged vitslim header")
        try:
            spec = ArchSpec.from_dict(header["arch"], error=ScoreFileError)
        except (TypeError, ValueError, KeyError) as e:
            raise ScoreFileError(f"{path} has a damaged architecture description ({e})") from None
        meta = {k: v for k, v in header.items() if k not in ("format", "format_version", "arch", "attn_mode")}
        problem = _meta_problem(meta, spec)
        if problem:
            raise ScoreFileError(f"{path} has a damaged vitslim header ({problem})")
        out = {}
        for kind in ("attn", "mlp", "token"):
            vals = []
            for l in range(spec.depth):
                if f"{kind}.{l}" not in tensors:
                    raise ScoreFileError(f"{path} lacks the tensor {kind}.{l}")
                vals.append(tensors[f"{kind}.{l}"])
            out[kind] = vals
        return cls(spec, str(header.get("attn_mode")), out["attn"], out["mlp"], out["token"], meta)

    # ---------------------------------------------------------------- descriptions
    @property
    def model_recipe(self) -> dict | None:
        return self.meta.get("model")

    @property
    def class_names(self) -> list[str]:
        names = (self.meta.get("data") or {}).get("class_names")
        return list(names) if names else [str(i) for i in range(self.spec.num_classes)]

    def searched(self) -> dict[str, bool]:
        """Which dimensions the search actually trained (unsearched ones are never pruned by default)."""
        d = (self.meta.get("search") or {}).get("searched") or {}
        return {k: bool(d.get(k, True)) for k in ("attn", "mlp", "token")}

    def summary(self) -> dict[str, Any]:
        s = self.spec
        return {"model": (self.model_recipe or {}).get("name", s.model_name), "depth": s.depth,
                "heads": s.num_heads, "head_dim": s.head_dim, "mlp_hidden": s.mlp_hidden,
                "prefix_tokens": s.num_prefix_tokens, "patches": s.num_patches, "grid": list(s.grid),
                "attn_mode": self.attn_mode}


def _recipe_kwargs(meta: dict | None) -> dict:
    rec = (meta or {}).get("model") or {}
    return {"model_name": rec.get("name", ""), "model_kwargs": rec.get("kwargs", {})}


def _meta_problem(meta: dict[str, Any], spec: ArchSpec) -> str | None:
    """Type-check the header parts the engine and the front-ends read: model recipe, data config, search
    and eval records. The data config must describe the model's own input: a header could otherwise make
    a tool build a huge image tensor (``input_size`` [1, 4096, 4096] for a 16-px model)."""
    from .data import data_config_problem
    from .spec import recipe_problem
    for k in ("data", "model", "search", "eval"):
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            return f"'{k}' is not a JSON object"
    rec = meta.get("model")
    if rec is not None:
        if not (isinstance(rec.get("name"), str) and isinstance(rec.get("kwargs", {}), dict)):
            return 'model must look like {"name": ..., "kwargs": {...}}'
        problem = recipe_problem(spec, rec.get("kwargs", {}))
        if problem:
            return problem
    data = meta.get("data")
    if data is not None:
        problem = data_config_problem(data)
        if problem:
            return f"data: {problem}"
        size = data.get("input_size")
        if size is not None and not input_size_fits(size, spec):
            return f"data.input_size {_brief(size)} is not the model's input {[spec.in_chans, *spec.img_size]}"
        for k in ("mean", "std"):
            v = data.get(k)
            if v is not None and isinstance(v, (list, tuple)) and len(v) not in (1, spec.in_chans):
                return f"data.{k} has {len(v)} values for a model with {spec.in_chans} channels"
        if data.get("std") is not None and min(data["std"] if isinstance(data["std"], (list, tuple))
                                               else [data["std"]]) <= 0:
            return "data.std must be above 0"
        names = data.get("class_names")
        if names is not None and len(names) > (1 << 20):
            return "data.class_names is too long"
    search = meta.get("search")
    if search is not None and not isinstance(search.get("searched") or {}, dict):
        return "search.searched must be a mapping"
    ev = meta.get("eval")
    if ev is not None:
        top1 = ev.get("top1")
        if top1 is not None and (isinstance(top1, bool) or not isinstance(top1, (int, float))
                                 or not math.isfinite(top1)):
            return "eval.top1 is not a number"
    return None


def input_size_fits(size: Any, spec: ArchSpec) -> bool:
    """Whether a data config's (C, H, W) is the model's input: timm floors the patch grid, so 100 px with
    16-px patches is a 96-px model; anything larger than one patch more is refused."""
    c, h, w = (int(v) for v in size)
    (ph, pw), (gh, gw) = spec.patch_size, spec.grid
    return c == spec.in_chans and h // ph == gh and w // pw == gw


def _brief(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
