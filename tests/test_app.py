"""The app's callbacks, called directly (no server): every control of the page has a test here."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gr = pytest.importorskip("gradio")

from vitslim_app.explorer import Budget, Explorer, layer_rows, layer_table, readout_html  # noqa: E402
from vitslim_app.jobs import RetrainJob  # noqa: E402
from app_harness import run_for_tests, wait_until  # noqa: E402
from vitslim_core import BudgetError, ScoreFileError, SlimPlan  # noqa: E402

SKIP = gr.skip()


def skipped(v) -> bool:
    """True for ``gr.skip()`` (the output is left as it was)."""
    return isinstance(v, dict) and v == SKIP


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return run_for_tests(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def ex(run_dir, tmp_path_factory) -> Explorer:
    return Explorer([run_dir], tmp_path_factory.mktemp("workdir"), job=RetrainJob())


@pytest.fixture(scope="module")
def key(ex) -> str:
    return ex.registry.default_key()


def budget(key: str, flops: float = 0.5, mode: str = "flops", attn: float = 1.0, mlp: float = 1.0,
           token: float = 1.0) -> tuple:
    return (key, mode, flops, attn, mlp, token)


def _png(path: Path, size=(40, 30), mode="RGB") -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode).save(path)
    return path


# ====================================================================== budget and live views
def test_budget_views_return_readouts_maps_and_table(ex, key):
    out = ex.budget_views(*budget(key, 0.5), 0, False, None)
    assert len(out) == 9
    html, *imgs, table, overlay, strip = out
    assert 'id="vs-flops"' in html and "% of" in html and "speedup" in html
    for img in imgs + [overlay, strip]:
        assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape[2] == 3
    run = ex.run(key)
    assert table.count("<tr>") == run.spec.depth + 1 and "<th>MLP units</th>" in table


@pytest.mark.parametrize("view,drawn", [("attention", {1}), ("mlp", {2}), ("tokens", {3}), ("scores", {4}),
                                        ("layers", {5, 6}), ("image", {7, 8}), ("history", set()),
                                        ("accuracy", set())])
def test_only_the_tab_on_screen_is_redrawn(ex, key, view, drawn):
    out = ex.budget_views(*budget(key, 0.5), 0, False, None, view)
    assert "vs-flops" in out[0]  # the readout is always visible
    assert {i for i, o in enumerate(out) if i and not skipped(o)} == drawn
    shown = ex.show_view(view, *budget(key, 0.5), 0, False, None)
    assert shown[0] == view and len(shown) == 10


def test_heavy_views_only_for_their_tab(ex, key):
    pred, md, acc, hist = ex.heavy_views("image", *budget(key, 0.5), None, [])
    assert isinstance(pred, dict) and not skipped(pred) and skipped(acc) and skipped(hist)
    pred, md, acc, hist = ex.heavy_views("accuracy", *budget(key, 0.5), None, [])
    assert skipped(pred) and not skipped(acc) and skipped(hist)
    pred, md, acc, hist = ex.heavy_views("scores", *budget(key, 0.5), None, [])
    assert skipped(pred) and skipped(acc) and not skipped(hist)
    assert all(skipped(v) for v in ex.heavy_views("attention", *budget(key, 0.5), None, []))


def test_heavy_views_name_the_budget_they_were_drawn_for(ex, key):
    """The readout's stamp (FLOPs and kept counts) is in the figure labels and the prediction caption."""
    from vitslim_app.views import budget_stamp
    stamp = budget_stamp(ex.plan(ex.run(key), Budget.of("flops", 0.45)).plan)
    assert f'data-stamp="{stamp}"' in ex.budget_views(*budget(key, 0.45), 0, False, None, "attention")[0]
    _, md, _, _ = ex.heavy_views("image", *budget(key, 0.45), None, [])
    assert stamp in md
    assert stamp in ex.heavy_views("accuracy", *budget(key, 0.45), None, [])[2]["label"]
    assert stamp in ex.heavy_views("scores", *budget(key, 0.45), None, [])[3]["label"]


