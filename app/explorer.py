"""The app's callbacks: typed methods of ``Explorer`` that the page wires to its components.

Every method takes plain values (run key, budget numbers, file paths) and returns plain values or
Gradio updates, so tests call them directly. ``Explorer`` holds what one app instance owns: the runs
it may open (with their loaded scores and models), its work dir, and the retraining job it uses
(by default the process-wide ``app.jobs.JOB``).
"""
from __future__ import annotations

import html
import itertools
import math
import os
import secrets
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import gradio as gr
import numpy as np

from vitslim_core import viz
from vitslim_core.errors import DataError, VitSlimError
from vitslim_core.plan import DEFAULT_TOL, BudgetWarning, SlimPlan, plan_for_flops, plan_for_ratios

from .views import (TABLE_HEADERS, Card, budget_stamp, fmt_flops as _fmt_flops, fmt_params as _fmt_params,
                    layer_rows, one_line as _one_line, readout_cards, rounding_note, table_total)
from .jobs import JOB, JobBusyError, JobStatus, RetrainJob, RetrainRequest
from . import runs as run_registry
from .runs import (MissingWeightsError, OpenRun, RunRegistry, Sample, bundled_labels, bundled_runs, read_sweep,
                   sweep_file)

MODES = [("FLOPs budget", "flops"), ("per-dimension ratios", "ratios")]
# the outputs of budget_views, and which of them each tab shows
LIVE_OUTPUTS = ("readout", "attention", "mlp", "tokens", "scores", "bars", "table", "overlay", "strip")
VIEW_OUTPUTS = {"attention": {"attention"}, "mlp": {"mlp"}, "tokens": {"tokens"}, "image": {"overlay", "strip"},
                "layers": {"bars", "table"}, "scores": {"scores"}}
VIEWS = ("attention", "mlp", "tokens", "image", "layers", "scores", "history", "accuracy", "retrain", "export")
HEAVY_VIEWS = ("image", "accuracy", "scores")  # tabs with a view too slow for every slider move
DEFAULT_FLOPS = 0.6
HEAVY_QUIET, HEAVY_QUIET_MAX = 0.15, 1.0
"""Seconds a page's budget must stay unchanged before its heavy views are drawn from a slider event (more
on a busy server, at most the second number; ``PageBudgets``): a drag or a held arrow key moves the
budget every few tens of ms, and drawing a matplotlib figure at each of those budgets would keep one core
busy with pictures nobody sees."""


# ====================================================================== input coercion
# Callbacks get whatever a client sends (the page's own requests can be crafted): numbers may be None,
# NaN, inf, huge or text, run keys anything. These turn them into safe values or a one-line VitSlimError.
def _number(v: Any, default: float) -> float:
    """A finite float from ``v`` (numbers or numeric text), else ``default``."""
    if isinstance(v, bool):
        return float(v)
    try:
        v = float(v)
    except (TypeError, ValueError, OverflowError):
        return default
    return v if math.isfinite(v) else default


def _index(v: Any, default: int = 0, lo: int = 0, hi: int = 1_000_000) -> int:
    """An int in [lo, hi] from ``v`` (a layer or sample index), else ``default``."""
    return int(min(hi, max(lo, _number(v, default))))


def _text(v: Any, default: str = "") -> str:
    return v if isinstance(v, str) else default


def _image_state(image: Any) -> dict | None:
    """The session image if it is one this app made ({"name", "tensor", "label"}), else None."""
    import torch
    if isinstance(image, dict) and isinstance(image.get("tensor"), torch.Tensor) and image["tensor"].ndim == 4 \
            and image["tensor"].is_floating_point():
        return image
    return None


def _eval_rows(evals: Any) -> list[dict]:
    """This session's evaluations (a list of dicts with a run key and numbers), garbage dropped."""
    if not isinstance(evals, list):
        return []
    return [e for e in evals if isinstance(e, dict) and isinstance(e.get("run_key"), str)
            and all(isinstance(e.get(k), (int, float)) and math.isfinite(e[k]) for k in ("flops_ratio", "top1"))]


# ====================================================================== budgets
@dataclass(frozen=True)
class Budget:
    """The budget the page shows: a FLOPs ratio, or kept fractions of the three dimensions."""

    mode: str = "flops"
    flops: float = DEFAULT_FLOPS
    attn: float = 1.0
    mlp: float = 1.0
    token: float = 1.0

    @classmethod
    def of(cls, mode: str | None, flops: float | None, attn: float | None = None, mlp: float | None = None,
           token: float | None = None) -> "Budget":
        num = _number
        return cls("ratios" if mode == "ratios" else "flops", num(flops, DEFAULT_FLOPS), num(attn, 1.0),
                   num(mlp, 1.0), num(token, 1.0))

    def text(self) -> str:
        if self.mode == "flops":
            return f"FLOPs budget {100 * self.flops:.0f}%"
        return f"attention {100 * self.attn:.0f}%, MLP {100 * self.mlp:.0f}%, tokens {100 * self.token:.0f}%"

    def slug(self) -> str:
        if self.mode == "flops":
            return f"flops{self.flops:.3f}"
        return f"a{self.attn:.2f}-m{self.mlp:.2f}-t{self.token:.2f}"

    def retrain_kwargs(self) -> dict[str, float]:
        if self.mode == "flops":
            return {"flops": self.flops}
        return {"attn": self.attn, "mlp": self.mlp, "token": self.token}


@dataclass
class PlanResult:
    plan: SlimPlan
    note: str  # non-empty when a FLOPs budget could only be approximated


@dataclass
class _Page:
    key: Any          # the budget its live views were last asked for
    t: float          # when they were asked, or answered (the quiet period starts there)
    answered: float   # when the last live call of the page was answered (0: never)
    gap: float = 0.0  # smoothed seconds from an answer to the page's next live call, during a gesture


