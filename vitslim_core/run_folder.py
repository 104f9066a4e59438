"""The search run folder: the one place that writes, reads and validates it.

A run folder holds
* ``scores.safetensors``: the score tensors and the JSON header (``MaskScores``);
* ``model.safetensors``: the searched weights, stamped with the step they were saved at;
* ``history.json``: loss/accuracy records, kept fractions, per-layer score snapshots;
* ``checkpoint.pt`` while a search can still be resumed, and ``sweep.json/.csv/.png`` after a sweep.

States: *complete*; *incomplete* (a stopped or killed search: the header says step X of Y, the files
still load, ``run_status`` says so); *interrupted while being written* (weights and scores from
different steps: refused, ``--resume`` repairs it). Everything read from a folder is checked before it
is used: the header by ``MaskScores.load``, the model recipe by building it on the meta device first
(``models.rebuild_model(expect=...)``), the weights for shape, dtype and finiteness.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ScoreFileError, VitSlimError
from .io import atomic_save, atomic_write_json
from .masks import add_masks, get_masks, is_mask_param
from .scores import MaskScores

SCORES_FILE = "scores.safetensors"
WEIGHTS_FILE = "model.safetensors"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
SWEEP_FILE = "sweep.json"
WEIGHTS_FORMAT = "vitslim-weights"
RUN_FILES = (SCORES_FILE, WEIGHTS_FILE, HISTORY_FILE, CHECKPOINT_FILE)
MAX_HISTORY_BYTES = 64 << 20


# ----------------------------------------------------------------------------- writing
def _snapshot(masks) -> dict[str, list[float]]:
    """Per-layer mean |score| per dimension: small enough to keep for every log record."""
    with torch.no_grad():
        return {"attn": [float(m.per_dim().abs().mean()) for m in masks.attn],
                "mlp": [float(m.score.abs().mean()) for m in masks.mlp],
                "token": [float(m.value().abs().mean()) for m in masks.token]}


def write_run_folder(run_dir: str | Path, model: nn.Module, meta: dict, history: dict) -> None:
    """Write scores, weights (without masks) and history, each atomically.

    The weights go first and the scores (what every tool opens) last; both carry the step, so a folder
    caught between the two writes is detected by ``load_run`` instead of pairing scores with other weights.
    """
    from safetensors.torch import save_file
    run_dir = Path(run_dir)
    masks = get_masks(model)
    snaps = history.setdefault("snapshots", [])
    step = history["log"][-1]["step"] if history.get("log") else 0
    if not snaps or snaps[-1]["step"] != step:
        snaps.append({"step": step, **_snapshot(masks)})
    at = int(history.get("step", step))
    progress = {"step": at, "total_steps": int(history.get("total_steps", at)),
                "complete": bool(history.get("complete"))}
    scores = MaskScores.from_model(model, {**meta, "eval": history["eval"][-1] if history.get("eval") else None,
                                           **progress})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not is_mask_param(k)}
    atomic_save(run_dir / WEIGHTS_FILE,
                lambda tmp: save_file(state, str(tmp), metadata={"format": WEIGHTS_FORMAT, "step": str(at),
                                                                  "model": json.dumps(meta["model"])}))
    scores.save(run_dir / SCORES_FILE)
    atomic_write_json(run_dir / HISTORY_FILE, {**history, "meta": {k: meta[k] for k in ("model", "data")}})


# ----------------------------------------------------------------------------- states
def run_status(scores: MaskScores) -> str | None:
    """A one-line note when the scores come from an unfinished search (None for a finished one).

    Score files from other tools, or written before this was recorded, count as finished.
    """
    if scores.meta.get("complete", True) is not False:
        return None
    step, total = scores.meta.get("step"), scores.meta.get("total_steps")
    where = f" (step {step} of {total})" if isinstance(step, int) and isinstance(total, int) else ""
    return (f"this search is incomplete{where}: its scores are from an unfinished run; "
            f"finish it with `vitslim search --resume --out RUN` using the same settings")


def scores_path(path: str | Path) -> Path:
    """``scores.safetensors`` of a run folder, or the score file itself."""
    path = Path(path)
    return path / SCORES_FILE if path.is_dir() else path


def run_dir_of(path: str | Path) -> Path:
    """The run folder of a folder or of its ``scores.safetensors``."""
    path = Path(path)
    return path.parent if path.is_file() and path.suffix == ".safetensors" else path


# ----------------------------------------------------------------------------- weights
def check_weights(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor], src: str) -> None:
    """Saved weights must fit the model built for them: same names and shapes, float where the model
    has floats, and no NaN or infinite values (one-line ScoreFileError otherwise)."""
    _check_shapes({k: tuple(t.shape) for k, t in state.items()}, want, src)
    for k, v in want.items():
        t = state[k]
        if v.is_floating_point() and not t.is_floating_point():
            raise ScoreFileError(f"{src}: {k} has dtype {t.dtype}, expected a float tensor")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ScoreFileError(f"{src}: {k} contains NaN or infinite weights")


def load_searched_weights(run_dir: str | Path, scores: MaskScores) -> nn.Module:
    """The searched model of a run (no masks), after every check that can run before allocating it."""
    from safetensors import SafetensorError, safe_open
    from .models import rebuild_model
    run_dir = Path(run_dir)
    recipe = scores.model_recipe
    if not recipe:
        raise ScoreFileError(f"{run_dir} does not say which model it was made for")
    wpath = run_dir / WEIGHTS_FILE
    if not wpath.is_file():
        raise ScoreFileError(f"{run_dir} has no {WEIGHTS_FILE} (searched weights are needed here)")
    try:
        with safe_open(str(wpath), "pt") as f:
            md = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            wstep = md.get("step")
            sstep = scores.meta.get("step")
            if wstep is not None and sstep is not None and str(sstep) != wstep:
                raise ScoreFileError(f"{run_dir} was interrupted while being written (scores at step {sstep}, "
                                     f"weights at step {wstep}): finish it with "
                                     f"`vitslim search --resume --out {run_dir}`")
            # shapes first (header only): a file that does not fit is refused before any tensor is read
            model = rebuild_model(recipe, expect=scores.spec)
            want = model.state_dict()
            _check_shapes(shapes, want, str(wpath))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except ScoreFileError:
        raise
    except VitSlimError as e:  # the recipe cannot be built, or not as the score file describes it
        raise ScoreFileError(f"{run_dir}: {e}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ScoreFileError(f"{wpath} is not a readable safetensors weights file ({reason})") from None
    check_weights(state, want, str(wpath))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_shapes(shapes: dict[str, tuple], want: dict[str, torch.Tensor], src: str) -> None:
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")] if extra else [])
        raise ScoreFileError(f"{src} does not fit the model ({'; '.join(parts)})")
    for k, v in want.items():
        if tuple(shapes[k]) != tuple(v.shape):
            raise ScoreFileError(f"{src} does not fit the model ({k} has shape "
                                 f"{tuple(shapes[k])}, the model needs {tuple(v.shape)})")


def load_run(run_dir: str | Path, with_masks: bool = True) -> tuple[MaskScores, nn.Module]:
    """Load a run folder: its scores and the searched model (weights; masks set to the scores).

    Args:
        run_dir: the folder (or its ``scores.safetensors``).
        with_masks: attach masks holding the scores (the searched model as it was trained).

    Raises:
        ScoreFileError: missing, damaged, foreign or mismatched files, an interrupted write.
    """
    run_dir = run_dir_of(run_dir)
    scores = MaskScores.load(run_dir / SCORES_FILE)
    model = load_searched_weights(run_dir, scores)
    if with_masks:
        add_masks(model, scores.attn_mode)
        scores.load_into(model)
    return scores, model


# ----------------------------------------------------------------------------- history and sweep
def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _records(rows: Any, need: tuple[str, ...], keys: tuple[str, ...]) -> list[dict]:
    """The dict rows of a history list that have numbers under ``need``, with only their numeric ``keys``."""
    if not isinstance(rows, list):
        return []
    out = []
    for r in rows:
        if isinstance(r, dict) and all(_num(r.get(k)) for k in need):
            out.append({k: r[k] for k in keys if _num(r.get(k))})
    return out


def clean_history(h: Any) -> dict | None:
    """A history as the figures read it: log and eval records of finite numbers, snapshots of per-layer
    number lists (a history from a file is user data: anything else is dropped)."""
    if not isinstance(h, dict):
        return None
    out = dict(h)
    out["log"] = _records(h.get("log"), ("step",), ("step", "epoch", "loss", "task_loss", "acc", "attn", "mlp",
                                                    "token"))
    out["eval"] = _records(h.get("eval"), ("top1",), ("step", "epoch", "top1", "top5", "loss", "n"))
    snaps = []
    for s in h.get("snapshots") if isinstance(h.get("snapshots"), list) else []:
        if isinstance(s, dict):
            snap = {k: s[k] for k in ("attn", "mlp", "token")
                    if isinstance(s.get(k), list) and all(_num(v) for v in s[k])}
            if _num(s.get("step")):
                snap["step"] = s["step"]
            snaps.append(snap)
    out["snapshots"] = snaps
    return out


def read_history(run_dir: str | Path) -> dict | None:
    """The run's cleaned ``history.json``, or None when it is absent, too large or not JSON."""
    p = Path(run_dir) / HISTORY_FILE
    if not p.is_file() or p.stat().st_size > MAX_HISTORY_BYTES:
        return None
    try:
        h = json.loads(p.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return clean_history(h)


def read_sweep_rows(path: str | Path) -> list[dict] | None:
    """The rows of a ``sweep.json`` (dicts only), or None when it is absent or unreadable."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size >= MAX_HISTORY_BYTES:
        return None
    try:
        rows = json.loads(p.read_bytes()).get("rows")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else None