def test_live_views_ask_for_heavy_views_only_on_tabs_that_have_them(ex, key):
    asks = set()
    for view in ("image", "accuracy", "scores"):
        out = ex.live_views(*budget(key, 0.5), 0, False, None, view)
        assert len(out) == 10 and isinstance(out[-1], str) and out[-1] not in asks  # a new value: a change
        asks.add(out[-1])
    for view in ("attention", "mlp", "tokens", "layers", "history"):
        assert skipped(ex.live_views(*budget(key, 0.5), 0, False, None, view)[-1])
    assert skipped(ex.live_views(*budget(key, 0.0), 0, False, None, "scores")[-1])  # a bad budget: nothing to draw


def test_settled_heavy_views_draw_the_latest_budget_once(run_dir, tmp_path):
    """Per page: a heavy call whose budget is no longer the page's latest is skipped at once; the latest
    one is drawn (after the quiet period), and asking again for the same views is free."""
    ex = Explorer([run_dir], tmp_path, job=RetrainJob())
    key = ex.registry.default_key()
    page, other = SimpleNamespace(session_hash="page-a"), SimpleNamespace(session_hash="page-b")
    heavy = lambda flops, req: ex.settled_heavy_views("scores", *budget(key, flops), None, [], req)  # noqa: E731
    ex.budget_views(*budget(key, 0.5), 0, False, None, "scores", page)
    ex.budget_views(*budget(key, 0.6), 0, False, None, "scores", page)  # the slider moved on
    assert all(skipped(v) for v in heavy(0.5, page))
    drawn = heavy(0.6, page)
    assert skipped(drawn[0]) and not skipped(drawn[3]) and "score histograms at" in drawn[3]["label"]
    assert all(skipped(v) for v in heavy(0.6, page))  # already on that page (the release after the change)
    assert not skipped(heavy(0.5, other)[3])  # another page has its own budget (none noted: drawn)
    assert not skipped(heavy(0.5, None)[3])  # no page at all (called directly): drawn
    assert all(skipped(v) for v in ex.settled_heavy_views("attention", *budget(key, 0.6), None, [], page))
    # a plain heavy_views (a tab was selected) is what the page shows next: the same ask is then free
    ex.budget_views(*budget(key, 0.7), 0, False, None, "scores", page)
    ex.heavy_views("scores", *budget(key, 0.7), None, [], page)
    assert all(skipped(v) for v in heavy(0.7, page))


def test_page_budgets_wait_is_bounded_and_follows_the_page():
    import threading

    from vitslim_app.explorer import PageBudgets
    pages = PageBudgets(max_sessions=2)
    assert pages.settle("nobody", "b", quiet=10.0)  # nothing noted: no wait
    pages.asked("p", "b1")
    pages.answered("p", "b1")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("settled", pages.settle("p", "b1", quiet=30.0)))
    t.start()
    pages.asked("p", "b2")  # a newer budget ends the wait at once, with False
    t.join(10)
    assert not t.is_alive() and result["settled"] is False
    assert pages.settle("p", "b2", quiet=0.0, max_quiet=0.0)
    assert not pages.settle("p", "b1", quiet=0.0)
    pages.asked("q", "x")
    pages.asked("r", "y")  # at most max_sessions pages are remembered
    assert pages.settle("p", "anything", quiet=10.0)


def test_flops_readout_follows_the_budget(ex, key):
    hi = ex.budget_views(*budget(key, 0.9), 0, False, None)
    lo = ex.budget_views(*budget(key, 0.4), 0, False, None)
    assert hi[0] != lo[0]
    plan = ex.plan(ex.run(key), Budget.of("flops", 0.4)).plan
    assert f"{100 * plan.flops_ratio:.1f}%" in lo[0]
    assert not np.array_equal(hi[3], lo[3])  # token grids change


