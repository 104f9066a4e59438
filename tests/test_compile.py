"""Issue 12: scores stacked per dimension, factors computed once per forward, --compile.

The reference file ``data/search_reference_old_layout.safetensors`` holds the scores of a 6-step digits
search written by vitslim before this change (one score parameter per layer, per-layer factors, the
for-loop AdamW); the same search must give the same scores now, eagerly and compiled.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from vitslim_core import MaskScores, add_masks, get_masks, plan_for_ratios, slim_model
from vitslim_core.search import SearchConfig, search
from vitslim_core.train import (CompiledModel, compile_model, strip_compile_prefix, upgrade_optimizer_state)

REFERENCE = Path(__file__).parent / "data" / "search_reference_old_layout.safetensors"
REF_CFG = dict(model="digits-vit", data="digits", batch_size=32, device="cpu", log_every=2, seed=3, epochs=1,
               lr=1e-3, mask_lr=5e-2, max_steps=6, w_attn=1e-2, w_mlp=1e-2, w_token=1e-2)


def _worst(a: MaskScores, b: MaskScores) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.attn + a.mlp + a.token, b.attn + b.mlp + b.token))


def _tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, embed_dim=48,
                             num_heads=3, **kw)


# ---------------------------------------------------------------------------------------------- layout
def test_scores_are_one_parameter_per_dimension_with_per_layer_views():
    model = add_masks(_tiny())
    masks = get_masks(model)
    assert [n for n, _ in masks.named_parameters()] == ["attn_scores", "mlp_scores", "token_scores"]
    assert masks.attn_scores.shape == (2, 3, 16) and masks.token_scores.shape == (2, 4)
    with torch.no_grad():
        masks.attn[1].score[2, 5] = 0.25  # a per-layer view writes through to the shared parameter
        masks.token[0].score.fill_(-1.0)
    assert float(masks.attn_scores[1, 2, 5].detach()) == 0.25 and bool((masks.token_scores[0] == -1).all())
    assert torch.equal(masks.token[0].value(), masks.token_values()[0])
    assert masks._step is None  # the per-forward factors live only during a forward


def test_layers_called_outside_the_model_forward_compute_their_own_factors():
    model = add_masks(_tiny()).eval()
    with torch.no_grad():
        get_masks(model).attn_scores.uniform_(0, 1.5)
        get_masks(model).mlp_scores.uniform_(0, 1.5)
        get_masks(model).token_scores.uniform_(-1, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = model(x)  # factors computed once, by the model's forward pre-hook
        parts = model.forward_head(model.forward_features(x))  # no hook: each layer computes its own
    assert (whole - parts).abs().max().item() < 1e-6


def test_factors_are_dropped_after_a_failed_forward():
    model = add_masks(_tiny())
    with pytest.raises(Exception):
        model(torch.randn(2, 3, 48, 48))  # wrong image size
    assert get_masks(model)._step is None


def test_state_dict_of_per_layer_scores_still_loads():
    a = add_masks(_tiny(), attn="head")
    with torch.no_grad():
        get_masks(a).attn_scores.uniform_(0, 1)
        get_masks(a).token_scores.uniform_(-1, 3)
    old = {k: v for k, v in a.state_dict().items() if not k.startswith("slim_masks.")}
    for kind in ("attn", "mlp", "token"):  # the keys of vitslim before issue 12
        for l, t in enumerate(getattr(get_masks(a), f"{kind}_scores")):
            old[f"slim_masks.{kind}.{l}.score"] = t.detach().clone()
    b = add_masks(_tiny(), attn="head")
    b.load_state_dict(old, strict=True)
    for kind in ("attn", "mlp", "token"):
        assert torch.equal(getattr(get_masks(a), f"{kind}_scores"), getattr(get_masks(b), f"{kind}_scores"))


def test_optimizer_state_of_per_layer_scores_is_stacked():
    torch.manual_seed(0)
    per_layer = [torch.nn.Parameter(torch.rand(5)) for _ in range(3)]
    stacked = torch.nn.Parameter(torch.stack([p.detach().clone() for p in per_layer]))
    w = torch.nn.Parameter(torch.rand(4))
    w2 = torch.nn.Parameter(w.detach().clone())
    old = torch.optim.AdamW([{"params": [w], "name": "decay"}, {"params": per_layer, "name": "masks"}], lr=0.1)
    new = torch.optim.AdamW([{"params": [w2], "name": "decay"}, {"params": [stacked], "name": "masks"}], lr=0.1)
    for _ in range(2):
        old.zero_grad()
        (sum((p * torch.arange(5.0)).sum() ** 2 for p in per_layer) + (w ** 2).sum()).backward()
        old.step()
    with torch.no_grad():  # the old run's parameters, as the model's state_dict upgrade stacks them
        stacked.copy_(torch.stack(list(per_layer)))
        w2.copy_(w)
    new.load_state_dict(upgrade_optimizer_state(old.state_dict(), new))
    assert new.state_dict()["state"][1]["exp_avg"].shape == (3, 5)
    for _ in range(2):
        for o in (old, new):
            o.zero_grad()
        (sum((p * torch.arange(5.0)).sum() ** 2 for p in per_layer) + (w ** 2).sum()).backward()
        ((stacked * torch.arange(5.0)).sum(1) ** 2).sum().add((w2 ** 2).sum()).backward()
        old.step()
        new.step()
    assert torch.allclose(stacked, torch.stack(list(per_layer)), atol=1e-6)
    assert torch.allclose(w, w2)


def test_search_gives_the_scores_of_the_per_layer_layout(tmp_path):
    res = search(SearchConfig(out=str(tmp_path / "run"), **REF_CFG))
    ref = MaskScores.load(REFERENCE)
    assert _worst(ref, res.scores) <= 1e-5
    assert max(float((v - 1).abs().max()) for v in ref.attn) > 0.05  # the search did move the scores


# ---------------------------------------------------------------------------------------------- compile
def test_masked_and_slim_models_compile_without_graph_breaks():
    model = add_masks(_tiny()).train()
    x = torch.randn(2, 3, 32, 32)
    e = torch._dynamo.explain(CompiledModel(model)._compiled)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    with torch.no_grad():
        get_masks(model).token_scores[:, :2] = -2.0
    slim = slim_model(model, plan_for_ratios(MaskScores.from_model(model), attn=0.5, mlp=0.5, token=0.6)).train()
    e = torch._dynamo.explain(slim)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons


def test_compiled_checkpoint_keys_are_the_plain_ones():
    model = add_masks(_tiny())
    keys = list(model.state_dict())
    assert list(strip_compile_prefix(torch.compile(model).state_dict())) == keys  # torch's own wrapper
    assert list(strip_compile_prefix(CompiledModel(model).state_dict())) == keys


def test_compile_falls_back_with_one_line(monkeypatch):
    import vitslim_core.train as train
    model = _tiny()
    monkeypatch.setattr(train, "compile_problem", lambda device: "no C++ compiler (inductor needs one on CPU)")
    with pytest.warns(RuntimeWarning, match="running eagerly") as rec:
        assert compile_model(model) is model
    assert len(rec) == 1 and "\n" not in str(rec[0].message)

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("InductorError: compiler exploded\nlong trace")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    wrapped = CompiledModel(model)
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match=r"compiler exploded\); running eagerly") as rec:
        out = wrapped(x)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(wrapped(x), out) and torch.equal(model(x), out)


@pytest.mark.slow
def test_compiled_search_gives_the_same_scores_and_checkpoints(tmp_path):
    """A compiled search stopped after 3 steps and resumed eagerly ends where the eager search ends
    (checkpoints of compiled and eager runs are interchangeable).

    The backbone's weights are frozen (``masks_only``): compiled kernels round differently (about 1e-7),
    and AdamW turns a weight gradient near zero into a full step of either sign, so with the weights
    trained the two runs drift apart by about 1e-3 within 6 steps; the masks alone stay within 1e-6.
    """
    cfg = SearchConfig(checkpoint_every=3, **{**REF_CFG, "masks_only": True})
    eager = search(cfg, out=str(tmp_path / "eager")).scores
    calls = {"n": 0}

    def stop_after_3() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    part = search(cfg, out=str(tmp_path / "run"), compile=True, should_stop=stop_after_3)
    assert part.history.get("stopped") and part.history["step"] == 3
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])
    done = search(cfg, out=str(tmp_path / "run"), compile=False, resume=True)
    assert done.history["complete"]
    assert _worst(eager, done.scores) <= 1e-5
    assert max(float((v - 1).abs().max()) for v in eager.attn) > 0.05


@pytest.mark.slow
def test_compiled_masked_step_matches_eager():
    model = add_masks(_tiny()).train()
    with torch.no_grad():
        get_masks(model).attn_scores.uniform_(0, 1.5)
        get_masks(model).token_scores.uniform_(-1, 3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    grads = []
    for m in (model, CompiledModel(twin)):
        F.cross_entropy(m(x), y).backward()
        grads.append(get_masks(getattr(m, "_orig_mod", m)).token_scores.grad.clone())
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5


@pytest.mark.slow
def test_compiled_retrain_matches_eager(tmp_path):
    """Retraining the slim model compiled: the losses of its first steps are those of the eager run, and
    its slim folders are plain ones."""
    from vitslim_core import load_slim
    from vitslim_core.demo import DEMO_DIR
    from vitslim_core.retrain import RetrainConfig, retrain
    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip("bundled demo missing")
    cfg = RetrainConfig(run=str(DEMO_DIR), flops=0.4, batch_size=32, epochs=1, device="cpu", log_every=1, seed=0,
                        max_steps=3, distill="none", lr=1e-4)
    eager = retrain(cfg, out=str(tmp_path / "eager")).history["log"]
    compiled = retrain(cfg, out=str(tmp_path / "compiled"), compile=True).history["log"]
    assert [r["step"] for r in compiled] == [1, 2, 3]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(eager, compiled)) < 1e-4
    slim = load_slim(tmp_path / "compiled" / "last")
    assert not any(k.startswith("_orig_mod.") for k in slim.state_dict())
