"""Analytic cost model (DESIGN invariant 4): MACs as counted by FlopCounterMode / 2, exact parameters."""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vitslim_core import (MaskScores, PlanMismatchError, SlimPlan, UnsupportedModelError, VitSlimError, add_masks,
                          arch_spec, count_cost)

SMALL_KEYS = ("deit_tiny_32", "deit_tiny_64", "deit_tiny_distilled", "reg4_gap", "nobias_layerscale", "noprefix_gap")


def _counted_macs(model, x) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops() / 2 / x.shape[0]


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- dense models
@pytest.mark.parametrize("key", SMALL_KEYS + ("deit_small_64",))
def test_dense_cost_matches_flop_counter_and_parameters(vit, images, fused, key):
    model = vit("deit_small_patch16_224", img_size=64, depth=3) if key == "deit_small_64" else vit(key)
    fused(model, False)
    c = count_cost(model)
    assert c.macs == _counted_macs(model, images(model, batch=2))
    assert c.params == _numel(model)
    assert (c.dense_macs, c.dense_params) == (c.macs, c.params)
    assert c.flops_ratio == 1.0 and c.params_ratio == 1.0


def _meta_model(name, **kw):
    import timm
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw).eval()


def test_deit_small_at_224_is_4_6_gflops(fused):
    model = _meta_model("deit_small_patch16_224")  # shapes only: FlopCounterMode counts meta tensors too
    fused(model, False)
    c = count_cost(model)
    assert 4.5e9 < c.macs < 4.7e9
    assert c.macs == _counted_macs(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert c.params == _numel(model)
    assert 21.5e6 < c.params < 22.5e6
    assert c.gflops == pytest.approx(c.macs / 1e9)


def test_masks_are_not_counted(vit):
    model = vit("deit_tiny_distilled")
    before = count_cost(model)
    add_masks(model)
    assert _numel(model) > before.params
    assert count_cost(model) == before


def test_count_cost_accepts_every_description(deit_s_spec):
    model = _meta_model("deit_small_patch16_224")
    want = count_cost(model)
    spec = arch_spec(model)
    assert count_cost(spec) == want
    assert count_cost(deit_s_spec) == want
    assert count_cost("deit_small_patch16_224") == want
    assert count_cost(MaskScores.dense(spec)) == want
    full = SlimPlan.full(spec)
    assert count_cost(full) == want
    assert count_cost(spec, full) == want
    assert count_cost(MaskScores.dense(spec), full) == want


def test_unknown_model_name_is_a_one_line_error(one_line):
    with pytest.raises(VitSlimError) as e:
        count_cost("no_such_model_xyz")
    one_line(e.value)
    assert "no_such_model_xyz" in str(e.value)


def test_unsupported_model_is_refused():
    with pytest.raises(UnsupportedModelError):
        count_cost("swin_tiny_patch4_window7_224")


def test_plan_for_another_architecture_is_refused(deit_s_spec, meta_arch):
    other = meta_arch("deit_tiny_patch16_224")
    with pytest.raises(PlanMismatchError):
        count_cost(deit_s_spec, SlimPlan.full(other))


# ---------------------------------------------------------------------------------------------- plans
def _random_plan(spec, seed, p_attn=0.6, p_mlp=0.6, p_tok=0.85, empty=True) -> SlimPlan:
    rng = np.random.default_rng(seed)
    L, H, d = spec.depth, spec.num_heads, spec.head_dim
    attn = rng.random((L, H, d)) < p_attn
    mlp = rng.random((L, spec.mlp_hidden)) < p_mlp
    tok = rng.random((L, spec.num_patches)) < p_tok
    tok = np.logical_and.accumulate(tok, axis=0)  # monotone: dropped once, dropped for good
    if empty and L >= 2:
        attn[0, 0] = False  # a head with no dims
        attn[1] = False     # a whole attention branch gone
        mlp[L - 1] = False  # a whole MLP branch gone
    return SlimPlan(spec, attn, mlp, tok, {"method": "test"})


def _sliced_forward(model, plan, x):
    """Run the plan by slicing real tensors (ragged heads, dropped tokens gathered away, empty branches
    reduced to their output bias) and return (logits, parameters the sliced model keeps)."""
    spec = arch_spec(model)
    P, H, d, C = spec.num_prefix_tokens, spec.num_heads, spec.head_dim, spec.embed_dim
    kept = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks."))
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.norm_pre(t)
    positions = np.arange(spec.num_tokens)  # original position of each row of t
    for l, blk in enumerate(model.blocks):
        want = np.concatenate([np.arange(P), P + np.flatnonzero(plan.token[l])])
        assert np.isin(want, positions).all()
        t = t[:, torch.as_tensor(np.searchsorted(positions, want))]
        positions = want
        a, m = blk.attn, blk.mlp
        dims = [np.flatnonzero(plan.attn[l, h]) for h in range(H)]
        cols = np.concatenate([h * d + dh for h, dh in enumerate(dims)]).astype(np.int64)
        if cols.size:
            rows = torch.as_tensor(np.concatenate([k * H * d + cols for k in range(3)]))
            w = a.qkv.weight[rows]
            b = a.qkv.bias[rows] if a.qkv.bias is not None else None
            qkv = F.linear(blk.norm1(t), w, b)
            q, k, v = qkv.split(cols.size, dim=-1)
            outs, start = [], 0
            for dh in dims:
                if dh.size:
                    sl = slice(start, start + dh.size)
                    att = ((q[..., sl] @ k[..., sl].transpose(-2, -1)) * d ** -0.5).softmax(-1)
                    outs.append(att @ v[..., sl])
                    start += dh.size
            pw = a.proj.weight[:, torch.as_tensor(cols)]
            t = t + blk.ls1(F.linear(torch.cat(outs, -1), pw, a.proj.bias))
            kept += (_numel(blk.norm1) + _numel(blk.ls1) + w.numel() + pw.numel()
                     + (b.numel() if b is not None else 0))
        elif a.proj.bias is not None:
            t = t + blk.ls1(a.proj.bias)
        kept += a.proj.bias.numel() if a.proj.bias is not None else 0
        units = torch.as_tensor(np.flatnonzero(plan.mlp[l]))
        if units.numel():
            w1 = m.fc1.weight[units]
            b1 = m.fc1.bias[units] if m.fc1.bias is not None else None
            w2 = m.fc2.weight[:, units]
            t = t + blk.ls2(F.linear(m.act(F.linear(blk.norm2(t), w1, b1)), w2, m.fc2.bias))
            kept += (_numel(blk.norm2) + _numel(blk.ls2) + w1.numel() + w2.numel()
                     + (b1.numel() if b1 is not None else 0))
        elif m.fc2.bias is not None:
            t = t + blk.ls2(m.fc2.bias)
        kept += m.fc2.bias.numel() if m.fc2.bias is not None else 0
    t = model.norm(t)
    return model.forward_head(t), kept


@pytest.mark.parametrize("key", SMALL_KEYS)
def test_full_plan_sliced_forward_reproduces_model(vit, images, fused, key):
    model = vit(key)
    fused(model, False)
    x = images(model)
    plan = SlimPlan.full(arch_spec(model))
    with torch.no_grad():
        got, kept = _sliced_forward(model, plan, x)
        want = model(x)
    assert (got - want).abs().max().item() < 1e-5
    assert kept == _numel(model) == count_cost(model, plan).params
    assert plan.flops_ratio == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("key", SMALL_KEYS)
def test_plan_cost_matches_flop_counter_on_sliced_tensors(vit, images, key, seed):
    model = vit(key)
    spec = arch_spec(model)
    plan = _random_plan(spec, seed, empty=seed != 2)
    x = images(model, batch=2)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        _, kept = _sliced_forward(model, plan, x)
    c = count_cost(model, plan)
    assert c.macs == fc.get_total_flops() / 2 / x.shape[0]
    assert c.params == kept
    assert c.dense_macs == count_cost(model).macs and c.dense_params == _numel(model)
    assert c.macs < c.dense_macs and c.params < c.dense_params
    assert plan.cost == c
    assert plan.macs == c.macs and plan.params == c.params


def test_plan_cost_equals_hand_formula(deit_s_spec):
    s = deit_s_spec
    plan = _random_plan(s, seed=5)
    C, P, M = s.embed_dim, s.num_prefix_tokens, s.num_patches
    macs = M * C * 3 * 16 * 16 + C * s.num_classes
    removed = 0
    for l in range(s.depth):
        A = int(plan.attn[l].sum())
        h = int(plan.mlp[l].sum())
        N = P + int(plan.token[l].sum())
        macs += N * C * 3 * A + N * N * A + N * N * A + N * A * C + N * C * h + N * h * C
        removed += (s.attn_dim - A) * (3 * C + 3 + C) + (s.mlp_hidden - h) * (C + 1 + C)
        if A == 0:
            removed += 2 * C  # norm1 (weight, bias); DeiT-S has no LayerScale
        if h == 0:
            removed += 2 * C
    c = count_cost(s, plan)
    assert c.macs == macs
    assert c.params == s.dense_params - removed
    assert c.flops_ratio == pytest.approx(macs / c.dense_macs)
    assert c.params_ratio == pytest.approx(c.params / s.dense_params)
    d = c.as_dict()
    assert d["macs"] == macs and d["flops_ratio"] == pytest.approx(c.flops_ratio)


def test_fewer_units_never_cost_more(deit_s_spec):
    s = deit_s_spec
    big = _random_plan(s, seed=9, p_attn=0.8, p_mlp=0.8, p_tok=0.95, empty=False)
    rng = np.random.default_rng(10)
    small = SlimPlan(s, big.attn & (rng.random(big.attn.shape) < 0.7), big.mlp & (rng.random(big.mlp.shape) < 0.7),
                     big.token & np.logical_and.accumulate(rng.random(big.token.shape) < 0.95, axis=0))
    assert count_cost(s, small).macs < count_cost(s, big).macs < count_cost(s).macs
    assert count_cost(s, small).params < count_cost(s, big).params < count_cost(s).params


def test_deit_base_plan_cost_is_fast(meta_arch, capsys):
    s = meta_arch("deit_base_patch16_224")
    plan = _random_plan(s, seed=0)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        c = count_cost(s, plan)
        times.append(time.perf_counter() - t0)
    assert 0 < c.macs < c.dense_macs
    with capsys.disabled():
        print(f"\n[info] count_cost(DeiT-B spec, plan): median {1e3 * statistics.median(times):.3f} ms over 20 calls")
