"""The page: layout and event wiring only (every callback is a method of ``app.explorer.Explorer``).

``build_app(runs=...)`` returns the ``gr.Blocks``; ``launch_app`` starts it with the app's settings
(127.0.0.1, upload limit, allowed paths, theme and CSS). ``demo`` (module attribute) is built on first
access with the bundled runs, for ``gradio app/ui.py`` and notebooks.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .main import skip_gradio_stub_writing  # noqa: E402

skip_gradio_stub_writing()
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from .explorer import DEFAULT_FLOPS, MODES, Explorer, run_info_markdown, run_summary  # noqa: E402
from .jobs import ACTIVITY  # noqa: E402

MAX_UPLOAD = "600mb"
MAX_QUEUE = 100
"""Events waiting in the queue (all pages together) before new ones are refused: the page then says
"This application is currently busy. Please try again." instead of piling up work and memory."""
HEAVY = dict(concurrency_id="heavy-views", concurrency_limit=8)
"""The heavy views' events (matplotlib figures, predictions: 0.1-3 s each on 2 cores). Explorer draws one
at a time (all pages together), so they take at most one core from the live views (which skip the queue);
up to 8 events are in a worker thread at once, waiting for their page's budget to settle or for their
turn, the others wait in the queue without a thread."""
API_LIMIT = 4
"""/set_budget and /set_ratios plan cached budgets in milliseconds and are thread-safe: several at once."""
MAX_URL = 16 << 10
"""Bytes of a request's path and query string; longer requests get HTTP 414. The page's own URLs carry a
few hundred bytes of state; Gradio's page route fails with HTTP 500 on URLs over 64 kB."""

CSS = """
#vs-header h1 {margin: 0 0 4px 0; font-size: 1.55rem;}
#vs-header p {margin: 0; color: var(--body-text-color-subdued);}
.vs-explain, .vs-explain p {font-size: 0.9rem; color: var(--body-text-color-subdued);}
.vs-readout {display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 8px;}
.vs-card {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px 10px;
          background: var(--background-fill-secondary);}
.vs-card.vs-main {border-color: #9ecae1; background: rgba(33, 102, 172, 0.08);}
.vs-k {font-size: 0.72rem; text-transform: uppercase; letter-spacing: 0.04em; color: var(--body-text-color-subdued);}
.vs-v {font-size: 1.3rem; font-weight: 650; font-variant-numeric: tabular-nums; line-height: 1.25;}
.vs-s {font-size: 0.76rem; color: var(--body-text-color-subdued);}
.vs-note {margin-top: 8px; padding: 6px 8px; border-left: 3px solid #e6a700; background: rgba(230, 167, 0, 0.1);
          font-size: 0.85rem;}
.vs-error {padding: 8px 10px; border-left: 3px solid #d7301f; background: rgba(215, 48, 31, 0.08);
           color: #a3261a; font-size: 0.9rem;}
              border: 1px solid var(--border-color-primary);}
.vs-legend {display: flex; gap: 16px; flex-wrap: wrap; font-size: 0.82rem; color: var(--body-text-color-subdued);}
.vs-legend span.sw {display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 5px;
                    vertical-align: -2px;}
.vs-pixel img {image-rendering: pixelated;}
#vs-side {position: sticky; top: 8px; align-self: flex-start;}
#vs-ready, #vs-heavy-ask {display: none !important;}
#vs-layer-table .vs-table {border-collapse: collapse; width: 100%; font-size: 0.85rem;
                            font-variant-numeric: tabular-nums; border: none;}
#vs-layer-table .vs-table th, #vs-layer-table .vs-table td {padding: 4px 8px; text-align: right; border: none;
                            border-bottom: 1px solid var(--border-color-primary);}
#vs-layer-table .vs-table th {font-weight: 600; background: var(--background-fill-secondary);}
#vs-layer-table .vs-table tbody tr:not(.vs-total) td:nth-child(3) {text-align: left; font-family: var(--font-mono);
                            font-size: 0.8rem;}
#vs-layer-table .vs-table tr.vs-total td {font-weight: 600; border-bottom: none;}
"""

