"""The app and the Jupyter panel on search runs of the newer timm families (issue 11): EVA02 (rope, SwiGLU,
whole-head attention scores) and BEiT (relative position bias, ragged heads), with nothing special for the
user: the same views, plans, token masks, prediction, speed and plan export as for the digits demo.

Each run is a real ``vitslim search`` of the real timm class (random start, synthetic images at a small
size, a few steps), so the score files, weights and history are what a user's search writes.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gr = pytest.importorskip("gradio")

from vitslim_app.explorer import Budget, Explorer  # noqa: E402
from vitslim_app.jobs import RetrainJob  # noqa: E402
from vitslim_core import MaskScores, SlimPlan  # noqa: E402
from vitslim_core.search import SearchConfig, search  # noqa: E402

# name, image size: 4x4 patch grids (16 token positions + the class token)
FAMILIES = {
    "eva02": ("eva02_small_patch14_224", 56),
    "beit": ("beit_base_patch16_224", 64),
}
SEARCH = dict(data="synthetic:64", epochs=1, max_steps=3, batch_size=16, lr=5e-4, mask_lr=0.2, w_attn=2e-2,
              w_mlp=1e-2, w_token=2e-2, log_every=1, device="cpu", seed=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory) -> tuple[str, Path]:
    name, size = FAMILIES[request.param]
    out = tmp_path_factory.mktemp(request.param) / "run"
    search(SearchConfig(model=name, img_size=size, out=str(out), **SEARCH))
    return request.param, out


def budget(key: str, flops: float = 0.5) -> tuple:
    return (key, "flops", flops, 1.0, 1.0, 1.0)


def not_error(html: str) -> bool:
    return 'id="vs-budget-error"' not in html


def test_the_app_shows_every_view_of_a_family_run(family_run, tmp_path):
    family, run = family_run
    ex = Explorer([run], tmp_path / "work", job=RetrainJob())
    key = ex.registry.default_key()
    scores = MaskScores.load(run / "scores.safetensors")
    assert scores.spec.family == ("eva" if family == "eva02" else "beit")
    card, *_ = ex.open_run(key, None, 0, "attention")
    assert card
    for view in ("attention", "mlp", "tokens", "layers", "scores", "history"):
        out = ex.show_view(view, *budget(key, 0.5), 0, True, None)
        assert not_error(out[1]), (family, view)
    views = ex.budget_views(*budget(key, 0.4), 0, False, None, "all")
    assert not_error(views[0])
    plan = ex.plan(ex.run(key), Budget.of("flops", 0.4)).plan
    assert abs(plan.flops_ratio - 0.4) < 0.03
    if family == "eva02":  # rope: whole heads; the app's plan keeps every dim of a kept head
        assert plan.spec.head_only and (plan.attn.all(2) == plan.attn.any(2)).all()


def test_token_masks_prediction_and_speed_of_a_family_run(family_run, tmp_path):
    family, run = family_run
    ex = Explorer([run], tmp_path / "work", job=RetrainJob())
    key = ex.registry.default_key()
    sample = ex.pick_sample(key, 0)
    assert sample is not None
    overlay, strip = ex.overlay_views(*budget(key, 0.4), 3, sample)
    assert overlay.dtype == np.uint8 and overlay.ndim == 3 and strip.ndim == 3
    label, caption = ex.predict(*budget(key, 0.4), sample)
    assert len(label) == 3 and "True class" in caption
    speed = ex.measure_speed(*budget(key, 0.5), progress=lambda *a, **k: None)
    assert "measured speedup" in speed, speed


def test_the_exported_plan_and_slim_model_of_a_family_run_load(family_run, tmp_path):
    import torch
    import zipfile
    from vitslim_core import count_cost
    from vitslim_core.slim import load_slim
    _, run = family_run
    ex = Explorer([run], tmp_path / "work", job=RetrainJob())
    key = ex.registry.default_key()
    path, _ = ex.export_plan(*budget(key, 0.5))
    plan = SlimPlan.load(path)
    assert plan.spec == MaskScores.load(run / "scores.safetensors").spec
    assert abs(plan.flops_ratio - 0.5) < 0.03
    zip_path, msg = ex.export_slim(*budget(key, 0.5))
    assert zip_path, msg
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp_path / "slim")
    slim = load_slim(tmp_path / "slim")
    assert count_cost(slim).macs == plan.macs
    size = plan.spec.img_size
    with torch.no_grad():
        assert slim(torch.randn(2, plan.spec.in_chans, *size)).shape == (2, plan.spec.num_classes)


def test_the_panel_opens_a_family_run(family_run, tmp_path):
    pytest.importorskip("ipywidgets")
    from vitslim_app.widgets import TABS, SlimPanel
    _, run = family_run
    panel = SlimPanel(run, workdir=tmp_path, flops=0.6)
    assert panel.plan is not None and panel.error == ""
    assert bytes(panel.images["attention"].value).startswith(b"\x89PNG")
    panel.flops.value = 0.35
    assert abs(panel.plan.flops_ratio - 0.35) < 0.03
    for tab in ("mlp", "tokens", "image"):
        panel.tabs.selected_index = TABS.index(tab)
    assert panel.error == ""
    assert bytes(panel.images["strip"].value).startswith(b"\x89PNG")  # token masks on a sample