def test_ratio_mode_keeps_the_requested_fractions(ex, key):
    plan = ex.plan(ex.run(key), Budget.of("ratios", None, 0.5, 0.25, 1.0)).plan
    kept = plan.kept_fractions()
    assert abs(kept["attn"] - 0.5) < 0.02 and abs(kept["mlp"] - 0.25) < 0.02 and kept["token"] == 1.0
    out = ex.budget_views(*budget(key, mode="ratios", attn=0.5, mlp=0.25), 0, False, None)
    assert "vs-error" not in out[0]


def test_impossible_budget_shows_the_message_and_leaves_the_views(ex, key):
    from vitslim_core import removal_order
    too_small = removal_order(ex.run(key).scores).min_ratio / 2
    out = ex.budget_views(*budget(key, too_small), 0, False, None)
    assert "vs-error" in out[0] and "impossible budget" in out[0]
    assert all(skipped(o) for o in out[1:])
    with pytest.raises(BudgetError):
        ex.plan(ex.run(key), Budget.of("flops", too_small))
    assert "vs-error" in ex.budget_views(*budget(key, 0.0), 0, False, None)[0]  # outside (0, 1]


def test_approximated_budget_shows_the_achieved_ratio(ex, key, monkeypatch):
    import vitslim_app.explorer as explorer_mod
    monkeypatch.setattr(explorer_mod, "DEFAULT_TOL", 0.0)
    res = Explorer([key], ex.workdir, job=ex.job).plan(ex.run(key), Budget.of("flops", 0.4321))
    assert "nearest plan costs" in res.note
    assert "vs-budget-note" in readout_html(res.plan, res.note)


def test_budget_values_are_coerced():
    assert Budget.of("flops", "0.5") == Budget("flops", 0.5)
    assert Budget.of("something", None, float("nan")) == Budget("flops", 0.6, 1.0)
    assert Budget.of("ratios", 0.3, 0.2, 0.3, 0.4).retrain_kwargs() == {"attn": 0.2, "mlp": 0.3, "token": 0.4}
    assert "FLOPs budget 50%" == Budget.of("flops", 0.5).text()


def test_sorting_changes_the_maps_not_the_readout(ex, key):
    a = ex.budget_views(*budget(key, 0.5), 0, False, None)
    b = ex.budget_views(*budget(key, 0.5), 0, True, None)
    assert a[0] == b[0]
    assert a[1].shape == b[1].shape


def test_layer_table_matches_the_plan(ex, key):
    plan = ex.plan(ex.run(key), Budget.of("flops", 0.5)).plan
    rows = layer_rows(plan)
    layers = plan.layers()
    assert [int(r[4].split("/")[0]) for r in rows] == [x["mlp"] for x in layers]
    assert [int(r[5].split("/")[0]) for r in rows] == [x["tokens"] for x in layers]
    assert f"<td>{rows[0][4]}</td>" in layer_table(plan)


def test_overlay_follows_layer_and_budget(ex, key):
    img = ex.pick_sample(key, 0)
    o0, strip = ex.overlay_views(*budget(key, 0.3), 0, img)
    o_last, _ = ex.overlay_views(*budget(key, 0.3), ex.run(key).spec.depth - 1, img)
    assert o0.shape == o_last.shape and strip.shape[1] > o0.shape[1]
    plan = ex.plan(ex.run(key), Budget.of("flops", 0.3)).plan
    if plan.token[0].sum() != plan.token[-1].sum():
        assert not np.array_equal(o0, o_last)


# ====================================================================== runs
def test_open_run_fills_the_page(ex, key):
    card, fig, gallery, image, layer_upd, summary = ex.open_run(key, None, 99)
    run = ex.run(key)
    assert f"| blocks | {run.spec.depth} |" in card
    assert fig is not None and len(fig.axes) == 4
    assert gallery and all(isinstance(g, np.ndarray) and g.ndim == 3 for g in gallery)
    assert image["tensor"].shape[1:] == (run.spec.in_chans, *run.spec.img_size)
    assert layer_upd["maximum"] == run.spec.depth - 1 and layer_upd["value"] == run.spec.depth - 1
    assert "blocks" in summary
    # on any other tab the history figure (matplotlib) waits until its tab is selected
    assert skipped(ex.open_run(key, None, 0, "attention")[1])
    assert len(ex.history_view(key).axes) == 4


