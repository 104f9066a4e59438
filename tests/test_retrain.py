"""Retraining the physically slimmed model: it learns, resumes exactly, writes loadable outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitslim_core import count_cost, load_slim
from vitslim_core.demo import DEMO_DIR
from vitslim_core.retrain import RetrainConfig, retrain
from vitslim_core.run_folder import load_run
from vitslim_core.slim import slim_model
from vitslim_core.train import evaluate

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").is_file(), reason="bundled demo missing")

BASE = dict(run=str(DEMO_DIR), flops=0.4, batch_size=32, epochs=1, device="cpu", log_every=2, seed=0,
            augment=False)


def _test_loss(model) -> float:
    from vitslim_core.data import load_data
    from vitslim_core.models import DIGITS_MEAN, DIGITS_STD  # noqa: F401  (the demo's stats)
    scores, _ = load_run(DEMO_DIR, with_masks=False)
    d = scores.meta["data"]
    bundle = load_data("digits", img_size=tuple(d["input_size"][1:]), in_chans=d["input_size"][0],
                       mean=d["mean"], std=d["std"], augment=False)
    return evaluate(model, bundle.test, batch_size=360)["loss"]


def test_retraining_lowers_the_slim_models_loss(tmp_path):
    scores, searched = load_run(DEMO_DIR)
    cfg = dict(BASE, flops=0.25)
    res = retrain(RetrainConfig(out=str(tmp_path / "rt"), lr=5e-4, max_steps=30, distill="none", label_smoothing=0.0,
                                **cfg))
    before = _test_loss(slim_model(searched, res.plan))
    after = _test_loss(load_slim(tmp_path / "rt" / "last"))
    assert after < before, (before, after)
    assert abs(count_cost(load_slim(tmp_path / "rt" / "best")).flops_ratio - 0.25) < 0.01
    hist = json.loads((tmp_path / "rt" / "history.json").read_text())
    assert hist["complete"] and hist["plan"]["flops_ratio"] == pytest.approx(res.plan.flops_ratio)


def test_retrain_resume_continues_exactly(tmp_path):
    cfg = RetrainConfig(lr=5e-4, max_steps=8, checkpoint_every=2, distill="hard", mixup=0.2, **BASE)
    retrain(cfg, out=str(tmp_path / "full"))
    calls = {"n": 0}

    def stop_after_5() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    part = retrain(cfg, out=str(tmp_path / "part"), should_stop=stop_after_5)
    assert part.history.get("stopped") and not part.history["complete"]
    retrain(cfg, out=str(tmp_path / "part"), resume=True)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_retrain_with_plan_file_and_no_distillation(tmp_path):
    from vitslim_core import MaskScores, plan_for_ratios
    plan = plan_for_ratios(MaskScores.load(DEMO_DIR), attn=0.5, mlp=0.5, token=0.7)
    plan.save(tmp_path / "plan.json")
    cfg = dict(BASE, flops=None)
    res = retrain(RetrainConfig(out=str(tmp_path / "rt"), plan=str(tmp_path / "plan.json"), distill="none",
                                max_steps=2, **cfg))
    assert (res.plan.attn == plan.attn).all() and (res.plan.token == plan.token).all()
    assert Path(tmp_path / "rt" / "last" / "slim.json").is_file()


def test_a_fresh_run_into_a_used_folder_replaces_its_best_model(tmp_path):
    from vitslim_core import load_slim
    out = str(tmp_path / "rt")
    retrain(RetrainConfig(out=out, max_steps=2, **dict(BASE, flops=0.8)))
    res = retrain(RetrainConfig(out=out, max_steps=2, **dict(BASE, flops=0.4)))
    best, last = load_slim(tmp_path / "rt" / "best"), load_slim(tmp_path / "rt" / "last")
    assert count_cost(best).params == count_cost(last).params  # the new plan's model, not the old one
    assert json.loads((tmp_path / "rt" / "best" / "eval.json").read_text())["top1"] == pytest.approx(res.best_top1)
