"""Baseline scorers, the Torch-Pruning wrapper, the narrower dense ViT and the fidelity benchmark (fast mode).

Everything runs on the bundled digits demo (its pretrained dense weights and its searched run).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vitslim_core import MaskScores, count_cost, plan_for_flops, slim_model
from vitslim_core import baselines as B
from vitslim_core.demo import DEMO_DIR
from vitslim_core.errors import VitSlimError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_fidelity as bench  # noqa: E402

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "pretrained.safetensors").is_file(), reason="no bundled demo")


@pytest.fixture(scope="module")
def demo():
    """(scores, pretrained dense model, train set, test set) of the digits demo."""
    from safetensors.torch import load_file
    from vitslim_core.data import load_for
    from vitslim_core.models import rebuild_model
    from vitslim_core.run_folder import load_run
    scores, _ = load_run(DEMO_DIR)
    dense = rebuild_model(scores.model_recipe, expect=scores.spec)
    dense.load_state_dict(load_file(str(DEMO_DIR / "pretrained.safetensors")), strict=True)
    bundle = load_for(scores.meta["data"], augment=False)
    return scores, dense.eval(), bundle.train, bundle.test


@pytest.fixture(scope="module")
def calib(demo):
    return B.calibration_batches(demo[2], n_batches=2, batch_size=32, seed=0)


def _flat(s: MaskScores) -> np.ndarray:
    return np.concatenate([s.attn_values().ravel(), s.mlp_values().ravel(), s.token_values().ravel()])


# ---------------------------------------------------------------------------- scorers
def test_every_scorer_returns_valid_scores_of_the_run_shapes_and_they_differ(demo, calib):
    scores, dense, _, _ = demo
    sp = scores.spec
    made = {}
    for name, cls in B.SCORERS.items():
        s = cls()(dense, scores, calib)
        assert isinstance(s, MaskScores) and s.attn_mode == "head_dim"
        s.validate()
        assert [tuple(a.shape) for a in s.attn] == [(sp.num_heads, sp.head_dim)] * sp.depth
        assert [tuple(m.shape) for m in s.mlp] == [(sp.mlp_hidden,)] * sp.depth
        assert [tuple(t.shape) for t in s.token] == [(sp.num_patches,)] * sp.depth
        assert s.meta["baseline"]["scorer"] == name and s.meta["model"] == scores.meta["model"]
        assert all(bool(torch.isfinite(t).all()) for t in s.attn + s.mlp + s.token)
        tv = s.token_values()
        assert tv.min() >= 0 and tv.max() <= 1 + 1e-9 and np.unique(np.round(tv, 9)).size > 1
        plan = plan_for_flops(s, 0.5)  # the solver takes it like searched scores
        assert abs(plan.flops_ratio - 0.5) < 0.01
        made[name] = s
    made["vitslim"] = scores
    names = list(made)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            fa, fb = _flat(made[a]), _flat(made[b])
            assert not np.allclose(fa, fb), f"{a} and {b} give the same scores"
            # and they choose different units at the same budget
            pa, pb = plan_for_flops(made[a], 0.5), plan_for_flops(made[b], 0.5)
            assert (pa.attn != pb.attn).any() or (pa.mlp != pb.mlp).any() or (pa.token != pb.token).any()


def test_random_scorer_is_seeded(demo):
    scores, dense, _, _ = demo
    a, b, c = (B.RandomScorer(seed=s)(dense, scores) for s in (0, 0, 1))
    assert np.array_equal(_flat(a), _flat(b))
    assert not np.allclose(_flat(a), _flat(c))


def test_magnitude_scores_are_the_unit_weight_norms(demo, calib):
    scores, dense, _, _ = demo
    s = B.MagnitudeScorer()(dense, scores, calib)
    blk = dense.blocks[2]
    H, d = blk.attn.num_heads, blk.attn.head_dim
    h, j, u = 1, 5, 17
    rows = [k * H * d + h * d + j for k in range(3)]
    w = blk.attn.qkv.weight.detach()
    want = (w[rows].pow(2).sum() + blk.attn.qkv.bias.detach()[rows].pow(2).sum()
            + blk.attn.proj.weight.detach()[:, h * d + j].pow(2).sum()).sqrt()
    assert float(s.attn[2][h, j]) == pytest.approx(float(want), rel=1e-5)
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    want = (fc1.weight.detach()[u].pow(2).sum() + fc1.bias.detach()[u] ** 2
            + fc2.weight.detach()[:, u].pow(2).sum()).sqrt()
    assert float(s.mlp[2][u]) == pytest.approx(float(want), rel=1e-5)
    # weights do not depend on the data; the token activations do
    other = B.MagnitudeScorer()(dense, scores, B.calibration_batches(demo[2], 2, 32, seed=7))
    assert np.array_equal(s.attn_values(), other.attn_values()) and np.array_equal(s.mlp_values(), other.mlp_values())
    assert not np.allclose(s.token_values(), other.token_values())


def test_magnitude_and_taylor_need_calibration_data(demo):
    scores, dense, _, _ = demo
    for cls in (B.MagnitudeScorer, B.TaylorScorer):
        with pytest.raises(VitSlimError, match="calibration"):
            cls()(dense, scores, [])


def test_taylor_scores_are_non_negative_and_respond_to_the_data(demo):
    scores, dense, train, _ = demo
    one = B.TaylorScorer()(dense, scores, B.calibration_batches(train, 1, 32, seed=0))
    two = B.TaylorScorer()(dense, scores, B.calibration_batches(train, 1, 32, seed=1))
    for s in (one, two):
        assert all(float(t.min()) >= 0 for t in s.attn + s.mlp + s.token)
        assert all(float(t.max()) > 0 for t in s.attn + s.mlp)
    for get in (MaskScores.attn_values, MaskScores.mlp_values, MaskScores.token_values):
        assert not np.allclose(get(one), get(two)), get.__name__
    assert not any(p.grad is not None for p in dense.parameters()), "the caller's model got gradients"


def test_taylor_matches_its_definition_on_one_unit(demo):
    scores, dense, train, _ = demo
    batch = B.calibration_batches(train, 1, 16, seed=3)
    s = B.TaylorScorer()(dense, scores, batch)
    net = B.plain_copy(dense)
    x, y = batch[0]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    blk = net.blocks[1]
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    u = 9
    want = ((fc1.weight[u] * fc1.weight.grad[u]).abs().sum() + (fc1.bias[u] * fc1.bias.grad[u]).abs()
            + (fc2.weight[:, u] * fc2.weight.grad[:, u]).abs().sum())
    assert float(s.mlp[1][u]) == pytest.approx(float(want.detach()), rel=1e-4, abs=1e-9)


# ---------------------------------------------------------------------------- Torch-Pruning
@pytest.mark.parametrize("importance", B.TP_IMPORTANCES)
@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_torch_pruning_hits_the_macs_and_flop_counter_agrees(demo, calib, importance, budget):
    pytest.importorskip("torch_pruning")
    scores, dense, _, test = demo
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = B.prune_with_torch_pruning(dense, budget, importance, calib)
    plan, model = res.plan, res.model
    dense_macs = count_cost(dense).macs
    assert abs(plan.macs / dense_macs - budget) <= 0.02 * budget
    assert B.measured_macs(model) == plan.macs == count_cost(model).macs
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items()), "the input model changed"
    # only head dims and MLP channels: residual width and tokens stay
    C = dense.embed_dim
    for blk in model.blocks:
        assert blk.attn.proj.out_features == C and blk.mlp.fc2.out_features == C and blk.attn.qkv.in_features == C
    assert plan.token.all() and plan.attn.any(axis=(1, 2)).all()
    kept = plan.attn.sum(2)  # TP removes the same dims in every head of a layer
    assert (kept == kept[:, :1]).all()
    assert (plan.attn.sum((1, 2)) < plan.attn[0].size).any() and (plan.mlp.sum(1) < plan.mlp.shape[1]).any()
    # the plan describes the pruned model exactly (original attention scale kept)
    ref = slim_model(dense, plan, fold_scores=False)
    x = torch.stack([test[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-4)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        assert torch.allclose(model(x), ref(x), atol=1e-4)


def test_torch_pruning_importances_differ(demo, calib):
    pytest.importorskip("torch_pruning")
    _, dense, _, _ = demo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mag = B.prune_with_torch_pruning(dense, 0.5, "magnitude", calib).plan
        tay = B.prune_with_torch_pruning(dense, 0.5, "taylor", calib).plan
    assert (mag.attn != tay.attn).any() or (mag.mlp != tay.mlp).any()
    with pytest.raises(VitSlimError, match="importance"):
        B.prune_with_torch_pruning(dense, 0.5, "l1")


def test_narrow_recipe_has_the_flops(demo):
    from vitslim_core.models import rebuild_model
    scores, dense, _, _ = demo
    for budget in (0.5, 0.3):
        rec = B.narrow_recipe(scores.model_recipe, budget)
        m = rebuild_model(rec)
        assert abs(count_cost(m).macs / count_cost(dense).macs - budget) <= 0.005 * budget
        assert B.measured_macs(m) == count_cost(m).macs
        assert m.blocks[0].attn.num_heads == dense.blocks[0].attn.num_heads and m.embed_dim < dense.embed_dim


# ---------------------------------------------------------------------------- the benchmark
@pytest.fixture(scope="module")
def fast_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    assert bench.main(["--fast", "--out", str(out)]) == 0
    return out


def test_fast_benchmark_runs_end_to_end_and_writes_json_md_png(fast_out):
    res = json.loads((fast_out / "fidelity.json").read_text())
    assert res["format"] == bench.FORMAT and res["config"]["fast"]
    ran = {c["method"] for c in res["cells"].values()}
    unreachable = {k.split("|")[0] for k in res["unreachable"]}
    assert ran | unreachable == set(bench.METHODS)
    assert unreachable == {"vitslim-mlp"}  # MLP alone cannot remove half of the FLOPs
    for c in res["cells"].values():
        assert abs(c["flops_ratio"] - 0.5) < 0.02 * 0.5, c["method"]
        assert c["train"]["steps"] == 3 and 0 <= c["after"]["top1"] <= 100 and c["after"]["nll"] > 0
        assert (c["before"] is None) == (c["method"] == "scratch")
    lat = res["latency"]["0.5"]
    assert set(lat["methods"]) == ran and {r["model"] for r in lat["rows"]} == ran | {"dense"}
    assert all(r["batch_size"] == 64 for r in lat["rows"])
    md = (fast_out / "fidelity.md").read_text()
    assert "FAST MODE" in md and "Torch-Pruning magnitude" in md and "unreachable" in md
    assert "PASS" in md or "FAIL" in md
    png = (fast_out / "fidelity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_cache_skips_completed_cells(fast_out, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell was computed again")

    before = json.loads((fast_out / "fidelity.json").read_text())
    monkeypatch.setattr(bench, "run_cell", refuse)
    import vitslim_core.bench
    monkeypatch.setattr(vitslim_core.bench, "compare_latency", refuse)
    res = bench.run(bench.fast_config(out=str(fast_out)), log=lambda s: None)
    assert res["cells"] == before["cells"] and res["latency"] == before["latency"]


def test_a_new_seed_runs_only_its_cells_and_fresh_starts_over(fast_out, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(fast_out, out)
    calls = []
    real = bench.run_cell

    def counting(ctx, results, method, budget, seed, tag):
        calls.append((method.key, budget, seed))
        return real(ctx, results, method, budget, seed, tag)

    monkeypatch.setattr(bench, "run_cell", counting)
    cfg = bench.fast_config(out=str(out), seeds=(0, 1), methods=("random", "vitslim"))
    res = bench.run(cfg, log=lambda s: None)
    assert sorted(calls) == [("random", 0.5, 1), ("vitslim", 0.5, 1)]
    assert "random|0.5|1" in res["cells"] and "random|0.5|0" in res["cells"]
    calls.clear()
    res = bench.run(bench.fast_config(out=str(out), methods=("random",)), fresh=True, log=lambda s: None)
    assert calls == [("random", 0.5, 0)] and list(res["cells"]) == ["random|0.5|0"]


def test_other_settings_are_refused_without_fresh(fast_out, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(fast_out, out)
    with pytest.raises(VitSlimError, match="other settings"):
        bench.run(bench.fast_config(out=str(out), retrain_steps=4), log=lambda s: None)
    assert bench.main(["--fast", "--out", str(out), "--methods", "nonsense"]) == 2


def test_two_workers_on_one_results_file_keep_each_others_cells(tmp_path):
    path = tmp_path / "fidelity.json"
    a = {"fingerprint": "f", "cells": {"random|0.5|0": {"x": 1}}, "before": {}, "unreachable": {}, "latency": {},
         "searches": {}, "dense": {"top1": 1.0}}
    b = {"fingerprint": "f", "cells": {"scratch|0.5|0": {"x": 2}}, "before": {}, "unreachable": {"m|0.5": "u"},
         "latency": {}, "searches": {}, "dense": {"top1": 1.0}}
    bench.save_results(path, a)
    bench.save_results(path, b)
    got = json.loads(path.read_text())
    assert set(got["cells"]) == {"random|0.5|0", "scratch|0.5|0"} and got["unreachable"] == {"m|0.5": "u"}
    other = {**b, "fingerprint": "g", "cells": {"taylor|0.5|0": {}}}
    bench.save_results(path, other)  # other settings: nothing of the old file is merged in
    assert set(json.loads(path.read_text())["cells"]) == {"taylor|0.5|0"}


def test_checks_say_pass_and_fail_plainly():
    def cell(method, seed, top1, ips=None):
        return {"method": method, "budget": 0.5, "seed": seed, "flops_ratio": 0.5, "params": 1, "total_images": 1,
                "train": {"steps": 1}, "seconds": {"total": 1}, "before": {"top1": top1, "nll": 1.0},
                "after": {"top1": top1, "nll": 1.0}}
    cells = {}
    for s, (a, r, t) in enumerate([(98.0, 90.0, 97.9), (98.2, 91.0, 98.3), (98.1, 90.5, 98.1)]):
        cells[f"vitslim|0.5|{s}"] = cell("vitslim", s, a)
        cells[f"random|0.5|{s}"] = cell("random", s, r)
        cells[f"tp-magnitude|0.5|{s}"] = cell("tp-magnitude", s, t)
        cells[f"vitslim-attn|0.5|{s}"] = cell("vitslim-attn", s, a - 1)
    results = {"config": {}, "dense": {"top1": 98.5}, "cells": cells, "unreachable": {"vitslim-mlp|0.5": "x"},
               "latency": {"0.5": {"rows": [{"model": "vitslim", "images_per_s": 100.0, "speedup": 2.0},
                                            {"model": "tp-magnitude", "images_per_s": 120.0, "speedup": 2.4}]}}}
    by = {c["text"]: c["status"] for c in bench.checks(results)}
    texts = list(by)
    assert by[next(t for t in texts if "within" in t)] == "PASS"
    assert by[next(t for t in texts if "random" in t)] == "PASS"
    assert by[next(t for t in texts if "vs Torch-Pruning magnitude" in t)] == "FAIL"  # behind, not ahead
    assert by[next(t for t in texts if "attention only" in t)] == "PASS"
    assert by[next(t for t in texts if "MLP only" in t)] == "n/a"
    assert by[next(t for t in texts if "img/s" in t)] == "FAIL"
    assert "Taylor" in " ".join(texts) and by[next(t for t in texts if "vs Taylor" in t)] == "n/a"  # not run
