"""The Jupyter panel (app/widgets.py) driven without a browser: controls are set, callbacks fire."""
from __future__ import annotations

import os

os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

W = pytest.importorskip("ipywidgets")

from app_harness import run_for_tests, wait_until  # noqa: E402
from vitslim_app.widgets import TABS, PanelBudget, SlimPanel, layer_rows, layer_table_html, png_bytes  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def img(panel: SlimPanel, name: str) -> bytes:
    """The PNG bytes a view shows (ipywidgets keeps them as a memoryview)."""
    return bytes(panel.images[name].value)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return run_for_tests(tmp_path_factory.getbasetemp())


@pytest.fixture()
def panel(run_dir, tmp_path) -> SlimPanel:
    p = SlimPanel(run_dir, workdir=tmp_path, flops=0.6)
    yield p
    if p.retraining:  # never leave a training thread behind
        p.stop_retrain()
        p.wait(120)


def test_opens_a_run_and_shows_the_first_plan(panel):
    assert panel.plan is not None and panel.error == ""
    assert abs(panel.plan.flops_ratio - 0.6) < 0.02
    assert "FLOPs" in panel.readout.value and f"{100 * panel.plan.flops_ratio:.1f}%" in panel.readout.value
    assert img(panel, "attention").startswith(PNG)  # the first tab is drawn at once
    assert isinstance(panel.widget, W.VBox)
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_flops_slider_updates_readout_and_views(panel):
    before_readout = panel.readout.value
    before_map = img(panel, "attention")
    panel.flops.value = 0.35
    assert abs(panel.plan.flops_ratio - 0.35) < 0.02
    assert panel.readout.value != before_readout
    assert f"{100 * panel.plan.flops_ratio:.1f}%" in panel.readout.value
    assert img(panel, "attention") != before_map
    assert panel.flops.continuous_update is False  # the views redraw on release, not on every pixel


@pytest.mark.parametrize("tab,image", [("mlp", "mlp"), ("tokens", "tokens"), ("layers", "bars"),
                                       ("scores", "scores"), ("image", "strip"), ("history", "history")])
def test_each_tab_draws_its_view_and_follows_the_budget(panel, tab, image):
    panel.show(tab)
    first = img(panel, image)
    assert first.startswith(PNG)
    if tab == "history":
        return  # the search history does not depend on the budget
    panel.flops.value = 0.3
    assert img(panel, image) != first


def test_views_of_hidden_tabs_are_drawn_when_selected(panel):
    panel.flops.value = 0.5
    assert img(panel, "tokens") == b""  # not on screen: not drawn yet
    panel.show("tokens")
    assert img(panel, "tokens").startswith(PNG)


def test_layer_table_lists_every_block(panel):
    panel.show("layers")
    depth = panel.run.spec.depth
    assert panel.table.value.count("<tr") == depth + 2  # header, blocks, total
    rows = layer_rows(panel.plan)
    assert [r[0] for r in rows] == list(range(depth))
    assert "total" in layer_table_html(panel.plan)


def test_manual_mode_uses_the_three_fractions(panel):
    panel.mode.value = "ratios"
    assert panel.ratios_box.layout.display == "" and panel.flops.layout.display == "none"
    panel.attn.value, panel.mlp.value, panel.token.value = 0.5, 0.25, 0.8
    kept = panel.plan.kept_fractions()
    assert abs(kept["attn"] - 0.5) < 0.02 and abs(kept["mlp"] - 0.25) < 0.02 and abs(kept["token"] - 0.8) < 0.02
    assert panel.budget == PanelBudget("ratios", panel.flops.value, 0.5, 0.25, 0.8)
    panel.mode.value = "flops"
    assert panel.ratios_box.layout.display == "none"
    assert abs(panel.plan.flops_ratio - panel.flops.value) < 0.02


def test_impossible_budget_shows_an_error_and_keeps_the_views(panel):
    panel.flops.value = 0.5
    good, drawn = panel.plan, img(panel, "attention")
    panel.flops.min = 0.001
    panel.flops.value = 0.001  # below the cheapest plan of any model
    assert "impossible" in panel.error
    assert "vs-error" in panel.readout.value
    assert panel.plan is good and img(panel, "attention") == drawn  # the last valid plan stays
    panel.flops.value = 0.45
    assert panel.error == "" and "vs-error" not in panel.readout.value


def test_layer_slider_changes_the_overlay(panel):
    panel.mode.value = "ratios"
    panel.attn.value, panel.mlp.value, panel.token.value = 1.0, 1.0, 0.5
    panel.show("image")
    tok = panel.plan.token
    a, b = next((i, j) for i in range(len(tok)) for j in range(i + 1, len(tok)) if (tok[i] != tok[j]).any())
    panel.layer.value = a
    first = img(panel, "overlay")
    panel.layer.value = b
    assert first.startswith(PNG) and img(panel, "overlay") != first
    panel.layer.value = a
    assert img(panel, "overlay") == first


def test_sample_choice_changes_overlay_and_prediction(panel):
    panel.show("image")
    if len(panel.sample.options) < 2:
        pytest.skip("the run offers one image")
    before = (img(panel, "overlay"), panel.prediction.value)
    panel.sample.value = 1
    assert img(panel, "overlay") != before[0]
    assert "predicts" in panel.prediction.value


def test_evaluate_budget_adds_a_point(panel):
    panel.show("accuracy")
    ev = panel.evaluate_budget()
    assert ev is not None and 0.0 <= ev["top1"] <= 100.0 and ev["n"] > 0
    assert "top-1" in panel.accuracy.value
    assert panel.evaluations and img(panel, "accuracy").startswith(PNG)