class PageBudgets:
    """The budget each page (Gradio session) last asked its live views for, and the heavy views it was
    last sent, so that heavy views drawn from slider events can tell when they are out of date.

    The page sends a slider's heavy event only once that slider's live answer is on the page (it asks
    for it, ``Explorer.live_views``), so by the time a heavy call runs, the live call of its own budget has
    been noted: a different budget noted for the session means the slider has moved on, and the page will
    send another heavy event once the live answer for the newer budget has come back.

    How long "quiet" must last adapts to the page: while a slider is dragged, the next live call comes
    as soon as the page has the previous answer, which on a busy server can take longer than the base
    quiet period; twice the page's recent answer-to-next-call gap is waited (at most ``max_quiet``).
    """

    GESTURE_GAP = 1.0  # s: a longer pause between an answer and the next call starts a new gesture

    def __init__(self, max_sessions: int = 4096) -> None:
        self.max_sessions = max_sessions
        self._cond = threading.Condition()
        self._pages: OrderedDict[str, _Page] = OrderedDict()
        self._drawn: OrderedDict[str, Any] = OrderedDict()  # session -> key of the heavy views last sent

    @staticmethod
    def _put(d: OrderedDict, session: str, value: Any, limit: int) -> None:
        d[session] = value
        d.move_to_end(session)
        while len(d) > limit:
            d.popitem(last=False)

    def asked(self, session: str | None, key: Any) -> None:
        """The session's live views are being drawn for budget ``key``."""
        if session is None:
            return
        now = time.monotonic()
        with self._cond:
            page = self._pages.get(session)
            if page is None:
                page = _Page(key, now, 0.0)
            else:
                gap = now - page.answered if page.answered else self.GESTURE_GAP
                page.gap = (gap if not page.gap else 0.5 * (page.gap + gap)) if gap < self.GESTURE_GAP else 0.0
                page.key, page.t = key, now
            self._put(self._pages, session, page, self.max_sessions)
            self._cond.notify_all()

    def answered(self, session: str | None, key: Any) -> None:
        """The live views for ``key`` are done (the quiet period starts again)."""
        if session is None:
            return
        now = time.monotonic()
        with self._cond:
            page = self._pages.get(session)
            if page is not None and page.key == key:
                page.t = page.answered = now
                self._cond.notify_all()

    def settle(self, session: str | None, key: Any, quiet: float, max_quiet: float = 1.0) -> bool:
        """Wait until budget ``key`` has been the session's latest for its quiet period (True), or return
        False as soon as another budget is asked for. The quiet period is ``quiet`` seconds, or twice
        the page's recent answer-to-next-call gap, at most ``max_quiet``: a bounded wait."""
        if session is None:
            return True
        with self._cond:
            while True:
                page = self._pages.get(session)
                if page is None:
                    return True  # no live view of this page seen (an API call): nothing to wait for
                if page.key != key:
                    return False
                left = page.t + min(max_quiet, max(quiet, 2 * page.gap)) - time.monotonic()
                if left <= 0:
                    return True
                self._cond.wait(left)

    def drawn(self, session: str | None, key: Any) -> bool:
        """True if the heavy views last sent to the session were drawn for ``key``."""
        with self._cond:
            return session is not None and self._drawn.get(session) == key

    def mark_drawn(self, session: str | None, key: Any) -> None:
        if session is not None:
            with self._cond:
                self._put(self._drawn, session, key, self.max_sessions)


def _session(request: Any) -> str | None:
    s = getattr(request, "session_hash", None)
    return s if isinstance(s, str) and s else None


# ====================================================================== formatting helpers
def _error_html(msg: str) -> str:
    return f'<div class="vs-error" id="vs-budget-error">{html.escape(msg)}</div>'


def _card(card: Card) -> str:
    cls = "vs-card vs-main" if card.main else "vs-card"
    return (f'<div class="{cls}" id="{card.elem}"><div class="vs-k">{card.key}</div><div class="vs-v">{card.value}'
            f'</div><div class="vs-s">{card.sub}</div></div>')


def readout_html(plan: SlimPlan, note: str = "") -> str:
    """The always-visible numbers of a plan (FLOPs, params, speedup, kept units)."""
    extra = f'<div class="vs-note" id="vs-budget-note">{html.escape(note)}</div>' if note else ""
    rounding = rounding_note(plan)
    if rounding:
        extra += f'<div class="vs-s" style="margin-top:6px">{rounding}</div>'
    stamp = html.escape(budget_stamp(plan), quote=True)
    return (f'<div class="vs-readout" data-stamp="{stamp}">{"".join(_card(c) for c in readout_cards(plan))}</div>'
            f'{extra}')


def layer_table(plan: SlimPlan) -> str:
    """The per-layer architecture as an HTML table (a DataFrame costs ~50 ms per slider move to send)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in layer_rows(plan))
    mflops, pct = table_total(plan)
    foot = (f'<tr class="vs-total"><td colspan="6">total (with patch embedding and head)</td>'
            f"<td>{mflops}</td><td>{pct}</td></tr>")
    return f'<table class="vs-table"><thead><tr>{head}</tr></thead><tbody>{body}{foot}</tbody></table>'


def run_summary(run: OpenRun) -> str:
    """One line about a run's model, shown under the run selector."""
    from vitslim_core.cost import count_cost
    s = run.spec
    name = str((run.scores.model_recipe or {}).get("name") or s.model_name or "model")
    w = "" if run.has_weights else " · **scores only**"
    from vitslim_core.run_folder import run_status
    note = run_status(run.scores)  # an unfinished (stopped or killed) search says so
    w += f" · **{html.escape(note)}**" if note else ""
    c = count_cost(s)
    return (f"`{html.escape(name)}` · {s.depth} blocks · {s.num_heads}×{s.head_dim} attention · MLP {s.mlp_hidden} · "
            f"{s.num_prefix_tokens}+{s.num_patches} tokens · dense {_fmt_flops(c.macs)}FLOPs, "
            f"{_fmt_params(c.params)} params{w}")


def run_info_markdown(run: OpenRun) -> str:
    """The model card of a run: architecture, dense cost, data, search settings, weights."""
    from vitslim_core.cost import count_cost
    s = run.spec
    c = count_cost(s)
    meta = run.scores.meta
    name = str((run.scores.model_recipe or {}).get("name") or s.model_name or "unknown model")
    data = meta.get("data") or {}
    search = meta.get("search") or {}
    ev = meta.get("eval") or {}
    lines = [f"**{html.escape(name)}** &nbsp;·&nbsp; {html.escape(run.label)}", "",
             "| | |", "|---|---|",
             f"| blocks | {s.depth} |",
             f"| attention | {s.num_heads} heads × {s.head_dim} dims ({s.attn_dim}), width {s.embed_dim} |",
             f"| MLP hidden units | {s.mlp_hidden} per block |",
             f"| tokens | {s.num_prefix_tokens} prefix + {s.grid[0]}×{s.grid[1]} patches of "
             f"{s.patch_size[0]}×{s.patch_size[1]} px |",
             f"| dense cost | {_fmt_flops(c.macs)}FLOPs, {_fmt_params(c.params)} params |",
             f"| mask mode | {run.scores.attn_mode} |"]
    if data:
        size = data.get("input_size")
        lines.append(f"| data | {html.escape(str(data.get('name', '?')))}, "
                     f"{html.escape(str(data.get('num_classes', s.num_classes)))} classes, input "
                     f"{'×'.join(html.escape(str(v)) for v in (size if isinstance(size, list) else []))} |")
    if search:
        w = ", ".join(f"{k} {search[k]:g}" for k in ("w_attn", "w_mlp", "w_token") if isinstance(search.get(k), (int, float)))
        lines.append(f"| search | {html.escape(str(search.get('epochs', '?')))} epochs, {w} |")
    if ev.get("top1") is not None:
        lines.append(f"| masked model | top-1 {ev['top1']:.1f}% on the test split |")
    lines.append(f"| weights | {'yes: accuracy, prediction and retraining available' if run.has_weights else '**no** (scores only: budgets and maps work; accuracy, prediction and retraining need model.safetensors)'} |")
    return "\n".join(lines)