# system fonts only: the app must work offline (the stock themes fetch Google fonts)
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])

LEGEND = (
    '<div class="vs-legend">'
    '<span><span class="sw" style="background:#08306b"></span><span class="sw" style="background:#4292c6"></span>'
    '<span class="sw" style="background:#9ecae1"></span>kept (darker = larger |score|)</span>'
    '<span style="display:inline-block;width:22px"></span>'
    '<span><span class="sw" style="background:#c4c4c4"></span><span class="sw" style="background:#f2f2f2;'
    'border:1px solid #ddd"></span>pruned</span></div>'
)

URL_BUDGET_JS = """(mode, flops, attn, mlp, token) => {
  const u = new URL(window.location.href); const p = u.searchParams;
  if (mode === 'ratios') { p.set('mode', 'ratios'); p.delete('flops');
    p.set('attn', attn); p.set('mlp', mlp); p.set('token', token); }
  else { p.delete('mode'); p.set('flops', flops); p.delete('attn'); p.delete('mlp'); p.delete('token'); }
  window.history.replaceState(window.history.state, '', u.toString()); return [];
}"""

URL_LAYER_JS = """(layer) => {
  const u = new URL(window.location.href); u.searchParams.set('layer', layer);
  window.history.replaceState(window.history.state, '', u.toString()); return [];
}"""

URL_RUN_JS = """(run) => {
  const u = new URL(window.location.href); const name = String(run || '').split(/[\\\\/]/).filter(Boolean).pop();
  if (name) u.searchParams.set('run', name);
  window.history.replaceState(window.history.state, '', u.toString()); return [];
}"""


def _url_view_js(view: str) -> str:
    return ("() => { const u = new URL(window.location.href); "
            f"u.searchParams.set('view', '{view}'); "
            "window.history.replaceState(window.history.state, '', u.toString()); return []; }")