def test_retrain_button_runs_a_tiny_job_to_the_end(panel):
    panel.show("retrain")
    panel.max_steps.value, panel.batch_size.value, panel.epochs.value = 2, 16, 1
    panel.distill.value = False
    panel.start_button.click()
    assert panel.retraining or panel.job_state != "idle"
    assert wait_until(lambda: not panel.retraining, timeout=300)
    assert panel.job_state == "done", panel.status.value
    assert panel.progress.max == 2 and panel.progress.value == 2
    assert panel.job_result["steps"] == 2 and panel.job_result["top1"] is not None
    assert "Finished" in panel.status.value
    assert img(panel, "curve").startswith(PNG)
    assert not panel.start_button.disabled and panel.stop_button.disabled
    from vitslim_core.slim import load_slim
    assert load_slim(panel.job_result["folder"]) is not None
    assert panel.retrained and panel.retrained[-1]["kind"] == "retrained"


def test_stop_button_cancels_a_job(panel):
    panel.max_steps.value, panel.batch_size.value, panel.epochs.value = 10_000, 8, 50
    panel.distill.value = False
    assert panel.start_retrain()
    assert panel.start_retrain() is False  # one job at a time
    assert not panel.stop_button.disabled
    assert wait_until(lambda: len(panel.job_history["log"]) >= 1 or not panel.retraining, timeout=300)
    panel.stop_button.click()
    assert wait_until(lambda: not panel.retraining, timeout=300)
    assert panel.job_state == "stopped", panel.status.value
    assert panel.job_result["stopped"] and panel.job_result["steps"] < 10_000
    assert "Stopped" in panel.status.value


def test_a_run_without_weights_still_shows_plans(run_dir, tmp_path):
    import shutil
    folder = tmp_path / "scores-only"
    folder.mkdir()
    shutil.copy(run_dir / "scores.safetensors", folder / "scores.safetensors")
    p = SlimPanel(folder, workdir=tmp_path / "work")
    p.flops.value = 0.4
    assert abs(p.plan.flops_ratio - 0.4) < 0.02 and img(p, "attention").startswith(PNG)
    p.show("image")
    assert img(p, "overlay").startswith(PNG) and "weights" in p.prediction.value
    assert p.evaluate_budget() is None and "weights" in p.accuracy.value
    assert p.start_retrain() is False and "weights" in p.status.value and p.job_state == "idle"
    p.show("history")  # no history.json: an empty figure, not an error
    assert img(p, "history").startswith(PNG)


# ---------------------------------------------------------------------------- the two bundled runs
@pytest.fixture()
def bundled(monkeypatch, run_dir, tmp_path_factory):
    """The digits run and a Fashion-MNIST run stand in as the two bundled runs."""
    from app_harness import fashion_run_for_tests
    from vitslim_core import demo
    fashion_dir = fashion_run_for_tests(tmp_path_factory.getbasetemp()).resolve()
    monkeypatch.setattr(demo, "DEMO_DIR", run_dir.resolve())
    monkeypatch.setattr(demo, "FASHION_DIR", fashion_dir)
    return run_dir.resolve(), fashion_dir


def _fashion_where(monkeypatch, tmp_path, installed: bool) -> None:
    """Fashion-MNIST's files (present or not) in a stand-in Debian folder; nothing under ./data."""
    from vitslim_core import fashion
    folder = tmp_path / "debian-fashion"
    folder.mkdir(exist_ok=True)
    if installed:
        for stem in fashion.FILES.values():
            (folder / f"{stem}.gz").write_bytes(b"")
    monkeypatch.setattr(fashion, "DEBIAN_DIR", folder)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("installed", [True, False], ids=["data-set-installed", "no-data-set"])
def test_the_default_panel_opens_fashion_only_with_its_data_set(bundled, monkeypatch, tmp_path, installed):
    _fashion_where(monkeypatch, tmp_path, installed)
    p = SlimPanel(workdir=tmp_path / "work")
    digits, fashion_dir = bundled
    assert p.run.folder == (fashion_dir if installed else digits)
    assert p.run.label == ("Fashion-MNIST (bundled)" if installed else "digits demo (bundled)")
    assert SlimPanel(digits, workdir=tmp_path / "work2").run.label == "digits demo (bundled)"  # a run as today


def test_fashion_panel_without_its_data_set(bundled, monkeypatch, tmp_path):
    from vitslim_core.fashion import CLASS_NAMES
    _fashion_where(monkeypatch, tmp_path, installed=False)
    p = SlimPanel(bundled[1], workdir=tmp_path / "work", flops=0.5)
    assert [name for name, _ in p.sample.options] == [f"test image: {n}" for n in CLASS_NAMES]
    p.show("image")
    p.sample.value = CLASS_NAMES.index("Sneaker")
    assert img(p, "overlay").startswith(PNG) and img(p, "strip").startswith(PNG)
    assert "Sneaker" in p.prediction.value
    for tab in ("attention", "mlp", "tokens", "layers"):
        p.show(tab)
        assert p.error == ""
    assert p.evaluate_budget() is None and "apt-get install dataset-fashion-mnist" in p.accuracy.value
    assert p.start_retrain() is False and "apt-get install dataset-fashion-mnist" in p.status.value
    assert p.job_state == "idle"


def test_png_bytes_round_trip():
    from io import BytesIO

    from PIL import Image
    img = np.zeros((5, 7, 3), np.uint8)
    img[1, 2] = (10, 20, 30)
    back = np.asarray(Image.open(BytesIO(png_bytes(img))))
    assert back.shape == (5, 7, 3) and (back == img).all()


def test_tab_names_are_stable():
    assert TABS[0] == "attention" and "retrain" in TABS and "image" in TABS