# ====================================================================== the explorer
class Explorer:
    """Callbacks of one app instance.

    Args:
        runs: run folders (or score files) to offer; default: the bundled runs (``runs.bundled_runs``:
            Fashion-MNIST first when its data set is installed, else the digits demo).
        workdir: where uploads, exports, sweeps and retraining outputs go (default: a new temp dir).
        job: the retraining job (default: the process-wide ``app.jobs.JOB``).
    """

    def __init__(self, runs: Sequence[str | Path] | None = None, workdir: str | Path | None = None,
                 job: RetrainJob | None = None) -> None:
        from vitslim_core.demo import DEMO_DIR
        runs = list(runs or bundled_runs() or [DEMO_DIR])
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vitslim-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.registry = RunRegistry(runs, self.workdir, bundled=list(bundled_labels()))
        self.job = job or JOB
        self._plans: OrderedDict[tuple, PlanResult] = OrderedDict()
        self._plans_lock = threading.Lock()
        self._warmed = False
        self.pages = PageBudgets()
        self.heavy_quiet = HEAVY_QUIET
        self._heavy_lock = threading.Lock()  # one heavy view drawn at a time
        self._asks = itertools.count(1)

    def warm_up(self) -> None:
        """Load what the page's next views need (samples, weights, plotting) so they appear at once."""
        try:
            run = self.run(None)
            run.samples()
            if run.has_weights:
                run.model()
            viz.history_figure(run.history)  # imports matplotlib
        except Exception:  # noqa: BLE001 - warming up is best effort; the callbacks report errors
            pass

    def page_ready(self) -> str:
        """End of a page's load chain: the first time, load the weights in the background (so the first
        prediction or evaluation is quick) without slowing down the page itself. Returns "ready"."""
        with self._plans_lock:
            first, self._warmed = not self._warmed, True
        if first:
            threading.Thread(target=self.warm_up, daemon=True, name="vitslim-app-warm-up").start()
        return "ready"

    # ------------------------------------------------------------------ runs and plans
    def run(self, run_key: str | None) -> OpenRun:
        return self.registry.get(run_key)

    def plan(self, run: OpenRun, budget: Budget) -> PlanResult:
        """The plan of a budget (cached); raises BudgetError for impossible budgets."""
        key = (run.key, id(run.scores), budget)
        with self._plans_lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)
            if budget.mode == "flops":
                plan = plan_for_flops(run.scores, budget.flops)
            else:
                plan = plan_for_ratios(run.scores, attn=budget.attn, mlp=budget.mlp, token=budget.token)
        note = ""
        if budget.mode == "flops":
            achieved = float(plan.info.get("achieved", plan.flops_ratio))
            if abs(achieved - budget.flops) > DEFAULT_TOL * budget.flops:
                note = (f"Approximation: {100 * budget.flops:.3g}% of the dense FLOPs cannot be hit exactly with "
                        f"whole units; the nearest plan costs {100 * achieved:.3g}%.")
        res = PlanResult(plan, note)
        with self._plans_lock:
            self._plans[key] = res
            while len(self._plans) > 64:
                self._plans.popitem(last=False)
        return res

    def image_for(self, run: OpenRun, image: dict | None) -> dict | None:
        """The session's image if it fits the run's input, else the run's first sample."""
        image = _image_state(image)
        if image is not None:
            t = image["tensor"]
            if tuple(t.shape[1:]) == (run.spec.in_chans, *run.spec.img_size):
                return image
        samples = run.samples()
        return self._image_state(samples[0]) if samples else None

    @staticmethod
    def _image_state(sample: Sample) -> dict:
        return {"name": sample.name, "tensor": sample.tensor, "label": sample.label}

    # ------------------------------------------------------------------ the live view
    def budget_views(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                     layer: float, sort: bool, image: dict | None, view: str = "all",
                     request: gr.Request | None = None) -> tuple:
        """Everything that follows the budget slider, recomputed on every move.

        Args:
            run_key, mode, flops, attn, mlp, token: the run and the budget controls.
            layer: block shown in the image overlay.
            sort: sort units by score in the attention and MLP maps.
            image: the session's image state (None: the run's first sample).
            view: the tab on screen; only its views are drawn (the others are drawn when their tab is
                selected), "all" draws everything.
            request: the page's request (Gradio fills it in): its budget is noted for ``settled_heavy_views``.

        Returns:
            (readout html, attention map, MLP map, token grids, score histograms, layer bars, layer table,
            image overlay, image strip); views not drawn are ``gr.skip()``. On a bad budget the readout
            shows the message and everything else is left as it was.
        """
        session, page_key = _session(request), self._page_key(run_key, mode, flops, attn, mlp, token)
        self.pages.asked(session, page_key)
        try:
            return self._budget_views(run_key, mode, flops, attn, mlp, token, layer, sort, image, view)
        finally:
            self.pages.answered(session, page_key)

    def live_views(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                   layer: float, sort: bool, image: dict | None, view: str = "all",
                   request: gr.Request | None = None) -> tuple:
        """``budget_views`` for a budget slider's change, plus a request for the heavy views.

        Returns:
            ``budget_views``'s outputs and one more: when the tab on screen has heavy views, a new string
            (the page's hidden "heavy views wanted" box changes, which sends ``settled_heavy_views`` once
            this answer is on the page), else ``gr.skip()`` (no heavy event at all).
        """
        out = self.budget_views(run_key, mode, flops, attn, mlp, token, layer, sort, image, view, request)
        ask = gr.skip()
        if _text(view) in HEAVY_VIEWS and 'id="vs-budget-error"' not in out[0]:
            ask = f"{view} {next(self._asks)}"
        return out + (ask,)

    def _budget_views(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                      layer: float, sort: bool, image: dict | None, view: str) -> tuple:
        skip = gr.skip()
        view = _text(view)
        want = set(LIVE_OUTPUTS) if view == "all" else VIEW_OUTPUTS.get(view, set())
        try:
            run = self.run(run_key)
            res = self.plan(run, Budget.of(mode, flops, attn, mlp, token))
            img = self.image_for(run, image) if want & {"overlay", "strip"} else None
        except VitSlimError as e:
            return (_error_html(_one_line(e)),) + (skip,) * 8
        plan, sc = res.plan, run.scores
        draw = {"attention": lambda: viz.attention_map(sc, plan, sort=bool(sort)),
                "mlp": lambda: viz.mlp_map(sc, plan, sort=bool(sort)),
                "tokens": lambda: viz.token_grids(sc, plan),
                "scores": lambda: viz.score_histograms(sc, plan),
                "bars": lambda: viz.layer_bars(plan),
                "table": lambda: layer_table(plan)}
        out = [readout_html(plan, res.note)] + [draw[k]() if k in want else skip for k in LIVE_OUTPUTS[1:7]]
        overlay = strip = skip
        if want & {"overlay", "strip"}:
            if img is not None:
                overlay = viz.token_overlay(img["tensor"], plan, _index(layer), run.data_cfg)
                strip = viz.token_strip(img["tensor"], plan, run.data_cfg)
        return tuple(out) + (overlay, strip)

    def show_view(self, view: str, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                  layer: float, sort: bool, image: dict | None) -> tuple:
        """A tab was selected: remember it and draw its views. Returns (view,) + ``budget_views``."""
        view = _text(view)
        return (view,) + self.budget_views(run_key, mode, flops, attn, mlp, token, layer, sort, image, view)

    @staticmethod
    def _page_key(run_key: Any, mode: str, flops: float, attn: float, mlp: float, token: float) -> tuple:
        return (run_key if isinstance(run_key, str) else None, Budget.of(mode, flops, attn, mlp, token))

    def _heavy_key(self, view: str, run_key: Any, mode: str, flops: float, attn: float, mlp: float, token: float,
                   image: dict | None, evals: list[dict] | None) -> tuple:
        """Everything the heavy views of ``view`` depend on (two equal keys draw the same pictures)."""
        key: tuple = (view,) + self._page_key(run_key, mode, flops, attn, mlp, token)
        if view == "image":
            img = _image_state(image)
            key += ((img["name"], id(img["tensor"])) if img else None,)
        elif view == "accuracy":
            try:
                done = len(self.job.results_for(self.run(run_key).key))
            except VitSlimError:
                done = -1
            key += (len(_eval_rows(evals)), done)
        return key

    def heavy_views(self, view: str, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                    image: dict | None, evals: list[dict] | None, request: gr.Request | None = None) -> tuple:
        """What is too slow for every slider move, only for the tab on screen: the prediction, the accuracy
        figure, the score histograms. Each names the budget it was drawn for (``budget_stamp``): the
        prediction in its caption, the figures in their labels. One heavy view is drawn at a time (all
        pages together), so they take at most one core from the live views.

        Returns:
            (prediction label, prediction caption, accuracy figure, score histogram figure), ``gr.skip()``
            for those not on screen.
        """
        view = _text(view)
        if view not in HEAVY_VIEWS:
            return (gr.skip(),) * 4
        key = self._heavy_key(view, run_key, mode, flops, attn, mlp, token, image, evals)
        with self._heavy_lock:
            out = self._draw_heavy(view, run_key, mode, flops, attn, mlp, token, image, evals)
            self.pages.mark_drawn(_session(request), key)
        return out

    def settled_heavy_views(self, view: str, run_key: str, mode: str, flops: float, attn: float, mlp: float,
                            token: float, image: dict | None, evals: list[dict] | None,
                            request: gr.Request | None = None) -> tuple:
        """``heavy_views`` for the budget sliders' events (after every change, and on release).

        Draws once the page's budget has stayed the same for ``heavy_quiet`` seconds; leaves everything
        as it is (``gr.skip()``) when the slider has moved on meanwhile (the page sends the newer budget
        next) or when the page already shows these views for this budget (a release after the change).
        The wait holds no lock: other pages' heavy views are drawn meanwhile.
        """
        skip = (gr.skip(),) * 4
        view = _text(view)
        if view not in HEAVY_VIEWS:
            return skip
        session, page_key = _session(request), self._page_key(run_key, mode, flops, attn, mlp, token)
        if not self.pages.settle(session, page_key, self.heavy_quiet, HEAVY_QUIET_MAX):
            return skip
        key = self._heavy_key(view, run_key, mode, flops, attn, mlp, token, image, evals)
        with self._heavy_lock:  # checked again: the slider may have moved while another page's view was drawn
            if not self.pages.settle(session, page_key, 0.0, 0.0) or self.pages.drawn(session, key):
                return skip
            out = self._draw_heavy(view, run_key, mode, flops, attn, mlp, token, image, evals)
            self.pages.mark_drawn(session, key)
        return out

    def _draw_heavy(self, view: str, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                    image: dict | None, evals: list[dict] | None) -> tuple:
        skip = gr.skip()
        pred = pred_md = acc = hist = skip
        if view == "image":
            pred, pred_md = self.predict(run_key, mode, flops, attn, mlp, token, image)
        elif view == "accuracy":
            acc = self._labelled(self.accuracy_figure(run_key, mode, flops, attn, mlp, token, evals),
                                 "accuracy vs FLOPs; dashed line: ", run_key, mode, flops, attn, mlp, token)
        elif view == "scores":
            hist = self._labelled(self.score_figure(run_key, mode, flops, attn, mlp, token),
                                  "score histograms at ", run_key, mode, flops, attn, mlp, token)
        return pred, pred_md, acc, hist

    def _labelled(self, fig: Any, prefix: str, run_key: str, mode: str, flops: float, attn: float, mlp: float,
                  token: float) -> Any:
        """``fig`` with a label that names the budget it was drawn for (``gr.skip()`` stays a skip)."""
        if isinstance(fig, dict) and fig == gr.skip():
            return fig
        try:
            plan = self.plan(self.run(run_key), Budget.of(mode, flops, attn, mlp, token)).plan
        except VitSlimError:
            return fig
        return gr.update(value=fig, label=prefix + budget_stamp(plan))

    def overlay_views(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                      layer: float, image: dict | None) -> tuple:
        """The image overlay and strip only (layer slider, new image)."""
        try:
            run = self.run(run_key)
            plan = self.plan(run, Budget.of(mode, flops, attn, mlp, token)).plan
            img = self.image_for(run, image)
        except VitSlimError:
            return gr.skip(), gr.skip()
        if img is None:
            return None, None
        return (viz.token_overlay(img["tensor"], plan, _index(layer), run.data_cfg),
                viz.token_strip(img["tensor"], plan, run.data_cfg))

    def score_figure(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float) -> Any:
        """The matplotlib histograms (heavier; drawn when the slider is released)."""
        try:
            run = self.run(run_key)
            plan = self.plan(run, Budget.of(mode, flops, attn, mlp, token)).plan
        except VitSlimError:
            return gr.skip()
        return viz.score_histograms_figure(run.scores, plan)

    # ------------------------------------------------------------------ opening runs
    def open_run(self, run_key: str, image: dict | None, layer: float, view: str = "history") -> tuple:
        """Switch the page to a run: model card, history, accuracy curve, samples, layer range.

        Args:
            view: the tab on screen; the history figure (matplotlib) is drawn only for the History tab
                (``history_view`` draws it when that tab is selected), so a page opens without it.

        Returns:
            (model card markdown, history figure or ``gr.skip()``, gallery items, image state, layer
            slider update, message markdown: the model in one line, or why the run cannot be opened)
        """
        try:
            run = self.run(run_key)
            samples = run.samples()
            img = self.image_for(run, image)
        except VitSlimError as e:
            gr.Warning(_one_line(e))
            return (gr.skip(),) * 5 + (f"**Cannot open this run:** {html.escape(_one_line(e))}",)
        gallery = [s.thumb for s in samples]  # names appear under the prediction once picked
        depth = run.spec.depth
        layer_update = gr.update(maximum=depth - 1, value=min(_index(layer), depth - 1))
        history = viz.history_figure(run.history) if _text(view) == "history" else gr.skip()
        return run_info_markdown(run), history, gallery, img, layer_update, run_summary(run)

    def history_view(self, run_key: str) -> Any:
        """The search history figure of a run (the History tab was selected)."""
        try:
            return viz.history_figure(self.run(run_key).history)
        except VitSlimError as e:
            gr.Warning(_one_line(e))
            return gr.skip()

    def upload_run(self, files: list[str] | str | None) -> tuple:
        """Open uploaded files as a run (a score file; weights and history.json optional).

        Returns:
            (run dropdown update, message markdown)
        """
        if not files:
            return gr.skip(), ""
        files = list(files) if isinstance(files, (list, tuple)) else [files]
        try:
            run = self.registry.add_upload([getattr(f, "name", f) for f in files])
        except VitSlimError as e:
            msg = _one_line(e)
            gr.Warning(msg)
            return gr.skip(), f"**Upload rejected:** {html.escape(msg)}"
        choices = self.registry.startup_choices()
        if (run.label, run.key) not in choices:
            choices = choices + [(run.label, run.key)]
        note = "" if run.has_weights else " (scores only: accuracy, prediction and retraining need the weights)"
        return gr.update(choices=choices, value=run.key), f"Opened **{html.escape(run.label)}**{note}."

    # ------------------------------------------------------------------ images
    def pick_sample(self, run_key: str, index: int) -> dict | None:
        """The image state of the run's sample ``index`` (gr.Error for a run that cannot be opened)."""
        try:
            samples = self.run(run_key).samples()
        except VitSlimError as e:
            raise gr.Error(_one_line(e)) from None
        if not samples:
            return None
        return self._image_state(samples[_index(index) % len(samples)])

    def on_gallery_select(self, run_key: str, evt: gr.SelectData) -> dict | None:
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) and evt.index else evt.index
        return self.pick_sample(run_key, index)

    def upload_image(self, run_key: str, path: str | None, image: dict | None) -> tuple[dict | None, str]:
        """Preprocess an uploaded image like the model's data (any size, grayscale or RGBA).

        Returns:
            (image state, message markdown); on a bad file the old image stays.
        """
        if not path:
            return gr.skip(), ""
        path = getattr(path, "name", path)
        from vitslim_core.data import image_to_tensor, load_image
        try:
            if not isinstance(path, (str, Path)) or "\x00" in str(path):
                raise DataError(f"an image upload is a file path, not {str(path)[:40]!r}")
            path = str(path)
            run = self.run(run_key)
            img = load_image(path)
            w, h = img.size
            x = image_to_tensor(img, run.data_cfg, dataset=run.dataset_name)
        except (VitSlimError, OSError, ValueError) as e:
            msg = _one_line(e)
            if isinstance(path, str) and len(path) > 1:  # the server's temp path is nobody's business
                msg = msg.replace(str(Path(path).parent) + os.sep, "")
            gr.Warning(f"This image cannot be used: {msg}")
            return image, f"**Image rejected:** {html.escape(msg)}"
        name = Path(path).name
        return ({"name": f"your image {name} ({w}×{h}, {img.mode})", "tensor": x, "label": None},
                f"Using **{html.escape(name)}** ({w}×{h} {img.mode}), resized and normalised like the model's data.")

    def predict(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                image: dict | None) -> tuple[dict | None, str]:
        """Top-3 classes of the slim model at this budget for the current image.

        Returns:
            (label dict for ``gr.Label`` or None, caption markdown)
        """
        try:
            run = self.run(run_key)
            plan = self.plan(run, Budget.of(mode, flops, attn, mlp, token)).plan
            img = self.image_for(run, image)
            if img is None:
                return None, "No image."
            model = run.model()
        except MissingWeightsError:
            return None, f"_{html.escape(self.run(run_key).missing_weights_message('Prediction'))}._"
        except VitSlimError as e:
            return None, f"**{html.escape(_one_line(e))}**"
        import torch

        from vitslim_core.slim import slim_model
        slim = slim_model(model, plan).eval()
        with torch.inference_mode():
            prob = torch.softmax(slim(img["tensor"]).float(), dim=-1)[0]
        names = run.scores.class_names
        top = torch.topk(prob, k=min(3, prob.numel()))
        label = {(names[i] if i < len(names) else str(i)): float(p) for p, i in zip(top.values.tolist(),
                                                                                  top.indices.tolist())}
        truth = ""
        if img.get("label") is not None:
            t = int(img["label"])
            truth = f" True class: **{html.escape(names[t] if t < len(names) else str(t))}**."
        return label, f"Slim model at {budget_stamp(plan)}, on *{html.escape(img['name'])}*.{truth}"

    # ------------------------------------------------------------------ latency
    def measure_speed(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                      progress: gr.Progress = gr.Progress()) -> str:
        """Time the physically slimmed model against the dense one on this machine (CPU)."""
        from vitslim_core.bench import measure_latency
        from vitslim_core.masks import remove_masks
        from vitslim_core.slim import slim_model
        try:
            run = self.run(run_key)
            plan = self.plan(run, Budget.of(mode, flops, attn, mlp, token)).plan
            weights = run.has_weights
            base = run.model() if weights else run.dense_architecture()
        except VitSlimError as e:
            return f"**{html.escape(_one_line(e))}**"
        progress(0.1, desc="slimming")
        slim = slim_model(base, plan, fold_scores=weights)
        import copy
        dense = remove_masks(copy.deepcopy(base)) if weights else base
        batch = 32 if plan.cost.dense_macs < 2e9 else 8
        runs = 10 if plan.cost.dense_macs < 2e9 else 3
        progress(0.3, desc="timing the dense model")
        d = measure_latency(dense, batch_size=batch, runs=runs, warmup=2)
        progress(0.65, desc="timing the slim model")
        s = measure_latency(slim, batch_size=batch, runs=runs, warmup=2)
        measured = d["median_ms"] / s["median_ms"]
        predicted = 1.0 / plan.flops_ratio
        src = "" if weights else " (random weights: the run has no model.safetensors, timing does not depend on them)"
        return (f"**measured speedup {measured:.2f}×** (predicted from FLOPs {predicted:.2f}×): dense "
                f"{d['median_ms']:.1f} ms, slim {s['median_ms']:.1f} ms per batch of {batch} on CPU "
                f"with {d['threads']} threads{src}. Small models are dominated by fixed overheads, so the "
                f"measured speedup stays below the FLOPs prediction.")

    # ------------------------------------------------------------------ accuracy
    def accuracy_figure(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                        evals: list[dict] | None) -> Any:
        """Accuracy vs FLOPs: the run's sweep, the session's evaluations, retrained models, the current budget."""
        try:
            run = self.run(run_key)
        except VitSlimError:
            return gr.skip()
        rows = read_sweep(run, self.workdir)
        current: dict | None = None
        try:
            current = {"flops_ratio": self.plan(run, Budget.of(mode, flops, attn, mlp, token)).plan.flops_ratio}
        except VitSlimError:
            current = None
        extra = [e for e in _eval_rows(evals) if e["run_key"] == run.key]
        extra += self.job.results_for(run.key)
        return viz.accuracy_curve_figure(rows, current=current, extra=extra)

    def accuracy_note(self, run_key: str) -> str:
        try:
            run = self.run(run_key)
        except VitSlimError as e:
            return f"**{html.escape(_one_line(e))}**"
        try:
            run.check_data("Evaluating or retraining here")
            no_data = ""
        except DataError as e:
            no_data = f" **{html.escape(_one_line(e))}.**"
        if read_sweep(run, self.workdir) is None:
            if not run.has_weights:
                return f"_No sweep.json for this run, and {html.escape(run.missing_weights_message('computing one'))}._"
            return ("_This run has no accuracy curve yet (`sweep.json`). Press **Compute the curve** to slim and "
                    "evaluate the model at 30%, 40%, ..., 100% FLOPs (no retraining)._" + no_data)
        return ("The curve shows the slimmed model **without retraining** at several budgets; retraining "
                "recovers much of the lost accuracy." + no_data)

    def _evaluate_model(self, run: OpenRun, model: Any, progress: Any = None) -> dict[str, float]:
        from vitslim_core.train import evaluate
        test = run.data().test

        def report(i: int, n: int) -> None:
            progress((i, n), desc="evaluating on the test split")
        return evaluate(model, test, batch_size=128, device="cpu", progress=report if progress is not None else None)

    def evaluate_budget(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                        evals: list[dict] | None, progress: gr.Progress = gr.Progress()) -> tuple[str, Any, list[dict]]:
        """Slim the searched model to this budget and measure its test accuracy (no retraining).

        Returns:
            (result markdown, accuracy figure, updated list of this session's evaluations)
        """
        evals = _eval_rows(evals)
        try:
            run = self.run(run_key)
            budget = Budget.of(mode, flops, attn, mlp, token)
            plan = self.plan(run, budget).plan
            model = run.model()
            run.check_data("Evaluating")
            from vitslim_core.slim import slim_model
            progress(0.0, desc="slimming")
            slim = slim_model(model, plan)
            ev = self._evaluate_model(run, slim, progress)
        except MissingWeightsError:
            msg = self.run(run_key).missing_weights_message("Evaluating")
            gr.Warning(msg)
            return f"**{html.escape(msg)}.**", gr.skip(), evals
        except (VitSlimError, DataError) as e:
            gr.Warning(_one_line(e))
            return f"**{html.escape(_one_line(e))}**", gr.skip(), evals
        evals.append({"run_key": run.key, "flops_ratio": plan.flops_ratio, "top1": ev["top1"],
                      "kind": "evaluated here (no retraining)"})
        md = (f"**top-1 {ev['top1']:.2f}%**, top-5 {ev['top5']:.2f}% on {ev['n']} test images at "
              f"{100 * plan.flops_ratio:.1f}% FLOPs ({html.escape(budget.text())}), slimmed without retraining.")
        return md, self.accuracy_figure(run_key, mode, flops, attn, mlp, token, evals), evals

    def evaluate_value(self, run: OpenRun, budget: Budget) -> dict[str, float]:
        """Evaluate without the UI (the /evaluate endpoint)."""
        from vitslim_core.slim import slim_model
        plan = self.plan(run, budget).plan
        run.check_data("Evaluating")
        ev = self._evaluate_model(run, slim_model(run.model(), plan))
        return {**ev, "flops_ratio": plan.flops_ratio, "params": plan.params}

    def compute_sweep(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                      evals: list[dict] | None, progress: gr.Progress = gr.Progress()) -> tuple[str, Any]:
        """Run ``vitslim_core.sweep.sweep`` on the run and write sweep.json (run folder or work dir)."""
        from vitslim_core.sweep import DEFAULT_BUDGETS, sweep, write_sweep
        try:
            run = self.run(run_key)
            if not run.has_weights:
                raise MissingWeightsError(run.missing_weights_message("The accuracy curve"))
            run.check_dataset()
            run.check_data("Computing the curve")
            progress(0.0, desc="slimming and evaluating")

            def cb(i: int, n: int, row: dict) -> None:
                progress((i, n), desc=f"budget {row['target']:.0%}: top-1 {row['top1']:.1f}%")
            rows = sweep(run.folder, budgets=DEFAULT_BUDGETS, progress=cb, data_root=run_registry.DATA_ROOT)
            out = sweep_file(run, self.workdir)
            write_sweep(rows, out.parent)
        except VitSlimError as e:
            gr.Warning(_one_line(e))
            return f"**{html.escape(_one_line(e))}**", gr.skip()
        return (f"Wrote the curve ({len(rows)} budgets) to `{out}`.",
                self.accuracy_figure(run_key, mode, flops, attn, mlp, token, evals))

    # ------------------------------------------------------------------ export
    def _export_dir(self, run: OpenRun, budget: Budget) -> Path:
        import hashlib
        h = hashlib.sha256(run.key.encode()).hexdigest()[:10]
        d = self.workdir / "exports" / f"{Path(run.key).name[:40]}-{h}" / budget.slug()
        d.mkdir(parents=True, exist_ok=True)
        return d

    def export_plan(self, run_key: str, mode: str, flops: float, attn: float, mlp: float,
                    token: float) -> tuple[str | None, str]:
        """Write the plan of this budget as JSON; returns (file path, message)."""
        try:
            run = self.run(run_key)
            budget = Budget.of(mode, flops, attn, mlp, token)
            plan = self.plan(run, budget).plan
            path = plan.save(self._export_dir(run, budget) / "plan.json")
        except VitSlimError as e:
            gr.Warning(_one_line(e))
            return None, f"**{html.escape(_one_line(e))}**"
        return str(path), (f"Plan for {html.escape(budget.text())}: {100 * plan.flops_ratio:.1f}% FLOPs. Use it with "
                           f"`vitslim slim RUN --plan plan.json` or `SlimPlan.load('plan.json')`.")

    def export_slim(self, run_key: str, mode: str, flops: float, attn: float, mlp: float,
                    token: float) -> tuple[str | None, str]:
        """Slim the model to this budget and zip the ``save_slim`` folder; returns (zip path, message)."""
        import shutil

        from vitslim_core.slim import save_slim, slim_model
        try:
            run = self.run(run_key)
            budget = Budget.of(mode, flops, attn, mlp, token)
            plan = self.plan(run, budget).plan
            model = run.model()
            slim = slim_model(model, plan)
            slim.slim_data = run.data_cfg | {"class_names": run.scores.class_names}
            d = self._export_dir(run, budget)
            save_slim(slim, d / "slim")
            zip_path = shutil.make_archive(str(d / f"slim-{budget.slug()}"), "zip", root_dir=d / "slim")
        except MissingWeightsError:
            msg = self.run(run_key).missing_weights_message("The slim model")
            gr.Warning(msg)
            return None, f"**{html.escape(msg)}.**"
        except VitSlimError as e:
            gr.Warning(_one_line(e))
            return None, f"**{html.escape(_one_line(e))}**"
        return zip_path, (f"Slim model at {100 * plan.flops_ratio:.1f}% FLOPs, {_fmt_params(plan.params)} params "
                          f"(not retrained). Unzip and load it with `vitslim_core.slim.load_slim(folder)`.")

    # ------------------------------------------------------------------ retraining
    def start_retrain(self, run_key: str, mode: str, flops: float, attn: float, mlp: float, token: float,
                      epochs: float, lr: float, distill: bool, max_steps: float,
                      progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """Start retraining the slim model of this budget and follow it until it ends.

        Yields:
            (status markdown, training curve figure, download files, accuracy figure or skip)
        """
        try:
            run = self.run(run_key)
            if not run.has_weights:
                raise MissingWeightsError(run.missing_weights_message("Retraining"))
            run.check_dataset()
            run.check_data("Retraining")
            budget = Budget.of(mode, flops, attn, mlp, token)
            self.plan(run, budget)  # fail early on impossible budgets
            nan = float("nan")
            epochs_f = _number(epochs, nan) if epochs is not None else 1.0
            steps_f, lr_f = _number(max_steps or 0, nan), _number(lr, nan) if lr is not None else 2e-4
            if not (1 <= epochs_f <= 10_000 and 0 <= steps_f <= 1e9 and 0 < lr_f < 1):
                raise VitSlimError("epochs must be 1 to 10000, max steps >= 0 and the learning rate in (0, 1)")
            epochs_i, steps_i = int(epochs_f), int(steps_f)
            # a random part: other users of the app cannot guess the folder (and download its files)
            out = self.workdir / "retrain" / f"job-{time.strftime('%Y%m%d-%H%M%S')}-{budget.slug()}-{secrets.token_hex(6)}"
            req = RetrainRequest(run_key=run.key, run_label=run.label, out=out, budget=budget.retrain_kwargs(),
                                 budget_text=budget.text(), epochs=epochs_i, lr=lr_f, distill=bool(distill),
                                 max_steps=steps_i, evaluate=lambda m: self._evaluate_model(run, m)["top1"])
            job_id = self.job.start(req)
        except JobBusyError as e:
            gr.Warning(str(e))
            yield (f"**Busy:** {html.escape(str(e))}", gr.skip(), gr.skip(), gr.skip())
            return
        except VitSlimError as e:
            gr.Warning(_one_line(e))
            yield (f"**{html.escape(_one_line(e))}**", gr.skip(), gr.skip(), gr.skip())
            return
        last_n = -1
        while True:
            st = self.job.status()
            if st.job_id != job_id:
                break
            if st.total_steps:
                progress((st.step, st.total_steps), desc=f"retraining: step {st.step}/{st.total_steps}")
            else:
                progress(0.0, desc="starting (loading the model and data)")
            n = len(st.log) + len(st.evals)
            if not st.active:
                break
            if n != last_n:
                last_n = n
                yield (self._status_md(st), viz.training_curve_figure(st.history(), st.total_steps or None),
                       gr.skip(), gr.skip())
            else:
                yield (self._status_md(st), gr.skip(), gr.skip(), gr.skip())
            time.sleep(0.4)
        files = [p for p in (st.zip_path, st.program_path) if p]
        yield (self._status_md(st), viz.training_curve_figure(st.history(), st.total_steps or None),
               files or None, self.accuracy_figure(run_key, mode, flops, attn, mlp, token, None))

    def stop_retrain(self) -> str:
        """Ask the running job to stop (it saves a checkpoint and packages what it has)."""
        if self.job.stop():
            return "**Stopping** after the current step; the model trained so far will be offered for download."
        return "No retraining job is running."

    def _status_md(self, st: JobStatus) -> str:
        if st.state == "idle":
            return "No retraining job has run in this app yet."
        head = f"Job {st.job_id} ({html.escape(st.run_label)}, {html.escape(st.budget)}): "
        if st.active:
            loss = f", loss {st.log[-1]['loss']:.3f}" if st.log else ""
            return f"{head}**{st.state}**, step {st.step}/{st.total_steps or '?'}{loss}. {html.escape(st.note)}"
        if st.state == "failed":
            return f"{head}**failed**: {html.escape(st.error)}"
        acc = f"top-1 **{st.top1:.2f}%**" if st.top1 is not None else "accuracy not measured"
        took = f" in {st.finished - st.started:.0f} s" if st.finished else ""
        word = "finished" if st.state == "done" else "stopped early"
        note = f" ({html.escape(st.note)})" if st.note else ""
        return (f"{head}**{word}**{took} after {st.step} steps: {acc} at {100 * (st.flops_ratio or 0):.1f}% FLOPs. "
                f"Download the slim model below{note}.")

    def job_status(self) -> str:
        """One line about the shared job (polled by every open page)."""
        st = self.job.status()
        if st.state == "idle":
            return "Retraining: idle."
        if st.active:
            return (f"Retraining is **busy**: job {st.job_id} ({html.escape(st.run_label)}, {html.escape(st.budget)}) "
                    f"at step {st.step}/{st.total_steps or '?'}. Only one job runs at a time.")
        return f"Retraining: idle (last job {st.job_id} {st.state})."

    # ------------------------------------------------------------------ URL state
    def url_state(self, query: dict[str, str]) -> dict[str, Any]:
        """Read ``?flops=0.6&view=tokens`` (and mode, attn, mlp, token, layer, run) from the page URL.

        Anything else, and values that are not plain short text (numbers outside their range are
        clipped, non-finite ones dropped), are ignored: the URL is whatever a link says."""
        query = {k: v for k, v in query.items() if isinstance(k, str) and isinstance(v, str) and len(v) <= 256} \
            if isinstance(query, dict) else {}

        def num(k: str, lo: float, hi: float) -> float | None:
            try:
                v = float(query[k])
            except (KeyError, TypeError, ValueError, OverflowError):
                return None
            return min(hi, max(lo, v)) if math.isfinite(v) else None
        out: dict[str, Any] = {}
        for k in ("flops", "attn", "mlp", "token"):
            v = num(k, 0.01, 1.0)
            if v is not None:
                out[k] = v
        mode = query.get("mode")
        if mode in ("flops", "ratios"):
            out["mode"] = mode
        elif any(k in out for k in ("attn", "mlp", "token")) and "flops" not in out:
            out["mode"] = "ratios"
        lay = num("layer", 0, 10_000)
        if lay is not None:
            out["layer"] = int(lay)
        view = query.get("view")
        if view in VIEWS:
            out["view"] = view
        run = query.get("run")
        if run:
            for label, key in self.registry.startup_choices():
                if run in (label, Path(key).name):
                    out["run"] = key
        return out

    def on_load(self, request: gr.Request) -> tuple:
        """Apply the URL's state to the controls when a page opens.

        Returns:
            updates of (run, mode, flops, attn, mlp, token, layer, tabs) and the view on screen.
        """
        try:
            q = dict(getattr(request, "query_params", {}) or {}) if request is not None else {}
        except (TypeError, ValueError):
            q = {}
        st = self.url_state(q)
        upd = lambda k: gr.update(value=st[k]) if k in st else gr.skip()  # noqa: E731
        tabs = gr.Tabs(selected=st["view"]) if "view" in st else gr.skip()
        return (upd("run"), upd("mode"), upd("flops"), upd("attn"), upd("mlp"), upd("token"), upd("layer"), tabs,
                st.get("view", "attention"))

    # ------------------------------------------------------------------ API endpoints
    def api_set_budget(self, flops: float) -> dict:
        """Plan the default run for a FLOPs budget (fraction of dense FLOPs, in (0, 1]).

        Returns the plan summary: flops, gflops, flops_ratio, params, kept fractions and per-layer kept
        counts (heads, dims per head, MLP units, tokens, MACs), plus "note" when approximated.
        """
        try:
            run = self.run(None)
            res = self.plan(run, Budget.of("flops", flops))
        except VitSlimError as e:
            raise gr.Error(_one_line(e)) from None
        return {**res.plan.summary(), "note": res.note, "run": run.label}

    def api_set_ratios(self, attn: float, mlp: float, token: float) -> dict:
        """Plan the default run by kept fractions of attention dims, MLP units and tokens (each in (0, 1]).

        Returns the same summary as /set_budget.
        """
        try:
            run = self.run(None)
            res = self.plan(run, Budget.of("ratios", None, attn, mlp, token))
        except VitSlimError as e:
            raise gr.Error(_one_line(e)) from None
        return {**res.plan.summary(), "note": res.note, "run": run.label}

    def api_token_overlay(self, image: str | None, layer: float, budget: float) -> np.ndarray:
        """Token mask of the default run on an image: patches dropped before block ``layer`` are dimmed,
        at FLOPs budget ``budget``. Returns the overlay image."""
        if not image:
            raise gr.Error("give an image")
        from vitslim_core.data import image_to_tensor, load_image
        try:
            if not isinstance(image, (str, Path)) or "\x00" in str(image):
                raise DataError("give the image as a file")
            run = self.run(None)
            plan = self.plan(run, Budget.of("flops", budget)).plan
            x = image_to_tensor(load_image(image), run.data_cfg, dataset=run.dataset_name)
        except (VitSlimError, OSError, ValueError) as e:
            msg = _one_line(e)
            if isinstance(image, (str, Path)) and len(str(image)) > 1:  # the server's temp path is its own
                msg = msg.replace(str(Path(image).parent) + os.sep, "")
            raise gr.Error(msg) from None
        return viz.token_overlay(x, plan, _index(layer), run.data_cfg)

    def api_evaluate(self, budget: float) -> dict:
        """Test accuracy of the default run's searched model slimmed to FLOPs ratio ``budget`` (no retraining).

        Returns top1, top5 (percent), loss, n (images), flops_ratio and params.
        """
        try:
            run = self.run(None)
            return self.evaluate_value(run, Budget.of("flops", budget))
        except VitSlimError as e:
            raise gr.Error(_one_line(e)) from None