class URLLimit:
    """ASGI middleware: an HTTP request whose path and query are longer than ``limit`` bytes is answered
    with 414 URI Too Long (one line of text) instead of reaching Gradio's routes."""

    def __init__(self, app: Any, limit: int = MAX_URL) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and \
                len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > self.limit:
            body = f"URL too long (more than {self.limit} bytes)\n".encode()
            await send({"type": "http.response.start", "status": 414,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class LiveImage(gr.Image):
    """``gr.Image`` for views redrawn on every slider move: numpy frames become PNGs at compression
    level 1, three to five times faster to encode than PIL's default level 6 on these maps (the files
    are about 10% larger). Rendered by Gradio's own image component."""

    def get_block_name(self) -> str:
        return "image"

    def postprocess(self, value: Any) -> Any:
        if not isinstance(value, np.ndarray):
            return super().postprocess(value)
        from PIL import Image

        from gradio.data_classes import ImageData
        buf = io.BytesIO()
        Image.fromarray(value).save(buf, format="png", compress_level=1)
        data = buf.getvalue()
        folder = Path(self.GRADIO_CACHE) / hashlib.sha256(data).hexdigest()[:40]
        path = folder / "view.png"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".view.{os.getpid()}.{id(buf)}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return ImageData(path=str(path), orig_name="view.png")


SKIP = {"__type__": "update"}  # what ``gr.skip()`` returns
UPLOAD_ONLY = ("files must be uploaded to this app first (gradio_client: handle_file(path)); data: URLs, web URLs "
               "and server paths are not accepted")


def _uploaded_files(value: Any) -> bool:
    """True for what a file input may receive: nothing, or file payloads whose path is a plain path
    (Gradio then checks that it is in its upload folder; the payload's url is not used for inputs)."""
    if value is None:
        return True
    for v in value if isinstance(value, list) else [value]:
        path = v.get("path") if isinstance(v, dict) else None
        if (not isinstance(path, str) or not path or len(path) > 4096 or "\x00" in path
                or path[:5].lower() == "data:" or "://" in path):
            return False
    return True


class ExplorerBlocks(gr.Blocks):
    """``gr.Blocks`` where an output left as it is (``gr.skip()``) costs nothing on the server.

    Gradio treats ``gr.skip()`` like any property update: it builds a new component for the session,
    regenerates that component's config and API schema (pydantic JSON schema, ~1.5 ms each) and sends
    back ``{"__type__": "update"}``. The live slider event returns 9 outputs of which the tab on screen
    uses 1-3, so that work was most of the server's time per slider move (measured with
    ``benchmarks/bench_load.py``). Here skipped outputs are answered with the same bare update directly
    and only the others go through Gradio's postprocessing. Anything unusual (batched functions, a
    mismatched number of outputs) takes Gradio's own path.
    """

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, *args: Any, **kwargs: Any) -> Any:
        """File inputs (score files, images, the /token_overlay image) must be files uploaded to this
        server: a ``data:`` URL, a web URL or a server path is refused with one line before Gradio would
        fetch, decode or copy it (Gradio downloads web URLs given as a file's path)."""
        for block, value in zip(getattr(block_fn, "inputs", ()), inputs if isinstance(inputs, list) else ()):
            if isinstance(block, gr.File) and not _uploaded_files(value):
                raise gr.Error(UPLOAD_ONLY)
        try:
            return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - a crafted file payload: one line, not Gradio's (which echoes it)
            if any(isinstance(b, gr.File) for b in getattr(block_fn, "inputs", ())):
                raise gr.Error(UPLOAD_ONLY) from None
            raise

    async def postprocess_data(self, block_fn: Any, predictions: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        outs = getattr(block_fn, "outputs", None)
        if (isinstance(predictions, (list, tuple)) and outs and len(outs) > 1 and len(predictions) == len(outs)
                and not getattr(block_fn, "batch", False) and not getattr(block_fn, "is_validator_function", False)):
            skipped = {i for i, p in enumerate(predictions) if isinstance(p, dict) and p == SKIP}
            bare = [None if getattr(b, "stateful", False) else dict(SKIP) for b in outs]  # as Gradio answers
            if len(skipped) == len(outs):
                return bare
            if skipped:
                keep = [i for i in range(len(outs)) if i not in skipped]
                if len(keep) == 1:  # Gradio unwraps a single output: keep two to stay on the list path
                    keep.append(min(skipped))
                    keep.sort()
                fn = copy.copy(block_fn)
                fn.outputs = [outs[i] for i in keep]
                done = await super().postprocess_data(fn, [predictions[i] for i in keep], state, *args, **kwargs)
                result = bare
                for j, i in enumerate(keep):
                    result[i] = done[j]
                return result
        return await super().postprocess_data(block_fn, predictions, state, *args, **kwargs)


def _explain(text: str) -> gr.Markdown:
    return gr.Markdown(text, elem_classes=["vs-explain"])


def _live_image(elem_id: str, label: str, value: Any = None, pixelated: bool = False) -> gr.Image:
    return LiveImage(value if isinstance(value, np.ndarray) else None, label=label, show_label=False,
                     interactive=False, format="png", elem_id=elem_id,
                     elem_classes=["vs-pixel"] if pixelated else None, buttons=["download", "fullscreen"])


def build_app(runs: Sequence[str | Path] | None = None, workdir: str | Path | None = None,
              explorer: Explorer | None = None) -> gr.Blocks:
    """The exploration app over ``runs`` (default: the bundled runs, see ``runs.bundled_runs``).

    Args:
        runs: search run folders (or their score files); the first one opens first.
        workdir: folder for uploads, exports, sweeps and retraining output (default: a temp dir).
        explorer: the callbacks object (made from ``runs``/``workdir`` if not given).
    """
    ex = explorer or Explorer(runs, workdir)
    first = ex.registry.default_key()
    init = ex.budget_views(first, "flops", DEFAULT_FLOPS, 1.0, 1.0, 1.0, 0, False, None, "attention")
    try:
        first_run = ex.run(first)
        depth, card, summary = first_run.spec.depth, run_info_markdown(first_run), run_summary(first_run)
    except Exception as e:  # noqa: BLE001 - a broken first run still gets a page that says so
        depth, card, summary = 12, "", f"**Cannot open the run:** {e}"

    with ExplorerBlocks(title="ViT-Slim explorer", analytics_enabled=False) as demo:
        demo.explorer = ex  # tests and launch_app find the callbacks object here
        image_state = gr.State(None)  # {"name", "tensor", "label"} of the image in the Image tab
        evals_state = gr.State([])    # accuracies measured in this session (points on the curve)
        view_state = gr.State("attention")  # the tab on screen
        with gr.Row(elem_id="vs-header"):
            ready = gr.HTML("", elem_id="vs-ready")  # says "ready" when the page's load chain is done
            # hidden: the live views change it when the tab on screen wants its heavy views redrawn
            heavy_ask = gr.Textbox("", elem_id="vs-heavy-ask", show_label=False, container=False, interactive=False)
            gr.HTML("<h1>ViT-Slim explorer</h1><p>ViT-Slim learns a score for every attention dimension, MLP unit "
                    "and token of a vision transformer. Pick a budget and see which parts survive, what the slim "
                    "model costs, how accurate it is, and retrain it.</p>")
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------- left: run and budget
            with gr.Column(scale=4, min_width=330, elem_id="vs-side"):
                gr.Markdown("### 1 · Run")
                run_dd = gr.Dropdown(choices=ex.registry.startup_choices(), value=first or None,
                                     label="search run", elem_id="vs-run", interactive=True)
                with gr.Accordion("open your own score file", open=False):
                    _explain("Upload `scores.safetensors` from `vitslim search` (add its `model.safetensors` for "
                             "accuracy, prediction and retraining, and `history.json` for the search curves).")
                    run_files = gr.File(label="scores.safetensors (+ model.safetensors, history.json)",
                                        file_count="multiple", file_types=[".safetensors", ".json"],
                                        elem_id="vs-run-upload")
                run_msg = gr.Markdown(summary, elem_id="vs-run-msg")
                with gr.Accordion("model details", open=False):
                    model_md = gr.Markdown(card, elem_id="vs-model")
                gr.Markdown("### 2 · Budget")
                mode = gr.Radio(MODES, value="flops", label="how to choose the budget", elem_id="vs-mode")
                with gr.Group(visible=True) as flops_group:
                    flops = gr.Slider(0.0, 1.0, value=DEFAULT_FLOPS, step=0.01, label="FLOPs budget (fraction of dense)",
                                      info="The solver removes the least important units of all three dimensions "
                                           "at the same pace until the cost fits.", elem_id="vs-flops-slider")
                with gr.Group(visible=False) as ratio_group:
                    attn = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="attention dims kept",
                                     elem_id="vs-attn-slider")
                    mlp = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="MLP units kept", elem_id="vs-mlp-slider")
                    token = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="tokens kept (layer, patch pairs)",
                                      elem_id="vs-token-slider")
                readout = gr.HTML(init[0], elem_id="vs-readout")
                with gr.Row():
                    speed_btn = gr.Button("measure real latency", size="sm", elem_id="vs-speed-btn")
                speed_md = gr.Markdown(elem_id="vs-speed")
            # ---------------------------------------------------------- right: what survives
            with gr.Column(scale=9):
                with gr.Tabs(selected="attention", elem_id="vs-tabs", overflow_behavior="wrap") as tabs:
                    with gr.Tab("Attention", id="attention") as tab_attention:
                        _explain("Every block has heads × dims attention units; each head-dim has one score shared by "
                                 "its query, key and value. A row is a head, a column a dim. All layers are ranked "
                                 "together, so some layers lose far more than others.")
                        gr.HTML(LEGEND)
                        sort = gr.Checkbox(False, label="sort units by score (kept units form a bar)",
                                           elem_id="vs-sort")
                        attn_img = _live_image("vs-attn-map", "attention heads x dims", init[1])
                    with gr.Tab("MLP", id="mlp") as tab_mlp:
                        _explain("The hidden units of each block's MLP (wrapped into a block per layer). The bar "
                                 "on the right is the width that survives.")
                        gr.HTML(LEGEND)
                        mlp_img = _live_image("vs-mlp-map", "MLP units", init[2])
                    with gr.Tab("Tokens", id="tokens") as tab_tokens:
                        _explain("The patch grid entering each block. Token masks are monotone: a patch dropped "
                                 "before block l stays dropped, so later layers see fewer tokens and cost less.")
                        gr.HTML(LEGEND)
                        tok_img = _live_image("vs-token-grid", "token grids", init[3])
                    with gr.Tab("Image", id="image") as tab_image:
                        _explain("Which patches of a real image the slim model still looks at. Pick a sample or "
                                 "drop your own image (any size, grayscale or RGBA; it is preprocessed like the "
                                 "model's data).")
                        gallery = gr.Gallery(label="samples: click one", columns=10, rows=1, height=110,
                                             allow_preview=False, elem_id="vs-gallery", format="png",
                                             object_fit="contain")
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=3, min_width=220):
                                # a plain file drop: our handler reads it (size guard, any mode) and
                                # explains what is wrong with a bad file; the overlay shows the image
                                img_in = gr.File(label="or drop your own image", file_types=["image"],
                                                 file_count="single", height=150, elem_id="vs-img-upload")
                                img_msg = gr.Markdown(elem_id="vs-img-msg")
                            with gr.Column(scale=5, min_width=280):
                                layer = gr.Slider(0, max(depth - 1, 1), value=0, step=1, label="tokens entering block",
                                                  elem_id="vs-layer-slider")
                                overlay_img = _live_image("vs-overlay", "token mask on the image", pixelated=True)
                            with gr.Column(scale=3, min_width=200):
                                gr.Markdown("**slim model's prediction**")
                                pred = gr.Label(num_top_classes=3, label="prediction", show_label=False,
                                                elem_id="vs-pred")
                                pred_md = gr.Markdown(elem_id="vs-pred-md")
                        _explain("All blocks at once (dimmed patches are dropped before that block):")
                        strip_img = _live_image("vs-strip", "token masks of all layers")
                    with gr.Tab("Layers", id="layers") as tab_layers:
                        _explain("The slim architecture: what each block keeps, and its share of the block's dense "
                                 "FLOPs. Heads may keep different numbers of dims (ragged heads).")
                        bars_img = _live_image("vs-layer-bars", "per-layer widths", init[5])
                        table = gr.HTML(init[6] if isinstance(init[6], str) else "", elem_id="vs-layer-table")
                    with gr.Tab("Scores", id="scores") as tab_scores:
                        _explain("How the learned scores are distributed. The budget is one global threshold per "
                                 "dimension (red): units above it stay. Tokens are ranked by their largest mask "
                                 "value in this or any later layer, which keeps token masks monotone.")
                        hist_img = _live_image("vs-hist", "score histograms", init[4])
                        hist_plot = gr.Plot(label="score histograms", format="png", elem_id="vs-hist-plot")
                    with gr.Tab("History", id="history") as tab_history:
                        _explain("How the search went: the sparsity penalty pushes scores down while the task loss "
                                 "keeps the useful units alive.")
                        history_plot = gr.Plot(label="search history", show_label=False, format="png", elem_id="vs-history")
                    with gr.Tab("Accuracy", id="accuracy") as tab_accuracy:
                        _explain("Accuracy of the slimmed model before any retraining, against its FLOPs. The "
                                 "dashed line is your budget.")
                        with gr.Row():
                            eval_btn = gr.Button("evaluate at this budget", variant="primary", elem_id="vs-eval-btn")
                            sweep_btn = gr.Button("compute the curve", elem_id="vs-sweep-btn")
                        eval_md = gr.Markdown(elem_id="vs-eval-md")
                        acc_note = gr.Markdown(elem_id="vs-acc-note")
                        acc_plot = gr.Plot(label="accuracy vs FLOPs", format="png", elem_id="vs-acc-plot")
                    with gr.Tab("Retrain", id="retrain") as tab_retrain:
                        _explain("Retrain the physically slimmed model at this budget (on this machine's CPU), "
                                 "optionally distilling from the searched model. One job runs at a time.")
                        with gr.Row():
                            epochs = gr.Number(1, label="epochs", precision=0, minimum=1, maximum=1000,
                                               elem_id="vs-epochs")
                            lr = gr.Number(2e-4, label="learning rate", minimum=1e-7, maximum=0.9, elem_id="vs-lr")
                            distill = gr.Checkbox(True, label="distill from the searched model", elem_id="vs-distill")
                        with gr.Accordion("advanced", open=False):
                            max_steps = gr.Number(0, label="max steps (0: all epochs)", precision=0, minimum=0,
                                                  elem_id="vs-max-steps")
                        with gr.Row():
                            start_btn = gr.Button("start retraining", variant="primary", elem_id="vs-start-btn")
                            stop_btn = gr.Button("stop", variant="stop", elem_id="vs-stop-btn")
                        job_line = gr.Markdown(ex.job_status(), elem_id="vs-job-line")
                        job_bar = gr.HTML(elem_id="vs-job-bar")
                        job_md = gr.Markdown(elem_id="vs-job-md")
                        stop_md = gr.Markdown(elem_id="vs-stop-md")
                        job_plot = gr.Plot(label="training curve", show_label=False, format="png", elem_id="vs-job-plot")
                        job_files = gr.File(label="retrained slim model (zip) and exported program (.pt2)",
                                            file_count="multiple", interactive=False, elem_id="vs-job-files")
                    with gr.Tab("Export", id="export") as tab_export:
                        _explain("Download the plan (which units survive, as JSON) or the physically slimmed model "
                                 "for this budget (not retrained; a `save_slim` folder, zipped).")
                        with gr.Row():
                            plan_btn = gr.Button("plan (json)", elem_id="vs-plan-btn")
                            slim_btn = gr.Button("slim model (zip)", elem_id="vs-slim-btn")
                        export_md = gr.Markdown(elem_id="vs-export-md")
                        with gr.Row():
                            plan_file = gr.File(label="plan", interactive=False, elem_id="vs-plan-file")
                            slim_file = gr.File(label="slim model", interactive=False, elem_id="vs-slim-file")
        timer = gr.Timer(2.0)
        # API-only components for /token_overlay (image in, image out). The image comes in as a plain
        # file: gr.Image would decode whatever arrives (any Pillow format, data: URLs) before our checks;
        # Explorer.api_token_overlay reads it with vitslim_core.data.load_image (allowed formats only,
        # the pixel count checked from the header before anything is decoded).
        with gr.Row(visible=False):
            api_image = gr.File(type="filepath", file_count="single", label="image")
            api_layer = gr.Number(0, label="layer", precision=0)
            api_budget = gr.Number(DEFAULT_FLOPS, label="budget")
            api_overlay = gr.Image(format="png", label="overlay")
            api_btn = gr.Button("overlay")

        # ------------------------------------------------------------------ wiring
        # Only the tab on screen is redrawn while a slider moves (view_state); selecting a tab draws it.
        # Chained steps that draw views are "always_last" (a .then() is "once" by default: a second mode
        # switch or tab click while the first one's views are drawn would be dropped, leaving them stale).
        private: dict[str, Any] = {"api_visibility": "private"}
        quiet = dict(show_progress="hidden", **private)
        last = dict(trigger_mode="always_last", **quiet)
        budget_in = [run_dd, mode, flops, attn, mlp, token]
        live_out = [readout, attn_img, mlp_img, tok_img, hist_img, bars_img, table, overlay_img, strip_img]
        live_in = budget_in + [layer, sort, image_state, view_state]
        heavy_in = [view_state] + budget_in + [image_state, evals_state]
        heavy_out = [pred, pred_md, acc_plot, hist_plot]
        # live views skip the queue: they take milliseconds, and the queue's round trips would dominate.
        # Without the queue they run in Gradio's worker threads, as many at once as pages send them
        # (Explorer's caches are locked); a running retraining job yields to them (ACTIVITY).
        live = dict(trigger_mode="always_last", queue=False, **quiet)
        live_views = ACTIVITY.wrap(ex.budget_views)
        live_overlay = ACTIVITY.wrap(ex.overlay_views)
        # Every change of a budget slider (drag, click, arrow keys, typed number, reset, set by the URL)
        # also draws the heavy views of the tab on screen: when that tab has any, the live answer changes
        # the hidden heavy_ask box, whose change event (sent once that answer is on the page, so the server
        # has seen the budget) draws them once the budget has stayed put for a moment
        # (Explorer.settled_heavy_views): a drag does not draw a figure at every step, and tabs without
        # heavy views send no heavy event. The release event asks again (free when already drawn).
        live_ask = ACTIVITY.wrap(ex.live_views)
        for ctl in (flops, attn, mlp, token):
            ctl.change(live_ask, live_in, live_out + [heavy_ask], **live)
            ctl.change(None, [mode, flops, attn, mlp, token], None, js=URL_BUDGET_JS, **private)
            ctl.release(ex.settled_heavy_views, heavy_in, heavy_out, **HEAVY, **last)
        heavy_ask.change(ex.settled_heavy_views, heavy_in, heavy_out, **HEAVY, **last)
        sort.change(live_views, live_in, live_out, **live)
        mode.change(mode_visibility, mode, [flops_group, ratio_group], **quiet).then(
            ex.budget_views, live_in, live_out, **last).then(ex.heavy_views, heavy_in, heavy_out, **HEAVY, **last)
        mode.change(None, [mode, flops, attn, mlp, token], None, js=URL_BUDGET_JS, **private)
        overlay_in = budget_in + [layer, image_state]
        layer.change(live_overlay, overlay_in, [overlay_img, strip_img], **live)
        layer.change(None, layer, None, js=URL_LAYER_JS, **private)
        for tab, view in ((tab_attention, "attention"), (tab_mlp, "mlp"), (tab_tokens, "tokens"),
                          (tab_image, "image"), (tab_layers, "layers"), (tab_scores, "scores"),
                          (tab_history, "history"), (tab_accuracy, "accuracy"), (tab_retrain, "retrain"),
                          (tab_export, "export")):
            tab.select(functools.partial(ex.show_view, view), live_in[:-1], [view_state] + live_out, **quiet).then(
                ex.heavy_views, heavy_in, heavy_out, **HEAVY, **last)
            tab.select(None, None, None, js=_url_view_js(view), **private)
        tab_history.select(ex.history_view, run_dd, history_plot, **last)

        # runs
        open_out = [model_md, history_plot, gallery, image_state, layer, run_msg]
        run_dd.change(ex.open_run, [run_dd, image_state, layer, view_state], open_out, **private).then(
            ex.budget_views, live_in, live_out, **last).then(
            ex.heavy_views, heavy_in, heavy_out, **HEAVY, **last).then(
            ex.accuracy_note, run_dd, acc_note, **quiet)
        run_dd.change(None, run_dd, None, js=URL_RUN_JS, **private)
        run_files.upload(ex.upload_run, run_files, [run_dd, run_msg], **private)

        # images
        gallery.select(ex.on_gallery_select, run_dd, image_state, **private).then(
            ex.overlay_views, overlay_in, [overlay_img, strip_img], **quiet).then(
            ex.predict, budget_in + [image_state], [pred, pred_md], **quiet)
        img_in.upload(ex.upload_image, [run_dd, img_in, image_state], [image_state, img_msg], **private).then(
            ex.overlay_views, overlay_in, [overlay_img, strip_img], **quiet).then(
            ex.predict, budget_in + [image_state], [pred, pred_md], **quiet)

        # measurements, accuracy, retraining, export
        speed_btn.click(ex.measure_speed, budget_in, speed_md, **private)
        eval_btn.click(ex.evaluate_budget, budget_in + [evals_state], [eval_md, acc_plot, evals_state],
                       show_progress_on=[eval_md], **private)
        sweep_btn.click(ex.compute_sweep, budget_in + [evals_state], [acc_note, acc_plot],
                        show_progress_on=[acc_note], **private)
        # not limited to one at a time: a second Start must reach the job to hear that it is busy
        start_btn.click(ex.start_retrain, budget_in + [epochs, lr, distill, max_steps],
                        [job_md, job_plot, job_files, acc_plot], show_progress_on=[job_bar], concurrency_limit=8,
                        **private)
        stop_btn.click(ex.stop_retrain, None, stop_md, **private)
        timer.tick(ex.job_status, None, job_line, queue=False, **quiet)
        plan_btn.click(ex.export_plan, budget_in, [plan_file, export_md], **private)
        slim_btn.click(ex.export_slim, budget_in, [slim_file, export_md], show_progress_on=[export_md], **private)

        # the page URL carries budget and view (written by the js snippets above, read here)
        demo.load(ex.on_load, None, [run_dd, mode, flops, attn, mlp, token, layer, tabs, view_state], **private).then(
            ex.open_run, [run_dd, image_state, layer, view_state], open_out, **quiet).then(
            ex.budget_views, live_in, live_out, **quiet).then(
            ex.heavy_views, heavy_in, heavy_out, **HEAVY, **quiet).then(
            ex.accuracy_note, run_dd, acc_note, **quiet).then(
            ex.page_ready, None, ready, **quiet)

        # named API endpoints (stable: used by gradio_client users)
        gr.api(ex.api_set_budget, api_name="set_budget", concurrency_limit=API_LIMIT)
        gr.api(ex.api_set_ratios, api_name="set_ratios", concurrency_limit=API_LIMIT)
        api_btn.click(ex.api_token_overlay, [api_image, api_layer, api_budget], api_overlay, api_name="token_overlay",
                      api_description=ex.api_token_overlay.__doc__)
        gr.api(ex.api_evaluate, api_name="evaluate", concurrency_limit=1)
    return demo


