"""Plans and the budget solvers (DESIGN invariant 5), plan files (invariant 6)."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitslim_core import (BudgetError, BudgetWarning, MaskScores, ScoreFileError, SlimPlan, VitSlimError, arch_spec,
                          count_cost, official_token_fraction, plan_for_flops, plan_for_ratios, removal_order)

MODES = ("head_dim", "head", "uniform")
TARGETS = [round(0.3 + 0.05 * i, 2) for i in range(14)]  # 0.30 .. 0.95


@pytest.fixture(scope="module")
def deit_s_scores(deit_s_spec, rscores):
    cache = {}

    def get(mode="head_dim", seed=0, meta=None):
        key = (mode, seed, json.dumps(meta, sort_keys=True))
        if key not in cache:
            cache[key] = rscores(deit_s_spec, mode, seed=seed, meta=meta)
        return cache[key]
    return get


def _subset(a: np.ndarray, b: np.ndarray) -> bool:
    """Every unit kept in a is kept in b."""
    return not (a & ~b).any()


def _assert_nested(small: SlimPlan, big: SlimPlan) -> None:
    assert _subset(small.attn, big.attn)
    assert _subset(small.mlp, big.mlp)
    assert _subset(small.token, big.token)


def _assert_well_formed(plan: SlimPlan) -> None:
    s = plan.spec
    assert plan.attn.shape == (s.depth, s.num_heads, s.head_dim)
    assert plan.mlp.shape == (s.depth, s.mlp_hidden)
    assert plan.token.shape == (s.depth, s.num_patches)  # patch positions only: prefix never in the masks
    assert not (plan.token[1:] & ~plan.token[:-1]).any()  # kept at l+1 => kept at l
    assert plan.token.any(axis=1).all()  # at least one patch per layer


def _flops_plans(scores, targets, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return [plan_for_flops(scores, r, **kw) for r in targets]


# ---------------------------------------------------------------------------------------------- FLOPs budgets
@pytest.mark.parametrize("mode", MODES)
def test_flops_targets_are_hit_and_nested(deit_s_scores, mode):
    sc = deit_s_scores(mode)
    plans = _flops_plans(sc, TARGETS)
    for r, p in zip(TARGETS, plans):
        _assert_well_formed(p)
        assert abs(p.flops_ratio - r) <= 0.005 * r, (r, p.flops_ratio)
        assert p.info["target"] == r
        assert p.info["achieved"] == pytest.approx(p.flops_ratio, abs=1e-12)
        assert p.macs == count_cost(sc.spec, p).macs == count_cost(sc, p).macs
    for small, big in zip(plans, plans[1:]):
        _assert_nested(small, big)
        assert small.macs < big.macs
    # the default mix prunes every dimension
    low = plans[0].kept_fractions()
    assert all(v < 0.9 for v in low.values()), low


def test_flops_plans_in_head_and_uniform_modes_have_the_mode_shape(deit_s_scores):
    for r in (0.4, 0.7):
        p = plan_for_flops(deit_s_scores("head"), r)
        per_head = p.attn.sum(2)
        assert np.isin(per_head, [0, p.spec.head_dim]).all()  # whole heads only
        assert (per_head == 0).any()
        q = plan_for_flops(deit_s_scores("uniform"), r)
        assert (q.attn == q.attn[:, :1, :]).all()  # the same dims in every head of a layer
        assert not q.attn.all()


@pytest.mark.parametrize("mode", ["head_dim", "uniform"])
def test_multiple_of_8_rounds_widths_and_keeps_costs_exact(deit_s_scores, mode):
    sc = deit_s_scores(mode)
    targets = [0.3, 0.45, 0.6, 0.75, 0.9]
    plans = _flops_plans(sc, targets, multiple=8)
    s = sc.spec
    for r, p in zip(targets, plans):
        dims = p.attn.sum(2)
        assert ((dims % 8 == 0) | (dims == s.head_dim)).all()
        widths = p.mlp.sum(1)
        assert ((widths % 8 == 0) | (widths == s.mlp_hidden)).all()
        assert abs(p.flops_ratio - r) <= 0.005 * r
        assert p.info["achieved"] == pytest.approx(p.flops_ratio, abs=1e-12)
        assert p.info["multiple"] == 8
        assert p.macs == count_cost(s, p).macs
        _assert_well_formed(p)
    for small, big in zip(plans, plans[1:]):
        _assert_nested(small, big)


def test_full_budget_keeps_everything(deit_s_scores, deit_s_spec):
    sc = deit_s_scores()
    p = plan_for_flops(sc, 1.0)
    assert p.attn.all() and p.mlp.all() and p.token.all()
    assert p.flops_ratio == 1.0 and p.cost.params_ratio == 1.0
    assert plan_for_ratios(sc).flops_ratio == 1.0
    full = SlimPlan.full(deit_s_spec)
    assert full.flops_ratio == 1.0 and full.macs == count_cost(deit_s_spec).macs
    assert full.kept_fractions() == {"attn": 1.0, "mlp": 1.0, "token": 1.0}


def test_high_scores_survive_and_zero_scores_go_first(deit_s_spec, rscores):
    sc = rscores(deit_s_spec, seed=11)
    sc.attn[3][2, 5] = 10.0
    sc.mlp[7][100] = 10.0
    sc.token[11][50] = 10.0  # value ~1.005 > any other |tanh(raw)/tanh(3)| at every layer up to 11
    sc.attn[0][0, 0] = 0.0
    sc.mlp[0][0] = 0.0
    for l in range(sc.spec.depth):  # patch 0 is useless at every layer
        sc.token[l][0] = 0.0
    low = plan_for_flops(sc, 0.3, multiple=1)
    assert low.attn[3, 2, 5] and low.mlp[7, 100] and low.token[:, 50].all()
    high = plan_for_flops(sc, 0.95, multiple=1)
    assert not high.attn[0, 0, 0] and not high.mlp[0, 0] and not high.token[:, 0].any()


def test_importance_is_absolute_value(deit_s_spec, rscores):
    sc = rscores(deit_s_spec, seed=12)
    sc.mlp[2][9] = -10.0  # large negative score: important
    sc.attn[4][1, 3] = -10.0
    p = plan_for_ratios(sc, attn=0.05, mlp=0.05)
    assert p.mlp[2, 9] and p.attn[4, 1, 3]


def test_min_ratio_plan_keeps_one_patch_per_layer(deit_s_scores):
    sc = deit_s_scores()
    order = removal_order(sc, (0.0, 0.0, 1.0))
    p = plan_for_flops(sc, order.min_ratio, mix=(0, 0, 1))
    _assert_well_formed(p)
    assert p.attn.all() and p.mlp.all()
    assert (p.token.sum(1) == 1).all()
    assert (p.token == p.token[:1]).all()  # the same, best, patch everywhere


# ---------------------------------------------------------------------------------------------- ratio plans
@pytest.mark.parametrize("mode", MODES)
def test_ratio_plans_keep_requested_fractions_and_are_nested(deit_s_scores, mode):
    sc = deit_s_scores(mode)
    s = sc.spec
    n_attn = {"head_dim": s.depth * s.attn_dim, "head": s.depth * s.num_heads, "uniform": s.depth * s.head_dim}[mode]
    unit = {"head_dim": 1, "head": s.head_dim, "uniform": s.num_heads}[mode]
    n_mlp, n_tok = s.depth * s.mlp_hidden, s.depth * s.num_patches
    ratios = [0.1, 0.25, 0.5, 0.7, 0.9]
    plans = [plan_for_ratios(sc, attn=r, mlp=r, token=r) for r in ratios]
    for r, p in zip(ratios, plans):
        _assert_well_formed(p)
        assert p.attn.sum() == round(r * n_attn) * unit
        assert p.mlp.sum() == round(r * n_mlp)
        assert p.token.sum() == round(r * n_tok)
        assert p.info["method"] == "ratios"
    for small, big in zip(plans, plans[1:]):
        _assert_nested(small, big)
    # dimensions are independent
    p = plan_for_ratios(sc, attn=0.3, mlp=0.6, token=0.9)
    assert p.attn.sum() == round(0.3 * n_attn) * unit
    assert p.mlp.sum() == round(0.6 * n_mlp)
    assert p.token.sum() == round(0.9 * n_tok)
    q = plan_for_ratios(sc, mlp=0.5)
    assert q.attn.all() and q.token.all() and q.mlp.sum() == round(0.5 * n_mlp)


def test_ratio_plans_use_one_global_threshold(deit_s_scores):
    sc = deit_s_scores()
    p = plan_for_ratios(sc, attn=0.4, mlp=0.35, token=0.6)
    a = np.abs(sc.attn_values())
    assert a[p.attn].min() >= a[~p.attn].max()
    m = np.abs(sc.mlp_values())
    assert m[p.mlp].min() >= m[~p.mlp].max()
    # tokens: threshold on e[l, p] = max over l' >= l of |value|, i.e. threshold then OR from the last layer back
    e = np.maximum.accumulate(np.abs(sc.token_values())[::-1], axis=0)[::-1]
    best = int(np.argmax(e[0]))  # the patch kept everywhere so no layer is empty
    others = np.ones_like(p.token)
    others[:, best] = False
    assert e[p.token & others].min() >= e[~p.token].max()
    # layers differ: a global threshold does not keep the same fraction in every layer
    assert len(set(p.mlp.sum(1).tolist())) > 1


def test_official_token_fraction_reproduces_threshold_then_or(deit_s_scores):
    sc = deit_s_scores()
    raw = np.abs(sc.token_values())
    for keep in (0.2, 0.5, 0.8):
        t = np.sort(raw.ravel())[::-1][int(round(keep * raw.size)) - 1]
        official = np.logical_or.accumulate((raw >= t)[::-1], axis=0)[::-1]  # threshold, then OR from the back
        frac = official_token_fraction(sc, keep)
        assert frac >= keep and frac == pytest.approx(official.mean())
        p = plan_for_ratios(sc, token=frac)
        assert p.token.sum() == official.sum()  # the same count; the same pairs up to ties and the patch kept
        assert (p.token == official).mean() > 0.99  # everywhere so that no layer is empty
    with pytest.raises(BudgetError):
        official_token_fraction(sc, 0.0)


def test_ratio_plans_with_multiple(deit_s_scores):
    sc = deit_s_scores()
    plans = [plan_for_ratios(sc, attn=r, mlp=r, token=r, multiple=8) for r in (0.2, 0.5, 0.8)]
    for p in plans:
        assert (p.attn.sum(2) % 8 == 0).all() and (p.mlp.sum(1) % 8 == 0).all()
    for small, big in zip(plans, plans[1:]):
        _assert_nested(small, big)
    plain = plan_for_ratios(sc, attn=0.5, mlp=0.5, multiple=1)
    assert _subset(plain.attn, plans[1].attn) and _subset(plain.mlp, plans[1].mlp)  # rounding only adds


def test_tiny_token_ratio_keeps_a_patch_in_every_layer(deit_s_scores):
    p = plan_for_ratios(deit_s_scores(), token=1e-6)
    _assert_well_formed(p)
    assert (p.token.sum(1) == 1).all()


# ---------------------------------------------------------------------------------------------- budget errors
@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), None])
def test_bad_ratios_are_budget_errors(deit_s_scores, bad, one_line):
    sc = deit_s_scores()
    with pytest.raises(BudgetError) as e:
        plan_for_flops(sc, bad)
    one_line(e.value)
    for kw in ("attn", "mlp", "token"):
        with pytest.raises(BudgetError):
            plan_for_ratios(sc, **{kw: bad})


def test_unreachable_low_budget_is_impossible(deit_s_scores, one_line):
    sc = deit_s_scores()
    low = removal_order(sc).min_ratio
    assert 0 < low < 0.05
    with pytest.raises(BudgetError, match="impossible budget") as e:
        plan_for_flops(sc, low / 2)
    one_line(e.value)
    with pytest.raises(BudgetError, match="impossible budget"):
        plan_for_flops(sc, 0.5, mix=(1, 0, 0))  # attention alone cannot remove half the FLOPs of DeiT-S


@pytest.mark.parametrize("mix", [(0, 0, 0), (0.0, 0.0, 0.0), (-1, 1, 1), (1, 1), (1, 1, 1, 1), (float("nan"), 1, 1)])
def test_bad_mix_is_a_budget_error(deit_s_scores, mix, one_line):
    with pytest.raises(BudgetError) as e:
        plan_for_flops(deit_s_scores(), 0.5, mix=mix)
    one_line(e.value)


@pytest.mark.parametrize("multiple", [0, -8])
def test_bad_multiple_is_a_budget_error(deit_s_scores, multiple):
    with pytest.raises(BudgetError):
        plan_for_flops(deit_s_scores(), 0.5, multiple=multiple)


def test_mix_without_tokens_never_drops_tokens(deit_s_scores):
    sc = deit_s_scores()
    plans = _flops_plans(sc, [0.3, 0.5, 0.8], mix=(1, 1, 0))
    for p in plans:
        assert p.token.all()
        assert not p.attn.all() and not p.mlp.all()
    p = plan_for_flops(sc, 0.6, mix=(0, 1, 0))
    assert p.attn.all() and p.token.all() and not p.mlp.all()
    assert abs(p.flops_ratio - 0.6) <= 0.003


def test_unsearched_dimension_is_never_pruned_by_default(deit_s_scores):
    sc = deit_s_scores(meta={"search": {"searched": {"token": False}}})
    assert sc.searched() == {"attn": True, "mlp": True, "token": False}
    for r in (0.3, 0.6, 0.9):
        p = plan_for_flops(sc, r)
        assert p.token.all()
        assert abs(p.flops_ratio - r) <= 0.005 * r
    assert not plan_for_flops(sc, 0.6, mix=(1, 1, 1)).token.all()  # an explicit mix still can


def test_single_patch_model_token_only_mix(rscores, one_line):
    # nothing can be removed: a full budget is still the full plan, a lower one is impossible (not a crash)
    from timm.models.vision_transformer import VisionTransformer
    with torch.device("meta"):
        m = VisionTransformer(img_size=4, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3)
    sc = rscores(arch_spec(m), seed=0)
    assert sc.spec.num_patches == 1
    p = plan_for_flops(sc, 1.0, mix=(0, 0, 1))
    assert p.attn.all() and p.mlp.all() and p.token.all() and p.flops_ratio == 1.0
    with pytest.raises(BudgetError) as e:
        plan_for_flops(sc, 0.5, mix=(0, 0, 1))
    one_line(e.value)
    assert plan_for_flops(sc, 0.5, mix=(1, 1, 1)).token.all()  # the only patch always stays


def _coarse_scores(meta_arch, rscores):
    # one block, three heads, pruned by whole heads only: few reachable costs
    spec = meta_arch("deit_tiny_patch16_224", img_size=32, depth=1, num_classes=10)
    return rscores(spec, "head", seed=3)


def test_strict_raises_and_lenient_warns_on_unreachable_target(meta_arch, rscores, one_line):
    sc = _coarse_scores(meta_arch, rscores)
    order = removal_order(sc, (1, 0, 0))
    costs = order.macs / order.dense_macs
    assert len(costs) == 4  # dense, minus 1, 2, 3 heads
    target = float((costs[1] + costs[2]) / 2)
    assert target > order.min_ratio and abs(costs[1] - target) > 0.005 * target
    with pytest.raises(BudgetError) as e:
        plan_for_flops(sc, target, mix=(1, 0, 0), strict=True)
    one_line(e.value)
    with pytest.warns(BudgetWarning) as w:
        p = plan_for_flops(sc, target, mix=(1, 0, 0))
    assert "\n" not in str(w[0].message)
    # the nearest reachable plan is returned
    assert abs(p.flops_ratio - target) == pytest.approx(np.abs(costs - target).min())
    assert p.attn.sum(2).tolist()[0].count(0) in (1, 2)
    # reachable targets do not warn, even with strict=True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = plan_for_flops(sc, float(costs[1]), mix=(1, 0, 0), strict=True)
    assert exact.flops_ratio == pytest.approx(costs[1])


# ---------------------------------------------------------------------------------------------- descriptions
def test_table_has_a_row_per_layer_and_a_total(deit_s_scores):
    p = plan_for_flops(deit_s_scores(), 0.5)
    lines = p.table().splitlines()
    L = p.spec.depth
    assert len(lines) == L + 2
    assert lines[0].split()[0] == "layer"
    for l in range(L):
        row = lines[1 + l].split()
        assert row[0] == str(l)
        assert f"{int(p.mlp[l].sum())}/{p.spec.mlp_hidden}" in row
        assert f"{int(p.token[l].sum())}/{p.spec.num_patches}" in row
    assert lines[-1].startswith("total")
    assert f"{100 * p.flops_ratio:.1f}%" in lines[-1]


def test_summary_is_json_and_matches_the_masks(deit_s_scores):
    p = plan_for_flops(deit_s_scores(), 0.5)
    summ = json.loads(json.dumps(p.summary()))
    assert summ["flops"] == p.macs and summ["params"] == p.params
    assert summ["flops_ratio"] == pytest.approx(p.flops_ratio)
    assert summ["kept"] == pytest.approx(p.kept_fractions())
    layers = summ["layers"]
    assert len(layers) == p.spec.depth
    for l, r in enumerate(layers):
        assert r["dims_per_head"] == p.attn[l].sum(1).tolist()
        assert r["heads"] == int((p.attn[l].sum(1) > 0).sum())
        assert r["mlp"] == int(p.mlp[l].sum()) and r["tokens"] == int(p.token[l].sum())
    full = SlimPlan.full(p.spec)
    fixed = full.macs - sum(r["macs"] for r in full.layers())
    assert sum(r["macs"] for r in layers) + fixed == p.macs


# ---------------------------------------------------------------------------------------------- plan files
def _plan(deit_s_scores):
    return plan_for_flops(deit_s_scores(), 0.55, multiple=4)


def test_plan_save_load_round_trip(deit_s_scores, tmp_path):
    p = _plan(deit_s_scores)
    path = p.save(tmp_path / "plan.json")
    q = SlimPlan.load(path)
    assert np.array_equal(p.attn, q.attn) and np.array_equal(p.mlp, q.mlp) and np.array_equal(p.token, q.token)
    assert q.info == p.info
    assert q.cost == p.cost
    assert q.spec.shape_key() == p.spec.shape_key() and q.spec == p.spec
    assert q.table() == p.table()
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]
    for mode in ("head", "uniform"):
        r = plan_for_flops(deit_s_scores(mode), 0.5)
        r2 = SlimPlan.load(r.save(tmp_path / f"{mode}.json"))
        assert np.array_equal(r.attn, r2.attn) and r2.cost == r.cost


def _write_plan_variant(tmp_path, deit_s_scores, edit, name="bad.json"):
    d = _plan(deit_s_scores).to_dict()
    edit(d)
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def _set(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def _non_monotone(d):
    lay = d["layers"]
    dropped = sorted(set(range(d["arch"]["grid"][0] * d["arch"]["grid"][1])) - set(lay[3]["tokens"]))[0]
    lay[4]["tokens"] = sorted(lay[4]["tokens"] + [dropped])
    d.pop("flops")


BAD_PLANS = {
    "wrong_version": lambda d: _set(d, ["format_version"], 999),
    "string_version": lambda d: _set(d, ["format_version"], "1"),
    "foreign_format": lambda d: _set(d, ["format"], "something-else"),
    "index_out_of_range": lambda d: d["layers"][2]["tokens"].append(196),
    "negative_index": lambda d: _set(d, ["layers", 0, "mlp"], [-1, 3]),
    "repeated_index": lambda d: _set(d, ["layers", 0, "mlp"], [3, 3]),
    "float_index": lambda d: _set(d, ["layers", 0, "mlp"], [1.5]),
    "head_index_out_of_range": lambda d: _set(d, ["layers", 1, "heads", 0], [64]),
    "too_few_heads": lambda d: d["layers"][1]["heads"].pop(),
    "too_few_layers": lambda d: d["layers"].pop(),
    "layer_not_a_dict": lambda d: _set(d, ["layers", 0], 7),
    "layers_missing": lambda d: d.pop("layers"),
    "non_monotone_tokens": _non_monotone,
    "inconsistent_flops": lambda d: _set(d, ["flops"], d["flops"] + 1),
    "arch_missing": lambda d: d.pop("arch"),
    "arch_incomplete": lambda d: d["arch"].pop("depth"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_damaged_plan_files_are_score_file_errors(deit_s_scores, tmp_path, case, one_line):
    path = _write_plan_variant(tmp_path, deit_s_scores, BAD_PLANS[case])
    with pytest.raises(ScoreFileError) as e:
        SlimPlan.load(path)
    one_line(e.value)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"a": 1}', b"null",
                                     b"[" * 100000])
def test_non_plan_files_are_score_file_errors(tmp_path, content, one_line):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(ScoreFileError) as e:
        SlimPlan.load(path)
    one_line(e.value)


def test_missing_plan_file_is_a_score_file_error(tmp_path, one_line):
    with pytest.raises(ScoreFileError) as e:
        SlimPlan.load(tmp_path / "nope.json")
    one_line(e.value)
    with pytest.raises(ScoreFileError):
        SlimPlan.load(tmp_path)  # a directory


def test_plan_with_an_empty_layer_on_a_model_without_prefix_is_a_score_file_error(tmp_path, meta_arch, one_line):
    spec = meta_arch("vit_base_patch16_224", img_size=32, depth=2, embed_dim=16, num_heads=2, class_token=False,
                     global_pool="avg", num_classes=3)
    assert spec.num_prefix_tokens == 0
    d = SlimPlan.full(spec).to_dict()
    d["layers"][1]["tokens"] = []
    d.pop("flops")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ScoreFileError) as e:
        SlimPlan.load(path)
    one_line(e.value)


def test_plan_save_is_atomic(deit_s_scores, tmp_path, monkeypatch, one_line):
    import vitslim_core.io as vio
    p = _plan(deit_s_scores)
    path = p.save(tmp_path / "plan.json")
    before = path.read_bytes()
    other = plan_for_flops(deit_s_scores(), 0.8)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vio.os, "replace", broken_replace)
    with pytest.raises(VitSlimError) as e:
        other.save(path)
    one_line(e.value)
    assert "disk is full" in str(e.value)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]
    assert SlimPlan.load(path).macs == p.macs
    # a writer that dies half way through the temp file
    import pathlib
    real_write = pathlib.Path.write_bytes

    def half_write(self, data):
        real_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(pathlib.Path, "write_bytes", half_write)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]
    # a nested folder that does not exist yet is created
    q = other.save(tmp_path / "a" / "b" / "plan.json")
    assert SlimPlan.load(q).macs == other.macs


# ---------------------------------------------------------------------------------------------- properties
def _spec_strategy():
    @st.composite
    def build(draw):
        from timm.models.vision_transformer import VisionTransformer
        depth = draw(st.integers(1, 3))
        heads = draw(st.integers(1, 3))
        head_dim = draw(st.sampled_from([2, 4, 8]))
        rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        if rows * cols == 1:  # one patch: see test_single_patch_model_token_only_mix
            cols = 2
        cls = draw(st.booleans())
        regs = draw(st.integers(0, 2))
        kw = dict(img_size=(4 * rows, 4 * cols), patch_size=4, embed_dim=heads * head_dim, depth=depth,
                  num_heads=heads, mlp_ratio=draw(st.sampled_from([1.0, 2.0, 3.0])), class_token=cls,
                  reg_tokens=regs, global_pool="token" if cls else "avg", no_embed_class=regs > 0,
                  qkv_bias=draw(st.booleans()), init_values=draw(st.sampled_from([None, 0.1])), num_classes=3)
        with torch.device("meta"):
            m = VisionTransformer(**kw)
        return arch_spec(m)
    return build()


def _random_scores_np(spec, mode, seed, ties):
    sc = MaskScores.dense(spec, mode)
    g = torch.Generator().manual_seed(seed)

    def r(shape):
        v = torch.rand(shape, generator=g)
        return torch.round(v * 3) / 3 if ties else v  # ties: only a few distinct values
    sc.attn = [r(v.shape) for v in sc.attn]
    sc.mlp = [r(v.shape) for v in sc.mlp]
    sc.token = [3 * r(v.shape) for v in sc.token]
    sc.validate()
    return sc


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_spec_strategy(), mode=st.sampled_from(MODES), multiple=st.sampled_from([1, 2, 4]),
       mix=st.sampled_from([None, (1, 1, 1), (1, 2, 0.5), (0, 1, 1), (1, 0, 0), (0, 0, 1)]),
       seed=st.integers(0, 10_000), ties=st.booleans(),
       fractions=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5))
def test_solver_properties_on_random_small_models(spec, mode, multiple, mix, seed, ties, fractions):
    sc = _random_scores_np(spec, mode, seed, ties)
    order = removal_order(sc, mix, multiple)
    # the cost curve the solver searches is the exact cost of the plan after every prefix of removals
    idx = sorted({0, len(order.macs) - 1, *np.linspace(0, len(order.macs) - 1, 7).astype(int).tolist()})
    prefix_plans = [order.plan(order.counts[k].tolist()) for k in idx]
    for k, p in zip(idx, prefix_plans):
        _assert_well_formed(p)
        assert p.macs == int(order.macs[k]) == count_cost(spec, p).macs
    for small, big in zip(prefix_plans[::-1], prefix_plans[::-1][1:]):
        _assert_nested(small, big)
    assert np.all(np.diff(order.macs) <= 0)
    # FLOPs budgets between the smallest reachable cost and 1: nearest plan, nested, well formed
    lo = order.min_ratio
    targets = sorted({min(1.0, max(lo, lo + f * (1 - lo))) for f in fractions})
    plans = []
    for t in targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)
            p = plan_for_flops(sc, t, mix=mix, multiple=multiple)
        _assert_well_formed(p)
        assert p.macs == count_cost(spec, p).macs
        assert p.flops_ratio == pytest.approx(p.info["achieved"], abs=1e-12)
        best = np.abs(order.macs / order.dense_macs - t).min()
        assert abs(p.flops_ratio - t) <= best + 1e-12
        if mode == "head":
            assert np.isin(p.attn.sum(2), [0, spec.head_dim]).all()
        if mode == "uniform":
            assert (p.attn == p.attn[:, :1]).all()
        if multiple > 1 and mode != "head":
            dims = p.attn.sum(2)
            assert ((dims % multiple == 0) | (dims == spec.head_dim)).all()
            w = p.mlp.sum(1)
            assert ((w % multiple == 0) | (w == spec.mlp_hidden)).all()
        if mix is not None:
            for k, name in enumerate(("attn", "mlp", "token")):
                if mix[k] == 0:
                    assert getattr(p, name).all()
        plans.append(p)
    for small, big in zip(plans, plans[1:]):
        _assert_nested(small, big)
    # ratio plans: nested as ratios grow, exact counts of units without rounding
    ratios = sorted({max(1e-3, f) for f in fractions})
    rplans = [plan_for_ratios(sc, attn=r, mlp=r, token=r, multiple=multiple) for r in ratios]
    for r, p in zip(ratios, rplans):
        _assert_well_formed(p)
        if multiple == 1:
            n_mlp = spec.depth * spec.mlp_hidden
            assert abs(int(p.mlp.sum()) - r * n_mlp) <= 0.5 + 1e-9
    for small, big in zip(rplans, rplans[1:]):
        _assert_nested(small, big)



def test_plans_follow_edited_scores(deit_s_spec, rscores):
    # a notebook or the app may pin a unit by raising its score; the next plan must see the edit
    sc = rscores(deit_s_spec, seed=21)
    before = plan_for_ratios(sc, mlp=0.1)
    unit = int(np.flatnonzero(~before.mlp[0])[0])
    sc.mlp[0][unit] = 100.0  # in-place edit of a score tensor
    assert plan_for_ratios(sc, mlp=0.1).mlp[0, unit]


def test_plans_follow_replaced_score_tensors(deit_s_spec, rscores):
    sc = rscores(deit_s_spec, seed=22)
    assert plan_for_ratios(sc, mlp=0.9).mlp[3].any()
    sc.mlp[3] = torch.zeros_like(sc.mlp[3])  # layer 3's MLP is useless: first to go
    sc.validate()
    assert not plan_for_ratios(sc, mlp=0.9).mlp[3].any()
