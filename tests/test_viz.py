"""vitslim_core.viz: live numpy views and matplotlib figures over scores and plans (no UI library)."""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vitslim_core import BudgetWarning, SlimPlan, plan_for_flops, plan_for_ratios, viz


@pytest.fixture(scope="module")
def spec():
    import timm

    from vitslim_core import arch_spec
    with torch.device("meta"):
        m = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=3, num_classes=10)
    return arch_spec(m, model_name="deit_tiny_patch16_224", model_kwargs={"img_size": 64, "depth": 3})


@pytest.fixture(scope="module")
def scores(spec):
    from vitslim_core import MaskScores
    sc = MaskScores.dense(spec, meta={"data": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    g = torch.Generator().manual_seed(0)
    sc.attn = [torch.rand(v.shape, generator=g) for v in sc.attn]
    sc.mlp = [torch.rand(v.shape, generator=g) for v in sc.mlp]
    sc.token = [6 * torch.rand(v.shape, generator=g) - 3 for v in sc.token]
    sc.validate()
    return sc


def _plan(scores, r: float) -> SlimPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        return plan_for_flops(scores, r)


def _blue(img: np.ndarray) -> int:
    """Pixels in the kept (blue) ramp: blue channel clearly above red."""
    img = img.astype(int)
    return int(((img[..., 2] - img[..., 0]) > 40).sum())


def _grey(img: np.ndarray) -> int:
    img = img.astype(int)
    flat = (np.ptp(img, axis=2) == 0) & (img[..., 0] > 180) & (img[..., 0] < 250)
    return int(flat.sum())


@pytest.mark.parametrize("fn", ["attention_map", "mlp_map", "token_grids"])
def test_maps_are_rgb_and_show_fewer_kept_units_at_smaller_budgets(scores, fn):
    f = getattr(viz, fn)
    full, half, small = (f(scores, _plan(scores, r)) for r in (1.0, 0.6, 0.3))
    for img in (full, half, small):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert full.shape == small.shape  # the layout does not jump while a slider moves
    assert _blue(full) > _blue(half) > _blue(small)
    assert _grey(full) < _grey(small)


def test_sorting_keeps_the_number_of_kept_units(scores):
    plan = _plan(scores, 0.5)
    a, b = viz.attention_map(scores, plan), viz.attention_map(scores, plan, sort=True)
    assert a.shape == b.shape
    assert abs(_blue(a) - _blue(b)) <= 0.02 * _blue(a)  # labels are identical, cells only move
    assert not np.array_equal(a, b)


def test_histograms_draw_a_threshold_only_when_something_is_pruned(scores):
    red = lambda img: int(((img[..., 0] > 190) & (img[..., 1] < 80) & (img[..., 2] < 80)).sum())  # noqa: E731
    assert red(viz.score_histograms(scores, SlimPlan.full(scores.spec))) == 0
    assert red(viz.score_histograms(scores, _plan(scores, 0.5))) > 50


def test_histogram_threshold_separates_kept_and_pruned(scores):
    plan = plan_for_ratios(scores, attn=0.5, mlp=0.4, token=0.7)
    data = viz._histogram_data(scores, plan)
    for k in ("attn", "mlp", "token"):
        d = data[k]
        assert d["values"][d["kept"]].min() >= d["threshold"] >= d["values"][~d["kept"]].max()
    assert data["mlp"]["n_kept"] == int(plan.mlp.sum())


def test_layer_bars_and_compose_sizes(scores):
    img = viz.layer_bars(_plan(scores, 0.5))
    assert img.dtype == np.uint8 and img.shape[1] == 760


def test_display_image_handles_tensors_gray_and_alpha():
    x = torch.zeros(1, 3, 8, 8)
    out = viz.display_image(x, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and int(out[0, 0, 0]) == 128  # 0 * .25 + .5
    assert viz.display_image(np.zeros((5, 6)), None).shape == (5, 6, 3)
    assert viz.display_image(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    assert viz.display_image(np.full((4, 4, 1), 2.0)).max() == 255  # floats are clipped to [0, 1]


def test_token_overlay_dims_exactly_the_dropped_patches(scores, spec):
    plan = plan_for_ratios(scores, token=0.3)
    layer = spec.depth - 1
    img = np.random.default_rng(0).integers(0, 256, (*spec.img_size, 3), dtype=np.uint8)
    out = viz.token_overlay(img, plan, layer, size=64, dim=0.65)  # 64 px: no upscaling
    assert out.shape == img.shape
    rows, cols = spec.grid
    ph, pw = spec.img_size[0] // rows, spec.img_size[1] // cols
    keep = plan.token[layer].reshape(rows, cols)
    assert keep.any() and (~keep).any()
    for r in range(rows):
        for c in range(cols):
            # the last pixel row/column of a patch carries the faint patch grid
            a = img[r * ph:(r + 1) * ph - 1, c * pw:(c + 1) * pw - 1].astype(np.float32)
            b = out[r * ph:(r + 1) * ph - 1, c * pw:(c + 1) * pw - 1].astype(np.float32)
            want = a if keep[r, c] else a * 0.35 + 128 * 0.65
            assert np.abs(b - want).max() <= 1.0


def test_token_overlay_upscales_by_whole_patches(scores, spec):
    plan = _plan(scores, 0.5)
    x = torch.randn(1, 3, *spec.img_size)
    out = viz.token_overlay(x, plan, 0, {"mean": [0.5] * 3, "std": [0.25] * 3}, size=256)
    assert out.shape[0] == spec.grid[0] * round(256 / spec.grid[0])
    assert viz.token_overlay(x, plan, 99, {}, size=64).shape[:2] == (64, 64)  # layer is clipped


def test_token_strip_has_one_panel_per_layer(scores, spec):
    plan = _plan(scores, 0.4)
    strip = viz.token_strip(np.zeros((64, 64, 3), np.uint8), plan, size=48, cols=spec.depth)
    assert strip.shape[1] >= spec.depth * 48


def test_figures(scores):
    from matplotlib.figure import Figure
    plan = _plan(scores, 0.5)
    history = {"log": [{"step": s, "loss": 3 - s / 10, "task_loss": 2 - s / 10, "acc": 10 * s, "attn": 1 - s / 20,
                        "mlp": 1.0, "token": 0.9} for s in range(1, 6)],
               "eval": [{"step": 5, "epoch": 1, "top1": 55.0}],
               "snapshots": [{"step": 5, "attn": [0.5, 0.4, 0.3], "mlp": [0.2] * 3, "token": [0.9, 0.8, 0.7]}]}
    fig = viz.history_figure(history)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert isinstance(viz.history_figure(None), Figure)
    assert isinstance(viz.score_histograms_figure(scores, plan), Figure)
    assert isinstance(viz.training_curve_figure({"log": history["log"], "eval": history["eval"]}, 10), Figure)
    assert isinstance(viz.training_curve_figure(None), Figure)


def test_accuracy_curve_figure(tmp_path):
    rows = [{"target": t, "flops_ratio": t, "top1": 50 + 40 * t} for t in (0.3, 0.6, 1.0)]
    fig = viz.accuracy_curve_figure(rows, current=0.5,
                                    extra=[{"flops_ratio": 0.5, "top1": 80.0, "kind": "retrained"},
                                           {"flops_ratio": 0.4, "top1": None}])
    ax = fig.axes[0]
    assert len(ax.lines) == 2  # the sweep and the current-budget line
    assert len(ax.collections) == 1  # one retrained point (the one without top1 is skipped)
    fig2 = viz.accuracy_curve_figure([], current={"flops_ratio": 0.7, "top1": 60.0})
    assert len(fig2.axes[0].collections) == 1  # the star
    fig.savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_write_sweep_uses_the_curve(tmp_path):
    from vitslim_core.sweep import write_sweep
    rows = [{"target": t, "flops_ratio": t, "top1": 50.0, "top5": 90.0, "loss": 1.0} for t in (0.5, 1.0)]
    paths = write_sweep(rows, tmp_path)
    assert paths["png"].stat().st_size > 1000


def test_viz_imports_no_ui_library():
    tree = ast.parse(Path(viz.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert names <= {"__future__", "functools", "typing", "numpy", "PIL", "matplotlib"}, names
