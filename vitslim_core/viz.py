"""Pictures of scores and plans, shared by the Gradio app, the Jupyter widgets and ``vitslim sweep``.

Two kinds of output, both plain functions of ``(scores, plan, ...)``:

* live views (``attention_map``, ``mlp_map``, ``token_grids``, ``score_histograms``, ``layer_bars``,
  ``token_overlay``, ``token_strip``) return ``(H, W, 3)`` uint8 numpy images drawn with numpy (labels
  with PIL). They take a few milliseconds even for DeiT-B, so a slider can redraw them on every move.
* figures (``history_figure``, ``score_histograms_figure``, ``accuracy_curve_figure``,
  ``training_curve_figure``) return matplotlib ``Figure`` objects made without pyplot (no global figure
  registry, safe in threads, nothing to close).

Colours: kept units are blue, darker for a larger |score|; pruned units are light grey. Scores are
shaded relative to the largest score of their dimension over all layers (its 99th percentile), because
the budget ranks all layers of a dimension together.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .plan import SlimPlan
    from .scores import MaskScores

BACKGROUND = (255, 255, 255)
TEXT = (40, 44, 52)
MUTED = (120, 124, 132)
KEPT = (33, 102, 172)      # the "kept" blue used in bars, curves and legends
PRUNED = (214, 214, 214)   # the "pruned" grey
THRESHOLD = (215, 48, 39)  # threshold lines
DIM_COLORS = {"attn": (33, 102, 172), "mlp": (26, 152, 80), "token": (230, 120, 20)}
DIM_LABELS = {"attn": "attention dims", "mlp": "MLP units", "token": "tokens"}


# ====================================================================== colour maps and drawing helpers
def _lut(anchors: Sequence[tuple[float, tuple[int, int, int]]], n: int = 256) -> np.ndarray:
    """A (n, 3) uint8 colour table interpolating RGB anchors given at positions in [0, 1]."""
    pos = np.array([a[0] for a in anchors])
    rgb = np.array([a[1] for a in anchors], dtype=np.float64)
    x = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(x, pos, rgb[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


KEPT_LUT = _lut([(0.0, (158, 202, 225)), (0.45, (66, 146, 198)), (1.0, (8, 48, 107))])
PRUNED_LUT = _lut([(0.0, (242, 242, 242)), (1.0, (196, 196, 196))])


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


@functools.lru_cache(maxsize=512)
def _glyph(ch: str, size: int) -> tuple[np.ndarray, float]:
    """Alpha mask (line height x width) of one character and its advance in pixels."""
    font = _font(size)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 2)
    adv = float(font.getlength(ch))
    if ch == " ":
        adv = max(adv, round(0.32 * size))  # the default font's space is very narrow
    im = Image.new("L", (int(np.ceil(adv)) + 3, ascent + descent))
    ImageDraw.Draw(im).text((0, 0), ch, fill=255, font=font)
    return np.asarray(im, dtype=np.float32) / 255.0, adv


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size: int) -> np.ndarray:
    """Alpha mask of a one-line string, assembled from cached glyphs (rendering text with PIL for
    every label of every slider move would cost far more than drawing the maps themselves)."""
    glyphs = [_glyph(ch, size) for ch in text]
    h = glyphs[0][0].shape[0] if glyphs else 1
    xs = np.concatenate([[0.0], np.cumsum([g[1] for g in glyphs])])
    out = np.zeros((h, int(np.ceil(xs[-1])) + 3), dtype=np.float32)
    for (m, _), x in zip(glyphs, xs[:-1]):
        x = int(round(x))
        w = min(m.shape[1], out.shape[1] - x)
        np.maximum(out[:, x:x + w], m[:, :w], out=out[:, x:x + w])
    return out


def _text_width(text: str, size: int) -> int:
    return int(sum(_glyph(ch, size)[1] for ch in text))


def _draw_texts(img: np.ndarray, texts: Sequence[tuple[int, int, str, tuple[int, int, int]]],
                size: int = 11) -> np.ndarray:
    """Blend (x, y, text, colour) labels into ``img`` in place and return it."""
    H, W = img.shape[:2]
    for x, y, text, color in texts:
        if not text:
            continue
        m = _text_mask(text, size)
        x, y = int(x), int(y)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + m.shape[1]), min(H, y + m.shape[0])
        if x1 <= x0 or y1 <= y0:
            continue
        a = m[y0 - y:y1 - y, x0 - x:x1 - x, None]
        region = img[y0:y1, x0:x1].astype(np.float32)
        img[y0:y1, x0:x1] = (region * (1.0 - a) + np.asarray(color, np.float32) * a + 0.5).astype(np.uint8)
    return img


def _shade(norm: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """RGB of cells with normalised importance ``norm`` in [0, 1]: blue ramp if kept, grey ramp if not."""
    idx = np.clip(norm * 255.0, 0, 255).astype(np.uint8)
    return np.where(kept[..., None], KEPT_LUT[idx], PRUNED_LUT[idx])


def _normalise(imp: np.ndarray) -> np.ndarray:
    top = float(np.quantile(imp, 0.99)) if imp.size else 0.0
    if top <= 1e-12:
        top = float(imp.max()) if imp.size and imp.max() > 0 else 1.0
    return np.clip(imp / top, 0.0, 1.0)


def _cells(colors: np.ndarray, ch: int, cw: int, gap: bool) -> np.ndarray:
    """Blow up an (R, C, 3) colour array to cells of ch x cw pixels (1-pixel white gaps if ``gap``)."""
    out = np.repeat(np.repeat(colors, ch, axis=0), cw, axis=1)
    if gap:
        out[ch - 1::ch] = BACKGROUND
        out[:, cw - 1::cw] = BACKGROUND
    return out


def _compose(panels: Sequence[np.ndarray], labels: Sequence[str], cols: int, pad: int = 10,
             label_h: int = 15, margin: int = 6, font: int = 11) -> np.ndarray:
    """Place panels (all the same size) in a grid, each with a label above it."""
    ph, pw = panels[0].shape[:2]
    cols = max(1, min(cols, len(panels)))
    rows = -(-len(panels) // cols)
    H = 2 * margin + rows * (label_h + ph) + (rows - 1) * pad
    W = 2 * margin + cols * pw + (cols - 1) * pad
    img = np.full((H, W, 3), BACKGROUND, dtype=np.uint8)
    texts = []
    for i, (p, lab) in enumerate(zip(panels, labels)):
        r, c = divmod(i, cols)
        y = margin + r * (label_h + ph + pad)
        x = margin + c * (pw + pad)
        img[y + label_h:y + label_h + ph, x:x + pw] = p
        texts.append((x, y, lab, TEXT))
    return _draw_texts(img, texts, font)


def _auto_cols(n: int, panel_w: int, target_w: int = 1000) -> int:
    return max(1, min(n, target_w // max(1, panel_w + 10)))


def _sorted(imp: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort the last axis by importance, largest first (so kept units form a bar)."""
    order = np.argsort(-imp, axis=-1, kind="stable")
    return np.take_along_axis(imp, order, -1), np.take_along_axis(kept, order, -1)


