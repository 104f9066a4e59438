"""Jupyter widgets over a search run: the notebook twin of the Gradio explorer.

One line in a notebook::

    from vitslim_app.widgets import SlimPanel
    SlimPanel("runs/digits")        # or SlimPanel() for a bundled run (Fashion-MNIST or the digits demo)

The panel shows the same pictures as the app (``vitslim_core.viz``), computes the same plans
(``plan_for_flops`` / ``plan_for_ratios``), opens runs the same way (``app.runs``) and retrains through
``vitslim_core.retrain.retrain`` in a background thread. It needs ipywidgets, not Gradio.

Views are drawn only for the tab on screen (the others are drawn when their tab is selected), as
numpy images sent as PNG bytes; the budget sliders use ``continuous_update=False`` so a drag redraws
once, on release. Every control is an attribute (``panel.flops``, ``panel.layer``, ``panel.start_button``...)
and every action a method, so tests drive the panel without a browser.
"""
from __future__ import annotations

import html
import io
import math
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np

from vitslim_core import viz
from vitslim_core.errors import VitSlimError
from vitslim_core.plan import DEFAULT_TOL, BudgetWarning, SlimPlan, plan_for_flops, plan_for_ratios, removal_order

from .runs import MissingWeightsError, OpenRun, RunRegistry, bundled_labels, default_run, read_sweep
from .views import TABLE_HEADERS, Card, layer_rows, one_line as _one_line, readout_cards, rounding_note, table_total

TABS = ("attention", "mlp", "tokens", "layers", "scores", "image", "accuracy", "history", "retrain")
TAB_TITLES = {"attention": "Attention", "mlp": "MLP", "tokens": "Tokens", "layers": "Layers", "scores": "Scores",
              "image": "Image", "accuracy": "Accuracy", "history": "History", "retrain": "Retrain"}
DEFAULT_FLOPS = 0.6
CURVE_EVERY_S = 2.0  # redraw the live training curve at most this often (drawing runs in the training thread)