def mode_visibility(mode: str) -> tuple[Any, Any]:
    """Show the FLOPs slider or the three ratio sliders."""
    return gr.update(visible=mode != "ratios"), gr.update(visible=mode == "ratios")


def launch_app(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, auth: tuple[str, str] | None = None,
               open_browser: bool = False, quiet: bool = False, prevent_thread_lock: bool = False,
               extra_allowed: Sequence[str | Path] = (), max_queue: int | None = MAX_QUEUE) -> Any:
    """Launch with the app's settings: upload limit, file access only to the runs and the work dir, at
    most ``max_queue`` events waiting in the queue (None: no limit), URLs of at most ``MAX_URL`` bytes."""
    ex: Explorer = demo.explorer
    allowed = [str(p) for p in ex.registry.startup] + [str(ex.workdir)] + [str(p) for p in extra_allowed]
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    from starlette.middleware import Middleware
    return demo.launch(server_name=host, server_port=port, auth=auth, inbrowser=open_browser, quiet=quiet,
                       prevent_thread_lock=prevent_thread_lock, show_error=True, max_file_size=MAX_UPLOAD,
                       allowed_paths=allowed, footer_links=["api"], css=CSS, theme=THEME, ssr_mode=False,
                       app_kwargs={"middleware": [Middleware(URLLimit, limit=MAX_URL)]})


def __getattr__(name: str) -> Any:
    if name == "demo":  # built lazily: importing this module must stay cheap
        global demo
        demo = build_app()
        return demo
    raise AttributeError(name)