# ====================================================================== importance of every unit
def unit_importance(scores: "MaskScores") -> dict[str, np.ndarray]:
    """|score| of every attention head-dim (L, H, d), MLP unit (L, h) and token mask (L, M); cached."""
    key = "viz_importance"
    if key not in scores._cache:
        scores._cache[key] = {"attn": np.abs(scores.attn_values()), "mlp": np.abs(scores.mlp_values()),
                              "token": np.abs(scores.token_values())}
    return scores._cache[key]


def _normalised(scores: "MaskScores") -> dict[str, np.ndarray]:
    key = "viz_normalised"
    if key not in scores._cache:
        scores._cache[key] = {k: _normalise(v) for k, v in unit_importance(scores).items()}
    return scores._cache[key]


# ====================================================================== live views
def attention_map(scores: "MaskScores", plan: "SlimPlan", sort: bool = False, cols: int | None = None,
                  width: int = 1000) -> np.ndarray:
    """For every layer a heads x dims map: kept dims blue (shaded by |score|), pruned dims grey.

    Args:
        scores: the searched scores (shading).
        plan: which head-dims are kept.
        sort: sort each head's dims by score (kept dims then form a bar whose length is the head's width).
        cols: layers per row (default: as many as fit in ``width`` pixels).
        width: target image width in pixels.

    Returns:
        (H, W, 3) uint8 image.
    """
    s = plan.spec
    norm = _normalised(scores)["attn"]  # (L, H, d)
    kept = plan.attn
    if sort:
        norm, kept = _sorted(norm, kept)
    cw = int(np.clip(300 // s.head_dim, 2, 16))
    ch = int(np.clip(cw, 6, 14))
    gap = cw >= 6
    panels, labels = [], []
    heads = (kept.sum(2) > 0).sum(1)
    for l in range(s.depth):
        panels.append(_cells(_shade(norm[l], kept[l]), ch, cw, gap))
        labels.append(f"layer {l}: {heads[l]}/{s.num_heads} heads, {int(kept[l].sum())}/{s.attn_dim} dims")
    return _compose(panels, labels, cols or _auto_cols(s.depth, panels[0].shape[1], width))


def mlp_map(scores: "MaskScores", plan: "SlimPlan", sort: bool = False, width: int = 760) -> np.ndarray:
    """One row per layer: the hidden units (wrapped into a block, shaded by |score|) and a width bar.

    Args:
        scores: the searched scores (shading).
        plan: which MLP units are kept.
        sort: sort each layer's units by score.
        width: image width in pixels.
    """
    s = plan.spec
    h = s.mlp_hidden
    norm = _normalised(scores)["mlp"]
    kept = plan.mlp
    if sort:
        norm, kept = _sorted(norm, kept)
    label_w, bar_w, gap_w, margin = 58, 170, 12, 6
    map_w = width - label_w - bar_w - gap_w - 2 * margin
    cell = int(np.clip(np.sqrt(map_w * 24 / h), 2, 8))
    wrap = max(1, map_w // cell)
    lines = -(-h // wrap)
    if lines == 1:
        wrap = h
    pad_units = lines * wrap - h
    row_h = max(lines * cell, 16)
    pad = 6
    H = 2 * margin + s.depth * row_h + (s.depth - 1) * pad + 16
    img = np.full((H, width, 3), BACKGROUND, dtype=np.uint8)
    texts = [(margin, margin, "layer", MUTED), (margin + label_w, margin, "hidden units (blue: kept)", MUTED),
             (width - margin - bar_w, margin, "kept width", MUTED)]
    counts = kept.sum(1)
    for l in range(s.depth):
        y = margin + 16 + l * (row_h + pad)
        colors = _shade(norm[l], kept[l])
        if pad_units:
            colors = np.concatenate([colors, np.full((pad_units, 3), BACKGROUND, np.uint8)])
        block = _cells(colors.reshape(lines, wrap, 3), cell, cell, cell >= 5)
        x0 = margin + label_w
        img[y:y + block.shape[0], x0:x0 + block.shape[1]] = block
        # width bar
        bx, bh, blen = width - margin - bar_w, 10, bar_w - 72
        by = y + (min(row_h, 16) - bh) // 2
        img[by:by + bh, bx:bx + blen] = PRUNED
        img[by:by + bh, bx:bx + int(round(blen * counts[l] / h))] = DIM_COLORS["mlp"]
        texts.append((margin, y + max(0, (min(row_h, 16) - 13) // 2), f"L{l}", TEXT))
        texts.append((bx + blen + 6, by - 2, f"{counts[l]}/{h}", MUTED))
    return _draw_texts(img, texts, 10)


def token_grids(scores: "MaskScores", plan: "SlimPlan", cols: int | None = None, width: int = 1000) -> np.ndarray:
    """For every layer the patch grid: positions entering that layer blue (shaded by mask value), dropped grey."""
    s = plan.spec
    rows_, cols_ = s.grid
    cell = int(np.clip(128 // max(rows_, cols_), 3, 18))
    norm = _normalised(scores)["token"].reshape(s.depth, rows_, cols_)
    kept = plan.token.reshape(s.depth, rows_, cols_)
    panels = [_cells(_shade(norm[l], kept[l]), cell, cell, cell >= 6) for l in range(s.depth)]
    n = plan.token.sum(1)
    labels = [f"layer {l}: {n[l]}/{s.num_patches}" for l in range(s.depth)]
    return _compose(panels, labels, cols or _auto_cols(s.depth, panels[0].shape[1], width))


def layer_bars(plan: "SlimPlan", width: int = 760) -> np.ndarray:
    """Per layer, the kept fraction of attention dims, MLP units and tokens, and the layer's FLOPs share."""
    s = plan.spec
    rows = plan.layers()
    margin, label_w, gap = 6, 40, 14
    col_w = (width - 2 * margin - label_w - 3 * gap) // 4
    bar_h, row_h = 10, 22
    H = 2 * margin + 18 + s.depth * row_h
    img = np.full((H, width, 3), BACKGROUND, dtype=np.uint8)
    heads = [("attn", "attention dims"), ("mlp", "MLP units"), ("token", "tokens"), ("flops", "FLOPs of the layer")]
    texts = [(margin, margin, "layer", MUTED)]
    for j, (_, name) in enumerate(heads):
        texts.append((margin + label_w + j * (col_w + gap), margin, name, MUTED))
    for l, r in enumerate(rows):
        y = margin + 18 + l * row_h
        vals = {"attn": (r["attn_dims"], s.attn_dim), "mlp": (r["mlp"], s.mlp_hidden),
                "token": (r["tokens"], s.num_patches), "flops": (r["macs_ratio"], 1.0)}
        texts.append((margin, y - 1, f"L{l}", TEXT))
        for j, (k, _) in enumerate(heads):
            x = margin + label_w + j * (col_w + gap)
            num, den = vals[k]
            frac = float(num) / float(den) if den else 0.0
            bw = col_w - 44
            img[y:y + bar_h, x:x + bw] = PRUNED
            img[y:y + bar_h, x:x + int(round(bw * frac))] = DIM_COLORS.get(k, (90, 90, 90))
            texts.append((x + bw + 4, y - 2, f"{100 * frac:.0f}%", MUTED))
    return _draw_texts(img, texts, 10)


def _histogram_data(scores: "MaskScores", plan: "SlimPlan") -> dict[str, dict[str, Any]]:
    """Per dimension: importance of each unit as the budget ranks it, kept flags and the threshold."""
    imp = unit_importance(scores)
    mode = scores.attn_mode
    units = scores.attn_units()
    if mode == "head_dim":
        a_kept = plan.attn
    elif mode == "head":
        a_kept = plan.attn[:, :, 0]
    else:
        a_kept = plan.attn[:, 0, :]
    # tokens are ranked by e[l, p] = max over later layers (monotone masks), see plan.py
    tok = np.maximum.accumulate(imp["token"][::-1], axis=0)[::-1]
    out = {}
    for k, v, kept in (("attn", units, a_kept), ("mlp", imp["mlp"], plan.mlp), ("token", tok, plan.token)):
        v, kept = v.reshape(-1), kept.reshape(-1)
        thr = None
        if (~kept).any() and kept.any():
            lo, hi = float(v[~kept].max()), float(v[kept].min())
            thr = (lo + hi) / 2 if lo <= hi else hi
        out[k] = {"values": v, "kept": kept, "threshold": thr, "n_kept": int(kept.sum()), "n": int(v.size)}
    return out


def score_histograms(scores: "MaskScores", plan: "SlimPlan", width: int = 1000, height: int = 190,
                     bins: int = 40) -> np.ndarray:
    """Histograms of |score| per dimension (kept blue, pruned grey, sqrt count scale) with the threshold in red."""
    data = _histogram_data(scores, plan)
    margin, gap = 8, 22
    pw = (width - 2 * margin - 2 * gap) // 3
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    texts = []
    top, bottom = 20, 22
    ph = height - top - bottom
    for j, k in enumerate(("attn", "mlp", "token")):
        d = data[k]
        v, kept = d["values"], d["kept"]
        hi = float(v.max()) if v.size and v.max() > 0 else 1.0
        edges = np.linspace(0.0, hi * 1.0001, bins + 1)
        hk, _ = np.histogram(v[kept], edges)
        hp, _ = np.histogram(v[~kept], edges)
        total = np.sqrt(hk + hp)
        scale = ph / max(1e-9, float(total.max()))
        x0 = margin + j * (pw + gap)
        y_base = top + ph
        bw = pw / bins
        for b in range(bins):
            if hk[b] + hp[b] == 0:
                continue
            xa, xb = int(x0 + b * bw), max(int(x0 + b * bw) + 1, int(x0 + (b + 1) * bw) - 1)
            tot_h = int(round(total[b] * scale))
            kept_h = int(round(tot_h * hk[b] / (hk[b] + hp[b])))
            img[y_base - tot_h:y_base, xa:xb] = PRUNED
            if kept_h:
                img[y_base - kept_h:y_base, xa:xb] = DIM_COLORS[k]
        img[y_base:y_base + 1, x0:x0 + pw] = MUTED
        if d["threshold"] is not None:
            tx = int(x0 + pw * d["threshold"] / edges[-1])
            img[top - 4:y_base, max(x0, tx - 1):tx + 1] = THRESHOLD
        name = {"attn": "attention |score|", "mlp": "MLP |score|", "token": "token mask (max over later layers)"}[k]
        texts.append((x0, 2, f"{name}: {d['n_kept']}/{d['n']} kept", TEXT))
        texts.append((x0, y_base + 4, "0", MUTED))
        lab = f"{hi:.3g}"
        texts.append((x0 + pw - _text_width(lab, 10), y_base + 4, lab, MUTED))
        if d["threshold"] is not None:
            lab = f"threshold {d['threshold']:.3g}"
            tx = int(x0 + pw * d["threshold"] / edges[-1])
            lw = _text_width(lab, 10)
            lx = tx + 4 if tx + 4 + lw <= x0 + pw else tx - 4 - lw
            img[top - 2:top + 12, max(0, lx - 2):lx + lw + 2] = BACKGROUND  # keep the label readable
            texts.append((lx, top - 2, lab, THRESHOLD))
    return _draw_texts(img, texts, 10)


# ====================================================================== token masks on an image
def display_image(image: Any, data_cfg: dict | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 picture of a model input.

    Args:
        image: a torch tensor (1, C, H, W) or (C, H, W) NORMALISED like the model's data (it is
            un-normalised with ``data_cfg`` mean/std), or a numpy array (H, W), (H, W, C) already in
            display space (uint8, or float in [0, 1]).
        data_cfg: ``mean`` and ``std`` for tensors.
    """
    if hasattr(image, "detach"):  # a torch tensor: normalised model input
        x = image.detach().float().cpu().numpy()
        if x.ndim == 4:
            x = x[0]
        c = x.shape[0]
        cfg = data_cfg or {}
        mean = np.broadcast_to(np.asarray(cfg.get("mean", 0.0), dtype=np.float64).reshape(-1), (c,))
        std = np.broadcast_to(np.asarray(cfg.get("std", 1.0), dtype=np.float64).reshape(-1), (c,))
        x = x * std[:, None, None] + mean[:, None, None]
        x = np.clip(x.transpose(1, 2, 0), 0.0, 1.0)
        arr = (x * 255.0 + 0.5).astype(np.uint8)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] != 3:
        arr = arr[:, :, :3] if arr.shape[2] > 3 else np.repeat(arr[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(arr)


def _overlays(image: Any, plan: "SlimPlan", layers: Sequence[int], data_cfg: dict | None, size: int,
              dim: float) -> list[np.ndarray]:
    s = plan.spec
    rows, cols = s.grid
    arr = display_image(image, data_cfg)
    cell = max(1, int(round(size / max(rows, cols))))
    th, tw = rows * cell, cols * cell
    if arr.shape[:2] != (th, tw):
        up = th / arr.shape[0]
        if up >= 1 and float(up).is_integer() and tw / arr.shape[1] == up:
            arr = np.repeat(np.repeat(arr, int(up), axis=0), int(up), axis=1)  # crisp pixels
        else:
            arr = np.asarray(Image.fromarray(arr).resize(
                (tw, th), Image.Resampling.BILINEAR if up > 1 else Image.Resampling.BOX))
    dimmed = (arr.astype(np.float32) * (1.0 - dim) + 128.0 * dim + 0.5).astype(np.uint8)
    if cell >= 12:  # a faint patch grid, so single tokens can be counted
        arr = arr.copy()
        for im in (arr, dimmed):
            im[cell - 1::cell] = im[cell - 1::cell] // 5 * 4 + 51
            im[:, cell - 1::cell] = im[:, cell - 1::cell] // 5 * 4 + 51
    out = []
    for l in layers:
        keep = plan.token[int(np.clip(int(l), 0, s.depth - 1))].reshape(rows, cols)
        mask = np.repeat(np.repeat(keep, cell, axis=0), cell, axis=1)
        out.append(np.where(mask[..., None], arr, dimmed))
    return out


def token_overlay(image: Any, plan: "SlimPlan", layer: int, data_cfg: dict | None = None,
                  size: int = 256, dim: float = 0.65) -> np.ndarray:
    """The image with the patches that do NOT enter block ``layer`` dimmed (greyed out).

    Args:
        image: the model input (see ``display_image``): a normalised tensor or a display array.
        plan: the plan (its ``token[layer]`` says which patches enter block ``layer``).
        layer: block index, 0 .. depth-1 (clipped).
        data_cfg: mean/std to un-normalise a tensor.
        size: approximate output side; each patch becomes ``round(size / grid)`` pixels (pixels are
            repeated, not blurred, when the image grows by a whole factor).
        dim: how strongly dropped patches are greyed out (0: not at all, 1: flat grey).

    Returns:
        (H, W, 3) uint8 image.
    """
    return _overlays(image, plan, [layer], data_cfg, size, dim)[0]


def token_strip(image: Any, plan: "SlimPlan", data_cfg: dict | None = None, size: int = 112,
                cols: int | None = None, width: int = 1000, dim: float = 0.65) -> np.ndarray:
    """``token_overlay`` of every layer side by side, labelled with the number of patches kept."""
    s = plan.spec
    panels = _overlays(image, plan, range(s.depth), data_cfg, size, dim)
    n = plan.token.sum(1)
    labels = [f"L{l}: {n[l]}/{s.num_patches}" for l in range(s.depth)]
    return _compose(panels, labels, cols or _auto_cols(s.depth, panels[0].shape[1], width), pad=8)


# ====================================================================== matplotlib figures
def _new_figure(w: float, h: float) -> "Figure":
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    return fig


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=8)


def _rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(v / 255 for v in c)  # type: ignore[return-value]


def history_figure(history: dict | None) -> "Figure":
    """Search history: losses, accuracy, fraction of units still alive, per-layer mean |score|.

    Args:
        history: ``history.json`` of a run (``log`` records with step, loss, task_loss, acc, attn, mlp,
            token; ``eval`` per epoch with top1; ``snapshots`` per-layer mean |score|).
    """
    fig = _new_figure(9.0, 5.6)
    axs = fig.subplots(2, 2)
    history = history or {}
    log = [r for r in history.get("log", []) if "step" in r]
    evals = history.get("eval", []) or []
    snaps = history.get("snapshots", []) or []
    for ax in axs.flat:
        _style(ax)
    ax = axs[0, 0]
    if log:
        steps = [r["step"] for r in log]
        ax.plot(steps, [r.get("loss", np.nan) for r in log], label="total loss", color="#444")
        if any("task_loss" in r for r in log):
            ax.plot(steps, [r.get("task_loss", np.nan) for r in log], label="task loss", color=_rgb(KEPT))
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no log records", ha="center", va="center", transform=ax.transAxes, color="#888")
    ax.set_title("loss (task + sparsity penalty)", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax = axs[0, 1]
    if log and any("acc" in r for r in log):
        ax.plot([r["step"] for r in log], [r.get("acc", np.nan) for r in log], label="train batch", color="#999")
    if evals:
        ax.plot([e.get("step", i) for i, e in enumerate(evals)], [e["top1"] for e in evals], "o-",
                label="test top-1", color=_rgb(KEPT))
    if (log and any("acc" in r for r in log)) or evals:
        ax.legend(fontsize=8, frameon=False)
    ax.set_title("accuracy (%) of the masked model", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax = axs[1, 0]
    if log:
        for k in ("attn", "mlp", "token"):
            if any(k in r for r in log):
                ax.plot([r["step"] for r in log], [r.get(k, np.nan) for r in log], label=DIM_LABELS[k],
                        color=_rgb(DIM_COLORS[k]))
        ax.set_ylim(-0.02, 1.05)
        ax.legend(fontsize=8, frameon=False)
    ax.set_title("fraction of units with |mask| >= 0.1", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax = axs[1, 1]
    if snaps:
        last = snaps[-1]
        for k in ("attn", "mlp", "token"):
            if k in last:
                ax.plot(range(len(last[k])), last[k], "o-", label=DIM_LABELS[k], color=_rgb(DIM_COLORS[k]))
        ax.legend(fontsize=8, frameon=False)
        ax.set_title(f"mean |score| per layer (step {last.get('step', '?')})", fontsize=9)
    else:
        ax.set_title("mean |score| per layer", fontsize=9)
        ax.text(0.5, 0.5, "no snapshots", ha="center", va="center", transform=ax.transAxes, color="#888")
    ax.set_xlabel("layer", fontsize=8)
    return fig


def score_histograms_figure(scores: "MaskScores", plan: "SlimPlan", bins: int = 50) -> "Figure":
    """Histograms of |score| per dimension, kept vs pruned stacked, with the current threshold."""
    data = _histogram_data(scores, plan)
    fig = _new_figure(10.0, 3.0)
    axs = fig.subplots(1, 3)
    for ax, k in zip(axs, ("attn", "mlp", "token")):
        d = data[k]
        v, kept = d["values"], d["kept"]
        hi = float(v.max()) if v.size and v.max() > 0 else 1.0
        edges = np.linspace(0.0, hi * 1.0001, bins + 1)
        ax.hist([v[kept], v[~kept]], bins=edges, stacked=True, color=[_rgb(DIM_COLORS[k]), _rgb(PRUNED)],
                label=["kept", "pruned"])
        if d["threshold"] is not None:
            ax.axvline(d["threshold"], color=_rgb(THRESHOLD), lw=1.5, label="threshold")
        ax.set_yscale("symlog", linthresh=10)
        _style(ax)
        ax.set_title(f"{DIM_LABELS[k]}: {d['n_kept']}/{d['n']} kept", fontsize=9)
        ax.set_xlabel("|score|" if k != "token" else "mask value (max over later layers)", fontsize=8)
        ax.legend(fontsize=7, frameon=False)
    return fig


def accuracy_curve_figure(rows: Sequence[dict] | None, current: float | dict | None = None,
                          extra: Sequence[dict] | None = None) -> "Figure":
    """Top-1 accuracy against FLOPs (% of dense).

    Args:
        rows: sweep rows (``sweep.json``), each with ``flops_ratio`` and ``top1`` (and ``kind``).
        current: the budget now selected: a FLOPs ratio, or a dict with ``flops_ratio`` (and optional
            ``top1``) drawn as a vertical line (and a star).
        extra: more points, each with ``flops_ratio``, ``top1`` and ``kind``/``label`` (for example
            "evaluated" or "retrained"); one marker style per kind.
    """
    fig = _new_figure(7.0, 4.0)
    ax = fig.subplots()
    _style(ax)
    rows = sorted([r for r in (rows or []) if r.get("top1") is not None and r.get("flops_ratio") is not None],
                  key=lambda r: r["flops_ratio"])
    if rows:
        kinds: dict[str, list[dict]] = {}
        for r in rows:
            kinds.setdefault(str(r.get("kind") or "slimmed, no retraining"), []).append(r)
        for i, (kind, rs) in enumerate(kinds.items()):
            ax.plot([100 * r["flops_ratio"] for r in rs], [r["top1"] for r in rs], "o-", ms=4,
                    color=_rgb(KEPT) if i == 0 else None, label=kind)
    markers = ["s", "^", "D", "P", "X", "v"]
    groups: dict[str, list[dict]] = {}
    for e in extra or []:
        if e.get("top1") is None or e.get("flops_ratio") is None:
            continue
        groups.setdefault(str(e.get("kind") or e.get("label") or "extra"), []).append(e)
    for i, (kind, es) in enumerate(groups.items()):
        ax.scatter([100 * e["flops_ratio"] for e in es], [e["top1"] for e in es], s=46,
                   marker=markers[i % len(markers)], zorder=3, label=kind,
                   color=["#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#a6761d"][i % 6])
    if current is not None:
        cur = current if isinstance(current, dict) else {"flops_ratio": float(current)}
        if cur.get("flops_ratio") is not None:
            ax.axvline(100 * cur["flops_ratio"], color=_rgb(THRESHOLD), ls="--", lw=1.2,
                       label=f"current budget ({100 * cur['flops_ratio']:.0f}%)")
            if cur.get("top1") is not None:
                ax.scatter([100 * cur["flops_ratio"]], [cur["top1"]], marker="*", s=160, zorder=4,
                           color=_rgb(THRESHOLD))
    if not rows and not groups:
        ax.text(0.5, 0.55, "no accuracy measured yet", ha="center", va="center", transform=ax.transAxes,
                color="#888", fontsize=10)
    ax.set_xlim(0, 105)
    ax.set_xlabel("FLOPs (% of the dense model)", fontsize=9)
    ax.set_ylabel("top-1 accuracy (%)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def training_curve_figure(history: dict | None, total_steps: int | None = None) -> "Figure":
    """Live retraining curve: loss per logged step and test top-1 per epoch.

    Args:
        history: ``{"log": [...], "eval": [...]}`` as produced by the training loop.
        total_steps: fixes the x range while training is still running.
    """
    fig = _new_figure(7.0, 3.0)
    ax = fig.subplots()
    _style(ax)
    history = history or {}
    log = [r for r in history.get("log", []) if "loss" in r]
    if log:
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], color="#444", label="loss")
        if any("task_loss" in r for r in log) and any(r.get("task_loss") != r.get("loss") for r in log):
            ax.plot([r["step"] for r in log], [r.get("task_loss", np.nan) for r in log], color=_rgb(KEPT),
                    label="task loss")
    else:
        ax.text(0.5, 0.5, "waiting for the first steps", ha="center", va="center", transform=ax.transAxes,
                color="#888")
    if total_steps:
        ax.set_xlim(0, total_steps)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    evals = history.get("eval", []) or []
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e["top1"] for e in evals], "o", color="#d95f02", label="test top-1")
        ax2.set_ylabel("top-1 (%)", fontsize=8)
        ax2.tick_params(labelsize=8)
        ax2.spines[["top"]].set_visible(False)
    if log:
        ax.legend(fontsize=8, frameon=False, loc="upper right")
    return fig