def test_unknown_runs_are_refused(ex, tmp_path):
    with pytest.raises(ScoreFileError):
        ex.run(str(tmp_path))
    with pytest.raises(ScoreFileError):
        ex.run("/etc")
    out = ex.open_run("/etc", None, 0)
    assert "Cannot open this run" in out[-1]
    assert "vs-error" in ex.budget_views("/etc", "flops", 0.5, 1, 1, 1, 0, False, None)[0]


@pytest.fixture(scope="module")
def scores_only(ex, run_dir, tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("upload") / "my_scores.safetensors"
    shutil.copyfile(run_dir / "scores.safetensors", src)
    dd, msg = ex.upload_run([str(src)])
    assert "Opened" in msg and "scores only" in msg
    return dd["value"]


def test_uploaded_scores_open_without_weights(ex, key, scores_only):
    assert scores_only != key and ex.registry.allowed(scores_only)
    run = ex.run(scores_only)
    assert not run.has_weights and run.label.startswith("uploaded")
    out = ex.budget_views(*budget(scores_only, 0.5), 0, False, None)
    assert "vs-error" not in out[0]
    card = ex.open_run(scores_only, None, 0)[0]
    assert "**no**" in card


def test_missing_weights_are_explained(ex, scores_only):
    b = budget(scores_only, 0.5)
    label, md = ex.predict(*b, None)
    assert label is None and "model.safetensors" in md
    md, fig, evals = ex.evaluate_budget(*b, [])
    assert "model.safetensors" in md and evals == []
    path, md = ex.export_slim(*b)
    assert path is None and "model.safetensors" in md
    status = list(ex.start_retrain(*b, 1, 1e-4, True, 2))
    assert "model.safetensors" in status[-1][0]
    assert "model.safetensors" in ex.accuracy_note(scores_only)
    path, md = ex.export_plan(*b)  # plans need no weights
    assert path and SlimPlan.load(path).spec == ex.run(scores_only).spec


def test_upload_with_weights_and_history(ex, run_dir, tmp_path):
    files = []
    for name in ("scores.safetensors", "model.safetensors", "history.json"):
        shutil.copyfile(run_dir / name, tmp_path / name)
        files.append(str(tmp_path / name))
    dd, msg = ex.upload_run(files)
    run = ex.run(dd["value"])
    assert run.has_weights and run.history is not None


@pytest.mark.parametrize("case", ["text", "corrupt", "version", "weights_only", "foreign"])
def test_bad_score_uploads_are_rejected_with_a_message(ex, run_dir, tmp_path, case):
    from safetensors.torch import save_file
    import torch
    if case == "text":
        f = tmp_path / "notes.txt"
        f.write_text("hello")
    elif case == "corrupt":
        f = tmp_path / "scores.safetensors"
        f.write_bytes(b"\x00\x01garbage" * 10)
    elif case == "version":
        from safetensors import safe_open
        with safe_open(str(run_dir / "scores.safetensors"), framework="pt") as st:
            md = dict(st.metadata())
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        md["format_version"] = "99"
        f = tmp_path / "scores.safetensors"
        save_file(tensors, str(f), metadata=md)
    elif case == "weights_only":
        f = tmp_path / "model.safetensors"
        shutil.copyfile(run_dir / "model.safetensors", f)
    else:
        f = tmp_path / "other.safetensors"
        save_file({"x": torch.zeros(2)}, str(f))
    with pytest.warns(UserWarning):
        dd, msg = ex.upload_run([str(f)])
    assert skipped(dd) and msg.startswith("**Upload rejected:**")
    if case == "version":
        assert "version" in msg


# ====================================================================== images and prediction
def test_samples_and_prediction(ex, key):
    img = ex.pick_sample(key, 1)
    label, md = ex.predict(*budget(key, 0.5), img)
    assert isinstance(label, dict) and 1 <= len(label) <= 3
    assert all(0.0 <= p <= 1.0 for p in label.values()) and sum(label.values()) <= 1.0 + 1e-6
    assert "FLOPs" in md


@pytest.mark.parametrize("mode,size", [("RGB", (300, 200)), ("RGBA", (17, 33)), ("L", (5, 5))])
def test_uploaded_images_of_any_kind_are_preprocessed(ex, key, tmp_path, mode, size):
    path = _png(tmp_path / f"img_{mode}.png", size, mode)
    state, msg = ex.upload_image(key, str(path), None)
    run = ex.run(key)
    assert state["tensor"].shape == (1, run.spec.in_chans, *run.spec.img_size)
    assert "Using" in msg
    overlay, strip = ex.overlay_views(*budget(key, 0.5), 1, state)
    assert overlay.ndim == 3
    label, _ = ex.predict(*budget(key, 0.5), state)
    assert label


@pytest.mark.parametrize("case", ["text", "truncated", "huge"])
def test_bad_images_keep_the_old_one(ex, key, tmp_path, case):
    from PIL import Image
    if case == "text":
        path = tmp_path / "fake.png"
        path.write_text("not an image")
    elif case == "truncated":
        path = _png(tmp_path / "t.png", (64, 64))
        path.write_bytes(path.read_bytes()[:60])
    else:
        path = tmp_path / "huge.png"
        Image.new("L", (9000, 6000)).save(path)  # 54 M pixels, above the guard; tiny on disk
    old = ex.pick_sample(key, 0)
    with pytest.warns(UserWarning):
        state, msg = ex.upload_image(key, str(path), old)
    assert state is old and msg.startswith("**Image rejected:**")
    assert str(tmp_path) not in msg and path.name in msg  # the file's name, not the server's folders


def test_no_image_change_is_a_no_op(ex, key):
    state, msg = ex.upload_image(key, None, None)
    assert skipped(state) and msg == ""


# ====================================================================== accuracy, latency, export
def test_evaluate_at_a_budget_adds_a_point(ex, key):
    md, fig, evals = ex.evaluate_budget(*budget(key, 0.5), [])
    assert "top-1" in md and len(evals) == 1 and evals[0]["run_key"] == key
    assert 0 <= evals[0]["top1"] <= 100
    assert len(fig.axes[0].collections) >= 1


def test_sweep_writes_the_curve(ex, key, monkeypatch):
    import importlib

    from vitslim_app.runs import read_sweep, sweep_file
    sweep_mod = importlib.import_module("vitslim_core.sweep")  # the package binds the name to the function
    monkeypatch.setattr(sweep_mod, "DEFAULT_BUDGETS", (0.5, 1.0))
    run = ex.run(key)
    target = sweep_file(run, ex.workdir)
    had = target.read_bytes() if target.is_file() else None
    try:
        md, fig = ex.compute_sweep(*budget(key, 0.5), [])
        assert "Wrote the curve" in md
        rows = read_sweep(run, ex.workdir)
        assert [r["target"] for r in rows] == [0.5, 1.0]
        assert "without retraining" in ex.accuracy_note(key)
        assert len(fig.axes[0].lines) >= 2
    finally:
        if had is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(had)


def test_measure_speed_reports_measured_and_predicted(ex, key, monkeypatch):
    import importlib
    bench = importlib.import_module("vitslim_core.bench")
    calls = []

    def fake(model, batch_size=32, runs=10, warmup=3, **kw):
        calls.append(model)
        return {"median_ms": 10.0 if len(calls) == 1 else 5.0, "threads": 2}
    monkeypatch.setattr(bench, "measure_latency", fake)
    md = ex.measure_speed(*budget(key, 0.5))
    assert "measured speedup 2.00×" in md and "predicted" in md
    assert sum(p.numel() for p in calls[1].parameters()) < sum(p.numel() for p in calls[0].parameters())


def test_export_plan_and_slim_model(ex, key, tmp_path):
    from vitslim_core.slim import load_slim
    path, md = ex.export_plan(*budget(key, 0.5))
    plan = SlimPlan.load(path)
    assert abs(plan.flops_ratio - 0.5) < 0.01
    zpath, md = ex.export_slim(*budget(key, 0.5))
    with zipfile.ZipFile(zpath) as z:
        assert set(z.namelist()) >= {"slim.json", "model.safetensors"}
        z.extractall(tmp_path / "slim")
    slim = load_slim(tmp_path / "slim")
    assert slim.slim_plan.macs == plan.macs
    assert Path(zpath).resolve().is_relative_to(ex.workdir.resolve())


# ====================================================================== retraining job
def _fake_runner(steps: int, delay: float = 0.0):
    """Like retrain(): logs steps, honours should_stop, writes a real slim model to out/last."""
    def runner(cfg, on_log=None, should_stop=None):
        from vitslim_core.plan import plan_for_flops
        from vitslim_core.run_folder import load_run
        from vitslim_core.slim import save_slim, slim_model
        scores, model = load_run(cfg.run)
        plan = plan_for_flops(scores, cfg.flops)
        out = Path(cfg.out)
        history = {"log": [], "eval": []}
        for step in range(1, steps + 1):
            if should_stop():
                history["stopped"] = True
                break
            rec = {"step": step, "epoch": step / steps, "loss": 2.0 / step}
            history["log"].append(rec)
            on_log(rec)
            time.sleep(delay)
        save_slim(slim_model(model, plan), out / "last")
        return SimpleNamespace(out=out, plan=plan, best_top1=None, history=history)
    return runner


def test_retrain_runs_reports_progress_and_offers_downloads(ex, key):
    job = RetrainJob(runner=_fake_runner(5))
    ex2 = Explorer([key], ex.workdir, job=job)
    outs = list(ex2.start_retrain(*budget(key, 0.5), 1, 2e-4, True, 5))
    status, fig, files, acc = outs[-1]
    assert "finished" in status and "top-1" in status
    assert any(str(f).endswith(".zip") for f in files)
    st = job.status()
    assert st.state == "done" and st.step == 5 and st.total_steps == 5
    assert job.results_for(key) and job.results_for(key)[0]["top1"] is not None
    assert len(acc.axes[0].collections) >= 1  # the retrained point is on the curve
    assert "idle" in ex2.job_status()


def test_one_job_at_a_time_and_stop(ex, key, monkeypatch):
    import importlib
    export_mod = importlib.import_module("vitslim_core.export")
    monkeypatch.setattr(export_mod, "export_program", lambda model, path: Path(path).write_bytes(b"pt2"))
    job = RetrainJob(runner=_fake_runner(10_000, delay=0.01))
    ex2 = Explorer([key], ex.workdir, job=job)
    gen = ex2.start_retrain(*budget(key, 0.5), 1, 2e-4, False, 0)
    first = next(gen)
    assert wait_until(lambda: job.status().step >= 2, 60)
    assert "busy" in ex2.job_status()
    with pytest.warns(UserWarning):
        busy = list(ex2.start_retrain(*budget(key, 0.6), 1, 2e-4, False, 0))
    assert "Busy" in busy[-1][0]
    assert "Stopping" in ex2.stop_retrain()
    rest = [first] + list(gen)  # the generator ends when the job has packaged its result
    assert "stopped early" in rest[-1][0]
    assert job.wait(30) and job.status().state == "stopped"
    assert rest[-1][2]  # the partial model can still be downloaded
    assert "No retraining job" in ex2.stop_retrain()


def test_failed_jobs_say_why(ex, key):
    def broken(cfg, on_log=None, should_stop=None):
        raise ScoreFileError("the weights are damaged")
    job = RetrainJob(runner=broken)
    outs = list(Explorer([key], ex.workdir, job=job).start_retrain(*budget(key, 0.5), 1, 2e-4, True, 1))
    assert "failed" in outs[-1][0] and "damaged" in outs[-1][0]


def test_retrain_settings_are_checked(ex, key):
    with pytest.warns(UserWarning):
        outs = list(ex.start_retrain(*budget(key, 0.5), 0, 2e-4, True, 1))
    assert "epochs" in outs[-1][0]


# ====================================================================== URL state and API functions
def test_url_state_reads_and_sanitises(ex, key):
    st = ex.url_state({"flops": "0.4", "view": "tokens", "layer": "2"})
    assert st == {"flops": 0.4, "view": "tokens", "layer": 2}
    st = ex.url_state({"flops": "7", "view": "<script>", "attn": "nan", "mlp": "0.5"})
    assert st == {"flops": 1.0, "mlp": 0.5}  # clipped, unknown view and NaN dropped; flops given: mode stays
    assert ex.url_state({"attn": "0.5"})["mode"] == "ratios"
    assert ex.url_state({"run": Path(key).name}).get("run") == key
    assert "run" not in ex.url_state({"run": "/etc"})
    absurd = {"flops": "9" * 70_000, "attn": "1e999999", "mlp": "-inf", "token": "0x10", "layer": "-1e400",
              "view": "v" * 3000, "mode": "ratios" * 100, "run": "." * 10_000, 17: "0.5", "x": ["0.3"]}
    assert ex.url_state(absurd) == {}
    assert ex.url_state({"flops": "1e-300", "layer": "1e9"}) == {"flops": 0.01, "layer": 10_000}
    assert ex.url_state("not a dict") == {}


def test_on_load_turns_the_url_into_updates(ex):
    req = SimpleNamespace(query_params={"flops": "0.45", "view": "mlp", "mode": "flops"})
    run, mode, flops, attn, mlp, token, layer, tabs, view = ex.on_load(req)
    assert flops["value"] == 0.45 and mode["value"] == "flops" and skipped(attn)
    assert tabs.selected == "mlp" and view == "mlp"
    plain = ex.on_load(SimpleNamespace(query_params={}))
    assert all(skipped(u) for u in plain[:8]) and plain[8] == "attention"


def test_api_functions(ex, key, tmp_path):
    s = ex.api_set_budget(0.5)
    assert abs(s["flops_ratio"] - 0.5) < 0.01 and len(s["layers"]) == ex.run(key).spec.depth
    assert {"heads", "mlp", "tokens", "dims_per_head"} <= set(s["layers"][0])
    json.dumps(s)
    r = ex.api_set_ratios(0.5, 0.5, 0.5)
    assert abs(r["kept"]["mlp"] - 0.5) < 0.02
    with pytest.raises(gr.Error):
        ex.api_set_budget(0.001)
    with pytest.raises(gr.Error):
        ex.api_set_ratios(0, 1, 1)
    img = ex.api_token_overlay(str(_png(tmp_path / "a.png")), 1, 0.5)
    assert img.dtype == np.uint8 and img.ndim == 3
    with pytest.raises(gr.Error):
        ex.api_token_overlay(str(tmp_path / "missing.png"), 1, 0.5)


def test_app_builds_with_named_endpoints(ex):
    from vitslim_app.ui import build_app
    demo = build_app(explorer=ex)
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"set_budget", "set_ratios", "token_overlay", "evaluate"} <= names
    assert demo.explorer is ex


def test_cli_and_main_arguments(tmp_path, capsys):
    from vitslim_app.main import check_runs, parse_auth
    from vitslim_core.cli import main
    assert main(["app", "--help"]) == 0
    assert "--auth" in capsys.readouterr().out
    assert parse_auth("ann:secret") == ("ann", "secret")
    with pytest.raises(ValueError):
        parse_auth("nopassword")
    with pytest.raises(ScoreFileError):
        check_runs([str(tmp_path)])
    assert main(["app", str(tmp_path), "--no-browser"]) == 2
    assert "not a search run folder" in capsys.readouterr().err


def test_job_status_is_thread_safe_to_read():
    job = RetrainJob()
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(job.status().state)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert seen == ["idle"] * 8