# ====================================================================== small pure helpers
@dataclass(frozen=True)
class PanelBudget:
    """What the budget controls say: a FLOPs ratio, or kept fractions of the three dimensions."""

    mode: str = "flops"
    flops: float = DEFAULT_FLOPS
    attn: float = 1.0
    mlp: float = 1.0
    token: float = 1.0

    def text(self) -> str:
        if self.mode == "flops":
            return f"FLOPs budget {100 * self.flops:.0f}%"
        return f"attention {100 * self.attn:.0f}%, MLP {100 * self.mlp:.0f}%, tokens {100 * self.token:.0f}%"

    def slug(self) -> str:
        return f"flops{self.flops:.3f}" if self.mode == "flops" else f"a{self.attn:.2f}-m{self.mlp:.2f}-t{self.token:.2f}"

    def retrain_kwargs(self) -> dict[str, float]:
        return {"flops": self.flops} if self.mode == "flops" else {"attn": self.attn, "mlp": self.mlp,
                                                                   "token": self.token}


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) uint8 image (fast compression: these are redrawn on every slider release)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """PNG of a matplotlib Figure made by ``vitslim_core.viz`` (no pyplot, nothing to close)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


_CARD = ("display:inline-block;min-width:118px;margin:0 8px 6px 0;padding:6px 10px;border:1px solid #d0d7de;"
         "border-radius:6px;vertical-align:top;background:#fff")


def _card(card: Card) -> str:
    color = "#2166ac" if card.main else "#24292f"
    return (f'<div style="{_CARD}"><div style="font-size:11px;color:#57606a">{card.key}</div>'
            f'<div style="font-size:{18 if card.main else 15}px;font-weight:600;color:{color}">{card.value}</div>'
            f'<div style="font-size:11px;color:#57606a">{card.sub}</div></div>')


def readout_html(plan: SlimPlan, note: str = "") -> str:
    """The numbers of a plan: FLOPs, predicted speedup, parameters and kept units."""
    extra = f'<div style="color:#9a6700;font-size:12px">{html.escape(note)}</div>' if note else ""
    rounding = rounding_note(plan)
    if rounding:
        extra += f'<div style="color:#57606a;font-size:12px">{rounding}</div>'
    return f'<div class="vs-readout">{"".join(_card(c) for c in readout_cards(plan))}</div>{extra}'


def error_html(msg: str) -> str:
    return (f'<div class="vs-error" style="color:#cf222e;font-weight:600;padding:6px 0">'
            f"{html.escape(msg)}</div>")


def layer_table_html(plan: SlimPlan) -> str:
    """The per-layer architecture as an HTML table, with the total (patch embedding and head included)."""
    td = "padding:2px 10px;text-align:right;border-bottom:1px solid #eaeef2"
    head = "".join(f'<th style="{td};color:#57606a">{html.escape(h)}</th>' for h in TABLE_HEADERS)
    body = "".join("<tr>" + "".join(f'<td style="{td}">{html.escape(str(v))}</td>' for v in row) + "</tr>"
                   for row in layer_rows(plan))
    mflops, pct = table_total(plan)
    foot = (f'<tr style="font-weight:600"><td style="{td}" colspan="6">total (with patch embedding and head)</td>'
            f'<td style="{td}">{mflops}</td><td style="{td}">{pct}</td></tr>')
    return (f'<table class="vs-table" style="border-collapse:collapse;font-size:12px">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}{foot}</tbody></table>")


# ====================================================================== the panel
class SlimPanel:
    """An ipywidgets panel over one search run.

    Args:
        run: a run folder (``scores.safetensors``, optionally ``model.safetensors`` and ``history.json``)
            or a score file; default: a bundled run (``vitslim_app.runs.default_run``: the Fashion-MNIST
            run when its data set is installed, else the digits demo).
        flops: the FLOPs budget shown first.
        workdir: where retraining writes its outputs (default: a new temporary folder).
        device: device for evaluation and retraining ("cpu", "cuda", "auto").

    Attributes:
        mode, flops, attn, mlp, token, sort: the budget controls.
        readout, table: HTML of the plan's numbers and of its per-layer architecture.
        images: the ``ipywidgets.Image`` of every view (attention, mlp, tokens, bars, scores, overlay,
            strip, accuracy, history, curve).
        tabs: the views; ``show(name)`` selects one.
        sample, layer: the image and the block of the token-mask overlay.
        epochs, max_steps, lr, batch_size, distill, start_button, stop_button, progress, status: retraining.
        widget: the whole panel (a ``VBox``); displaying the panel displays it.
    """

    def __init__(self, run: str | Path | None = None, *, flops: float = DEFAULT_FLOPS,
                 workdir: str | Path | None = None, device: str = "cpu") -> None:
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vitslim-widgets-"))
        self.device = device
        registry = RunRegistry([run or default_run()], self.workdir, bundled=list(bundled_labels()))
        self.run: OpenRun = registry.get(None)
        self.plan: SlimPlan | None = None
        self.note = ""
        self.error = ""
        self.evaluations: list[dict[str, Any]] = []   # accuracy of slimmed models (no retraining)
        self.retrained: list[dict[str, Any]] = []     # finished retraining jobs
        self._plans: OrderedDict[PanelBudget, tuple[SlimPlan, str]] = OrderedDict()
        self._slim_cache: tuple[SlimPlan, Any] | None = None
        self._drawn: dict[str, Any] = {}               # tab -> the state it was drawn for
        self._job: threading.Thread | None = None
        self._stop = threading.Event()
        self._job_lock = threading.Lock()
        self.job_state = "idle"                         # idle | running | done | stopped | failed
        self.job_result: dict[str, Any] = {}
        self.job_history: dict[str, list] = {"log": [], "eval": []}
        self._build(flops)
        self.refresh()

    # ------------------------------------------------------------------ layout
    def _build(self, flops: float) -> None:
        s = self.run.spec
        slider = dict(min=0.01, max=1.0, step=0.01, readout_format=".0%", continuous_update=False,
                      style={"description_width": "110px"}, layout=W.Layout(width="460px"))
        self.min_flops = self._min_flops()
        self.mode = W.ToggleButtons(options=[("FLOPs budget", "flops"), ("manual: three keep fractions", "ratios")],
                                    value="flops", style={"button_width": "210px"})
        self.flops = W.FloatSlider(value=max(self.min_flops, min(1.0, flops)), description="FLOPs budget",
                                   **{**slider, "min": self.min_flops})
        self.attn = W.FloatSlider(value=0.7, description="attention dims", **slider)
        self.mlp = W.FloatSlider(value=0.7, description="MLP units", **slider)
        self.token = W.FloatSlider(value=0.7, description="tokens", **slider)
        self.ratios_box = W.VBox([self.attn, self.mlp, self.token], layout=W.Layout(display="none"))
        self.sort = W.Checkbox(value=False, description="sort units by score in the maps", indent=False)
        self.readout = W.HTML()
        self.table = W.HTML()
        self.images = {k: W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))
                       for k in ("attention", "mlp", "tokens", "bars", "scores", "overlay", "strip", "accuracy",
                                 "history", "curve")}
        self.images["overlay"].layout = W.Layout(width="256px", height="auto")

        # image tab
        samples = self._samples()
        self.sample = W.Dropdown(options=[(smp.name, i) for i, smp in enumerate(samples)] or [("no image", -1)],
                                 value=0 if samples else -1, description="image")
        self.layer = W.IntSlider(value=0, min=0, max=s.depth - 1, description="layer",
                                 continuous_update=True, layout=W.Layout(width="420px"))
        self.prediction = W.HTML()
        image_tab = W.VBox([
            W.HTML("<b>Greyed-out patches do not enter the chosen layer</b> (a dropped token never comes back)."),
            W.HBox([self.sample, self.layer]),
            W.HBox([self.images["overlay"], self.prediction]),
            W.HTML("Every layer at once:"), self.images["strip"]])

        # accuracy tab
        self.evaluate_button = W.Button(description="Evaluate this budget", icon="check", layout=W.Layout(width="auto"),
                                        tooltip="slim the searched model to this budget and test it (no retraining)")
        self.accuracy = W.HTML()
        accuracy_tab = W.VBox([W.HBox([self.evaluate_button, self.accuracy]), self.images["accuracy"]])

        # retrain tab
        small = dict(style={"description_width": "90px"}, layout=W.Layout(width="220px"))
        self.epochs = W.BoundedIntText(value=1, min=1, max=10_000, description="epochs", **small)
        self.max_steps = W.BoundedIntText(value=0, min=0, max=10**8, description="max steps",
                                          tooltip="0: all the steps of the epochs", **small)
        self.lr = W.BoundedFloatText(value=2e-4, min=1e-8, max=1.0, step=1e-5, description="learning rate", **small)
        self.batch_size = W.BoundedIntText(value=64, min=1, max=65_536, description="batch size", **small)
        self.distill = W.Checkbox(value=True, description="distil from the searched model", indent=False)
        self.start_button = W.Button(description="Retrain", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, description="steps", bar_style="info",
                                      layout=W.Layout(width="460px"))
        self.status = W.HTML("Retrains the physically slimmed model of the current budget.")
        retrain_tab = W.VBox([W.HBox([self.epochs, self.max_steps, self.lr]), W.HBox([self.batch_size, self.distill]),
                              W.HBox([self.start_button, self.stop_button, self.progress]), self.status,
                              self.images["curve"]])

        pages = {"attention": W.VBox([self.images["attention"]]), "mlp": W.VBox([self.images["mlp"]]),
                 "tokens": W.VBox([self.images["tokens"]]), "layers": W.VBox([self.images["bars"], self.table]),
                 "scores": W.VBox([self.images["scores"]]), "image": image_tab, "accuracy": accuracy_tab,
                 "history": W.VBox([self.images["history"]]), "retrain": retrain_tab}
        self.tabs = W.Tab(children=[pages[k] for k in TABS], titles=[TAB_TITLES[k] for k in TABS])
        name = (self.run.scores.model_recipe or {}).get("name") or s.model_name or "model"
        title = W.HTML(f"<b>ViT-Slim</b> · {html.escape(self.run.label)} · <code>{html.escape(name)}</code>: "
                       f"{s.depth} blocks, {s.num_heads}×{s.head_dim} attention, MLP {s.mlp_hidden}, "
                       f"{s.num_prefix_tokens}+{s.num_patches} tokens")
        self.widget = W.VBox([title, self.mode, self.flops, self.ratios_box, self.sort, self.readout, self.tabs])

        for w in (self.mode, self.flops, self.attn, self.mlp, self.token, self.sort):
            w.observe(self._on_budget, names="value")
        self.layer.observe(self._on_layer, names="value")
        self.sample.observe(self._on_sample, names="value")
        self.tabs.observe(self._on_tab, names="selected_index")
        self.evaluate_button.on_click(lambda _b: self.evaluate_budget())
        self.start_button.on_click(lambda _b: self.start_retrain())
        self.stop_button.on_click(lambda _b: self.stop_retrain())

    def _min_flops(self) -> float:
        """The smallest budget the slider offers: the cheapest reachable plan, rounded up to a percent."""
        try:
            lo = removal_order(self.run.scores).min_ratio
        except VitSlimError:
            return 0.01
        return float(min(1.0, max(0.01, math.ceil(100 * lo * (1 + 1e-9)) / 100)))

    def _samples(self) -> list:
        try:
            return self.run.samples()
        except (VitSlimError, OSError):
            return []

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def show(self, tab: str) -> None:
        """Select a tab by name (one of ``TABS``)."""
        self.tabs.selected_index = TABS.index(tab)

    @property
    def current_tab(self) -> str:
        return TABS[self.tabs.selected_index or 0]

    # ------------------------------------------------------------------ budget -> plan
    @property
    def budget(self) -> PanelBudget:
        return PanelBudget(self.mode.value, float(self.flops.value), float(self.attn.value), float(self.mlp.value),
                           float(self.token.value))

    def plan_for(self, budget: PanelBudget) -> tuple[SlimPlan, str]:
        """The plan of a budget (cached) and a note when a FLOPs budget can only be approximated."""
        hit = self._plans.get(budget)
        if hit is not None:
            self._plans.move_to_end(budget)
            return hit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)
            if budget.mode == "flops":
                plan = plan_for_flops(self.run.scores, budget.flops)
            else:
                plan = plan_for_ratios(self.run.scores, attn=budget.attn, mlp=budget.mlp, token=budget.token)
        note = ""
        achieved = float(plan.info.get("achieved", plan.flops_ratio))
        if budget.mode == "flops" and abs(achieved - budget.flops) > DEFAULT_TOL * budget.flops:
            note = (f"Approximation: {100 * budget.flops:.3g}% of the dense FLOPs cannot be hit exactly with whole "
                    f"units; the nearest plan costs {100 * achieved:.3g}%.")
        self._plans[budget] = (plan, note)
        while len(self._plans) > 64:
            self._plans.popitem(last=False)
        return plan, note

    def refresh(self) -> None:
        """Recompute the plan of the controls, the readout and the views of the tab on screen."""
        self.ratios_box.layout.display = "" if self.mode.value == "ratios" else "none"
        self.flops.layout.display = "" if self.mode.value == "flops" else "none"
        try:
            self.plan, self.note = self.plan_for(self.budget)
            self.error = ""
        except VitSlimError as e:
            self.error = _one_line(e)
            self.readout.value = error_html(self.error)
            return  # the views keep showing the last valid plan
        self.readout.value = readout_html(self.plan, self.note)
        self._drawn = {k: v for k, v in self._drawn.items() if k == "history"}
        self._draw_tab(self.current_tab)

    def _on_budget(self, _change: dict) -> None:
        self.refresh()

    def _on_tab(self, _change: dict) -> None:
        self._draw_tab(self.current_tab)

    def _on_layer(self, _change: dict) -> None:
        if self.plan is not None and self.current_tab == "image":
            self._draw_overlay()

    def _on_sample(self, _change: dict) -> None:
        if self.plan is not None and self.current_tab == "image":
            self._draw_overlay()
            self._draw_strip()
            self._draw_prediction()

    # ------------------------------------------------------------------ drawing
    def _draw_tab(self, tab: str) -> None:
        """Draw a tab's views unless they already show the current plan."""
        if self.plan is None:
            return
        state = (id(self.plan), bool(self.sort.value))
        if tab == "history":
            state = "static"
        if self._drawn.get(tab) == state:
            return
        sc, plan, sort = self.run.scores, self.plan, bool(self.sort.value)
        if tab == "attention":
            self.images["attention"].value = png_bytes(viz.attention_map(sc, plan, sort=sort))
        elif tab == "mlp":
            self.images["mlp"].value = png_bytes(viz.mlp_map(sc, plan, sort=sort))
        elif tab == "tokens":
            self.images["tokens"].value = png_bytes(viz.token_grids(sc, plan))
        elif tab == "layers":
            self.images["bars"].value = png_bytes(viz.layer_bars(plan))
            self.table.value = layer_table_html(plan)
        elif tab == "scores":
            self.images["scores"].value = png_bytes(viz.score_histograms(sc, plan))
        elif tab == "image":
            self._draw_overlay()
            self._draw_strip()
            self._draw_prediction()
        elif tab == "accuracy":
            self._draw_accuracy()
        elif tab == "history":
            self.images["history"].value = figure_png(viz.history_figure(self.run.history))
        self._drawn[tab] = state

    def _image(self) -> Any | None:
        samples = self._samples()
        i = int(self.sample.value)
        return samples[i] if 0 <= i < len(samples) else None

    def _draw_overlay(self) -> None:
        smp = self._image()
        if smp is not None and self.plan is not None:
            self.images["overlay"].value = png_bytes(viz.token_overlay(smp.tensor, self.plan, int(self.layer.value),
                                                                        self.run.data_cfg))

    def _draw_strip(self) -> None:
        smp = self._image()
        if smp is not None and self.plan is not None:
            self.images["strip"].value = png_bytes(viz.token_strip(smp.tensor, self.plan, self.run.data_cfg))

    def _slim(self) -> Any:
        """The searched model slimmed to the current plan (cached for the last plan)."""
        from vitslim_core.slim import slim_model
        if self._slim_cache is None or self._slim_cache[0] is not self.plan:
            self._slim_cache = (self.plan, slim_model(self.run.model(), self.plan).eval())
        return self._slim_cache[1]

    def _draw_prediction(self) -> None:
        smp = self._image()
        if smp is None or self.plan is None:
            self.prediction.value = ""
            return
        try:
            slim = self._slim()
        except MissingWeightsError:
            self.prediction.value = f"<i>{html.escape(self.run.missing_weights_message('Prediction'))}.</i>"
            return
        import torch
        with torch.inference_mode():
            prob = torch.softmax(slim(smp.tensor).float(), dim=-1)[0]
        names = self.run.scores.class_names
        top = torch.topk(prob, k=min(3, prob.numel()))
        rows = "".join(f"<tr><td>{html.escape(names[i] if i < len(names) else str(i))}</td>"
                       f'<td style="padding-left:12px">{100 * p:.1f}%</td></tr>'
                       for p, i in zip(top.values.tolist(), top.indices.tolist()))
        truth = ""
        if smp.label is not None:
            t = int(smp.label)
            truth = f"<div>true class: <b>{html.escape(names[t] if t < len(names) else str(t))}</b></div>"
        self.prediction.value = (f'<div style="padding-left:16px"><div>slim model at '
                                 f"{100 * self.plan.flops_ratio:.1f}% FLOPs predicts:</div>"
                                 f"<table>{rows}</table>{truth}</div>")

    def _draw_accuracy(self) -> None:
        rows = read_sweep(self.run, self.workdir)
        current = {"flops_ratio": self.plan.flops_ratio} if self.plan is not None else None
        fig = viz.accuracy_curve_figure(rows, current=current, extra=self.evaluations + self.retrained)
        self.images["accuracy"].value = figure_png(fig)

    # ------------------------------------------------------------------ accuracy
    def evaluate_budget(self) -> dict[str, float] | None:
        """Slim the searched model to the current budget and measure its test accuracy (no retraining)."""
        if self.plan is None or self.error:
            self.accuracy.value = error_html(self.error or "no valid budget")
            return None
        from vitslim_core.train import evaluate
        self.accuracy.value = "evaluating on the test split..."
        try:
            self.run.check_data("Evaluating")
            ev = evaluate(self._slim(), self.run.data().test, batch_size=128, device=self.device)
        except VitSlimError as e:
            self.accuracy.value = error_html(_one_line(e))
            return None
        self.evaluations.append({"flops_ratio": self.plan.flops_ratio, "top1": ev["top1"],
                                 "kind": "evaluated here (no retraining)"})
        self.accuracy.value = (f"<b>top-1 {ev['top1']:.2f}%</b>, top-5 {ev['top5']:.2f}% on {ev['n']} test images at "
                               f"{100 * self.plan.flops_ratio:.1f}% FLOPs (slimmed, not retrained)")
        self._drawn.pop("accuracy", None)
        if self.current_tab == "accuracy":
            self._draw_tab("accuracy")
        return ev

    # ------------------------------------------------------------------ retraining
    @property
    def retraining(self) -> bool:
        return self._job is not None and self._job.is_alive()

    def start_retrain(self) -> bool:
        """Retrain the slim model of the current budget in a background thread; False if it cannot start."""
        with self._job_lock:
            if self.retraining:
                self.status.value = "A retraining job is already running; stop it or wait for it."
                return False
            if self.plan is None or self.error:
                self.status.value = error_html(self.error or "choose a valid budget first")
                return False
            if not self.run.has_weights:
                self.status.value = error_html(self.run.missing_weights_message("Retraining"))
                return False
            try:
                self.run.check_data("Retraining")
            except VitSlimError as e:
                self.status.value = error_html(_one_line(e))
                return False
            from vitslim_core.retrain import RetrainConfig
            budget = self.budget
            max_steps = int(self.max_steps.value)
            out = self.workdir / "retrain" / f"job-{time.strftime('%Y%m%d-%H%M%S')}-{budget.slug()}"
            n = 1
            while out.exists():
                n += 1
                out = out.with_name(f"{out.name.rsplit('~', 1)[0]}~{n}")
            from .runs import DATA_ROOT
            cfg = RetrainConfig(run=str(self.run.folder), out=str(out), epochs=int(self.epochs.value),
                                max_steps=max_steps, lr=float(self.lr.value), batch_size=int(self.batch_size.value),
                                distill="soft" if self.distill.value else "none", device=self.device,
                                log_every=1 if 0 < max_steps <= 100 else 5, data_root=DATA_ROOT,
                                **budget.retrain_kwargs())
            self._stop = threading.Event()
            self.job_state, self.job_result = "running", {}
            self.job_history = {"log": [], "eval": []}
            self.progress.value, self.progress.max, self.progress.bar_style = 0, max(1, max_steps or 1), "info"
            self.start_button.disabled, self.stop_button.disabled = True, False
            self.status.value = f"Starting: loading the searched model and the data ({html.escape(budget.text())})..."
            self._job = threading.Thread(target=self._retrain_thread, args=(cfg, budget), daemon=True,
                                         name="vitslim-widgets-retrain")
            self._job.start()
            return True

    def stop_retrain(self) -> bool:
        """Ask the running job to stop after the current step (it keeps what it has trained)."""
        if not self.retraining:
            self.status.value = "No retraining job is running."
            return False
        self._stop.set()
        self.stop_button.disabled = True
        self.status.value = "Stopping after the current step..."
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the retraining thread to end; True if it did (or none ran)."""
        job = self._job
        if job is None:
            return True
        job.join(timeout)
        return not job.is_alive()

    def _total_steps(self, cfg: Any) -> int:
        from vitslim_core.train import steps_per_epoch
        spe = steps_per_epoch(len(self.run.data().train), cfg.batch_size)
        total = cfg.epochs * spe
        return min(total, cfg.max_steps) if cfg.max_steps > 0 else total

    def _retrain_thread(self, cfg: Any, budget: PanelBudget) -> None:
        from vitslim_core.retrain import retrain
        t0 = time.perf_counter()
        last_draw = [0.0]
        try:
            total = self._total_steps(cfg)
            self.progress.max = max(1, total)

            def on_log(rec: dict) -> None:
                if "eval" in rec:
                    self.job_history["eval"].append(dict(rec["eval"]))
                    return
                self.job_history["log"].append(dict(rec))
                step = int(rec.get("step", 0))
                self.progress.value = min(step, self.progress.max)
                if not self._stop.is_set():  # keep "Stopping..." on screen once Stop was pressed
                    self.status.value = (f"Retraining ({html.escape(budget.text())}): step {step}/{total}, "
                                         f"loss {rec.get('loss', float('nan')):.3f}")
                now = time.perf_counter()
                if now - last_draw[0] > CURVE_EVERY_S:
                    last_draw[0] = now
                    self.images["curve"].value = figure_png(viz.training_curve_figure(self.job_history, total))

            result = retrain(cfg, on_log=on_log, should_stop=self._stop.is_set)
            stopped = bool(result.history.get("stopped")) or self._stop.is_set()
            steps = int(self.job_history["log"][-1]["step"]) if self.job_history["log"] else 0
            top1 = result.best_top1
            folder = Path(cfg.out) / ("best" if top1 is not None and not stopped else "last")
            if (top1 is None or stopped) and (folder / "slim.json").is_file():
                self.status.value = "Evaluating the retrained model on the test split..."
                from vitslim_core.slim import load_slim
                from vitslim_core.train import evaluate
                top1 = evaluate(load_slim(folder), self.run.data().test, batch_size=128, device=self.device)["top1"]
            self.images["curve"].value = figure_png(viz.training_curve_figure(self.job_history, total))
            self.job_result = {"out": str(cfg.out), "folder": str(folder), "steps": steps, "total_steps": total,
                               "top1": top1, "flops_ratio": result.plan.flops_ratio, "stopped": stopped,
                               "seconds": time.perf_counter() - t0}
            if top1 is not None:
                self.retrained.append({"flops_ratio": result.plan.flops_ratio, "top1": top1,
                                       "kind": "retrained" + (" (stopped early)" if stopped else "")})
                self._drawn.pop("accuracy", None)
            acc = f"top-1 <b>{top1:.2f}%</b>" if top1 is not None else "no model saved yet"
            word = "Stopped early" if stopped else "Finished"
            self.status.value = (f"{word} after {steps} of {total} steps in {time.perf_counter() - t0:.0f} s: {acc} "
                                 f"at {100 * result.plan.flops_ratio:.1f}% FLOPs. Slim model: "
                                 f"<code>{html.escape(str(folder))}</code> (<code>load_slim(folder)</code>).")
            self.progress.bar_style = "warning" if stopped else "success"
            if not stopped:
                self.progress.value = self.progress.max
            self.job_state = "stopped" if stopped else "done"
        except Exception as e:  # noqa: BLE001 - the thread must always end in a readable state
            msg = _one_line(e)
            if not isinstance(e, VitSlimError):
                msg = f"{type(e).__name__}: {msg}"
            self.status.value = error_html(f"Retraining failed: {msg}")
            self.progress.bar_style = "danger"
            self.job_result = {"error": msg}
            self.job_state = "failed"
        finally:
            self.start_button.disabled, self.stop_button.disabled = False, True


def open_panel(run: str | Path | None = None, **kwargs: Any) -> W.VBox:
    """The panel's widget box (for layouts that embed it): ``SlimPanel(run, **kwargs).widget``."""
    return SlimPanel(run, **kwargs).widget


__all__ = ["SlimPanel", "PanelBudget", "TABS", "png_bytes", "figure_png", "readout_html", "layer_table_html",
           "layer_rows", "open_panel"]

