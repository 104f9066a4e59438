"""Physical slimming: equals the binary-masked model, exact cost, save/load and export."""
from __future__ import annotations

import copy
import functools
import json
import warnings
import zlib

import numpy as np
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitslim_core import (MaskScores, PlanMismatchError, ScoreFileError, SlimPlan, VitSlimError, add_masks,
                          arch_spec, count_cost, get_masks, plan_for_flops)
from vitslim_core.slim import BranchBias, SlimAttention, apply_hard_masks, load_slim, save_slim, slim_model

TOL = 1e-4

# name, kwargs, image size
MODELS = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=64, depth=3, num_classes=10), 64),
    "deit32": ("deit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=10), 32),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2, num_classes=10), 32),
    "reg_gap": ("vit_base_patch16_reg4_gap_256",
                dict(img_size=64, depth=2, embed_dim=64, num_heads=4, num_classes=10), 64),
    "ls_nobias": ("vit_tiny_patch16_224",
                  dict(img_size=64, depth=3, qkv_bias=False, proj_bias=False, init_values=0.5, num_classes=10), 64),
    "noprefix": ("vit_base_patch16_224", dict(img_size=64, depth=2, embed_dim=64, num_heads=4, class_token=False,
                                              global_pool="avg", num_classes=10), 64),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds waiting


@functools.lru_cache(maxsize=None)
def _base_model(key: str, seed: int) -> torch.nn.Module:
    name, kw, _ = MODELS[key]
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def make_model(key: str, fused: bool = True, seed: int = 0) -> torch.nn.Module:
    """A small timm ViT with random weights of order 1 (so a 1e-4 tolerance means something)."""
    m = copy.deepcopy(_base_model(key, seed))
    set_fused(m, fused)
    return m


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused


def image(key: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = MODELS[key][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_plan(spec, rng: np.random.Generator, drop_branches: bool = True, few_tokens: bool = False) -> SlimPlan:
    """Ragged heads, vanished heads, whole branches removed in some layers, monotone token masks."""
    L, H, d, h, M = spec.depth, spec.num_heads, spec.head_dim, spec.mlp_hidden, spec.num_patches
    attn = np.zeros((L, H, d), bool)
    for l in range(L):
        for head in range(H):
            k = int(rng.choice([0, d, int(rng.integers(1, d + 1))]))
            attn[l, head, rng.permutation(d)[:k]] = True
    mlp = rng.random((L, h)) < rng.uniform(0.2, 0.9, size=(L, 1))
    if drop_branches:
        attn[rng.integers(L)] = False
        mlp[rng.integers(L)] = False
    token = np.zeros((L, M), bool)
    kept = np.ones(M, bool)
    for l in range(L):
        idx = np.flatnonzero(kept)
        n = 1 if few_tokens and l == L - 1 else int(rng.integers(1, len(idx) + 1))
        if l == 0 and not few_tokens and rng.random() < 0.5:
            n = len(idx)  # sometimes no token is dropped at a layer
        kept = np.zeros(M, bool)
        kept[rng.choice(idx, size=n, replace=False)] = True
        token[l] = kept
    return SlimPlan(spec, attn, mlp, token)


def randomize_masks(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in (get_masks(model).attn, get_masks(model).mlp, get_masks(model).token):
            for mod in group:
                mod.score.copy_(torch.rand(mod.score.shape, generator=g) * 2 - 0.5)


def check_cost(slim: torch.nn.Module, x: torch.Tensor) -> None:
    """DESIGN invariant 4: FlopCounterMode (fused attention off) and the parameter count match count_cost."""
    cost = count_cost(slim)
    assert sum(p.numel() for p in slim.parameters()) == cost.params
    fused = [m.fused_attn for m in slim.modules() if isinstance(m, SlimAttention)]
    set_fused(slim, False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            slim(x)
    finally:
        for m, f in zip([m for m in slim.modules() if isinstance(m, SlimAttention)], fused):
            m.fused_attn = f
    assert fc.get_total_flops() == 2 * x.shape[0] * cost.macs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------- invariant 2: a full plan changes nothing
@pytest.mark.parametrize("key", ["deit", "distilled", "reg_gap", "ls_nobias", "noprefix"])
@pytest.mark.parametrize("fused", [True, False])
def test_full_plan_keeps_logits(key, fused):
    m = make_model(key, fused)
    x = image(key)
    slim = slim_model(m, SlimPlan.full(arch_spec(m)))
    with torch.no_grad():
        assert max_diff(slim(x), m(x)) < 1e-5
    check_cost(slim, x)
    assert count_cost(slim).params == count_cost(m).params


# ---------------------------------------------------------------- invariant 3: slim == binary masks
@pytest.mark.parametrize("key", ["deit", "deit32", "distilled", "reg_gap", "ls_nobias", "noprefix"])
@pytest.mark.parametrize("fused", [True, False])
def test_slim_equals_hard_masks(key, fused):
    x = image(key)
    rng = np.random.default_rng(zlib.crc32(f"{key}{fused}".encode()))
    # (mask mode or None for a model without masks, drop whole branches, keep one patch at the end)
    trials = [(None, False, False), (None, True, True), ("head_dim", True, False), ("head", True, True),
              ("uniform", False, False)]
    for masks, drop_branches, few_tokens in trials:
        m = make_model(key, fused)
        with torch.no_grad():
            dense = m(x)
        if masks is not None:
            add_masks(m, attn=masks)
            randomize_masks(m)
        plan = random_plan(arch_spec(m), rng, drop_branches=drop_branches, few_tokens=few_tokens)
        slim = slim_model(m, plan)
        ref = apply_hard_masks(m, plan)
        with torch.no_grad():
            out, want = slim(x), ref(x)
        assert out.shape == dense.shape
        assert max_diff(out, want) < TOL, (key, fused, masks)
        assert max_diff(out, dense) > 1e-3  # the plan really changed the function
        check_cost(slim, x)


def test_fold_scores_false_ignores_scores():
    m = make_model("deit")
    plan = random_plan(arch_spec(m), np.random.default_rng(3))
    x = image("deit")
    plain = slim_model(m, plan)
    add_masks(m)
    randomize_masks(m)
    with torch.no_grad():
        assert max_diff(slim_model(m, plan, fold_scores=False)(x), plain(x)) < 1e-6
        assert max_diff(apply_hard_masks(m, plan, fold_scores=False)(x), plain(x)) < TOL
        assert max_diff(slim_model(m, plan)(x), plain(x)) > 1e-3  # folding really changes the weights


@pytest.mark.parametrize("multiple", [1, 8])
def test_plan_for_flops_plans(multiple):
    m = make_model("deit", fused=False)
    spec = arch_spec(m)
    g = torch.Generator().manual_seed(5)
    scores = MaskScores.dense(spec)
    scores.attn = [torch.rand(spec.num_heads, spec.head_dim, generator=g) for _ in range(spec.depth)]
    scores.mlp = [torch.rand(spec.mlp_hidden, generator=g) for _ in range(spec.depth)]
    scores.token = [torch.rand(spec.num_patches, generator=g) * 3 for _ in range(spec.depth)]
    x = image("deit")
    for ratio in (0.7, 0.4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = plan_for_flops(scores, ratio, multiple=multiple)
        slim = slim_model(m, plan)
        with torch.no_grad():
            assert max_diff(slim(x), apply_hard_masks(m, plan)(x)) < TOL
        check_cost(slim, x)
        assert count_cost(slim).macs == plan.macs


# ---------------------------------------------------------------- structure
def test_input_model_untouched_and_slim_has_no_masks():
    m = make_model("deit")
    add_masks(m)
    randomize_masks(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = image("deit")
    with torch.no_grad():
        out = m(x)
    plan = random_plan(arch_spec(m), np.random.default_rng(0))
    slim = slim_model(m, plan)
    assert type(slim) is type(m) and slim is not m
    assert get_masks(m) is not None and get_masks(slim) is None
    assert not any(k.startswith("slim_masks") for k in slim.state_dict())
    assert not any(mod._forward_hooks for mod in slim.modules())
    assert slim.slim_plan.spec.shape_key() == plan.spec.shape_key()
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(m(x), out)


def test_ragged_heads_grouped_and_empty_branches():
    m = make_model("ls_nobias")  # no biases at all: an empty branch adds nothing
    spec = arch_spec(m)
    L, H, d = spec.depth, spec.num_heads, spec.head_dim
    attn = np.zeros((L, H, d), bool)
    attn[0, 0, :5], attn[0, 1, :5], attn[0, 2, :d] = True, True, True  # groups (1 x d) and (2 x 5)
    attn[2, 1, :1] = True  # layer 1 keeps no attention, layer 2 one dim of one head
    mlp = np.ones((L, spec.mlp_hidden), bool)
    mlp[2] = False
    plan = SlimPlan(spec, attn, mlp, np.ones((L, spec.num_patches), bool))
    slim = slim_model(m, plan)
    a0 = slim.blocks[0].attn
    assert a0.groups == ((1, d), (2, 5)) and a0.qkv.out_features == 3 * (d + 10)
    assert a0.scale == pytest.approx(d ** -0.5)
    assert slim.blocks[1].attn is None and slim.blocks[2].mlp is None  # no bias to keep
    x = image("ls_nobias")
    with torch.no_grad():
        assert max_diff(slim(x), apply_hard_masks(m, plan)(x)) < TOL
    check_cost(slim, x)

    m2 = make_model("deit")  # with biases: the branch keeps ls(bias) only
    spec2 = arch_spec(m2)
    attn2 = np.ones((spec2.depth, spec2.num_heads, spec2.head_dim), bool)
    attn2[1] = False
    slim2 = slim_model(m2, SlimPlan(spec2, attn2, np.ones((spec2.depth, spec2.mlp_hidden), bool),
                                    np.ones((spec2.depth, spec2.num_patches), bool)))
    blk = slim2.blocks[1]
    assert isinstance(blk.attn, BranchBias) and isinstance(blk.norm1, torch.nn.Identity)
    assert torch.equal(blk.attn.bias, m2.blocks[1].attn.proj.bias)


def test_plan_mismatch():
    m = make_model("deit")
    other = make_model("deit32")
    with pytest.raises(PlanMismatchError):
        slim_model(m, SlimPlan.full(arch_spec(other)))
    with pytest.raises(PlanMismatchError):
        apply_hard_masks(m, SlimPlan.full(arch_spec(other)))


def test_inference_fast_path_matches_autograd_path():
    """Under no_grad on CPU, odd-width linears write into row-padded buffers; results must not change."""
    m = make_model("deit")
    slim = slim_model(m, random_plan(arch_spec(m), np.random.default_rng(7), drop_branches=False))
    widths = [b.mlp.fc1.out_features for b in slim.blocks] + [b.attn.qkv.out_features for b in slim.blocks]
    assert any(w % 16 for w in widths)
    x = image("deit")
    with torch.no_grad():
        fast = slim(x)
    plain = slim(x).detach()
    assert max_diff(fast, plain) < 1e-5


def test_slim_model_trains():
    m = make_model("distilled")
    slim = slim_model(m, random_plan(arch_spec(m), np.random.default_rng(1))).train()
    out = slim(image("distilled"))
    out = out[0] + out[1] if isinstance(out, tuple) else out
    out.square().mean().backward()
    assert all(p.grad is not None for p in slim.parameters() if p.requires_grad and p.numel() > 0)


# ---------------------------------------------------------------- save / load (invariant 6)
def named_slim(key: str, seed: int = 0):
    name, kw, _ = MODELS[key]
    m = make_model(key)
    spec = arch_spec(m, model_name=name, model_kwargs=kw)
    return m, slim_model(m, random_plan(spec, np.random.default_rng(seed)))


@pytest.mark.parametrize("key", ["deit", "distilled", "reg_gap"])
def test_save_load_roundtrip(key, tmp_path):
    _, slim = named_slim(key)
    spec = slim.slim_plan.spec
    slim.slim_data = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, *spec.img_size],
                      "class_names": [f"c{i}" for i in range(10)]}
    out = save_slim(slim, tmp_path / "slim")
    meta = json.loads((out / "slim.json").read_text())
    assert meta["format"] == "vitslim-slim" and meta["format_version"] == 1
    assert meta["model"] == {"name": MODELS[key][0], "kwargs": MODELS[key][1]}
    loaded = load_slim(out)
    assert type(loaded) is type(slim) and loaded.slim_data == slim.slim_data
    a, b = slim.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(loaded.slim_plan.attn, slim.slim_plan.attn)
    assert np.array_equal(loaded.slim_plan.token, slim.slim_plan.token)
    x = image(key)
    with torch.no_grad():
        assert torch.equal(loaded(x), slim.eval()(x))
    assert count_cost(loaded) == count_cost(slim)


def test_save_needs_model_name(tmp_path):
    m = make_model("deit32")
    with pytest.raises(VitSlimError, match="base model"):
        save_slim(slim_model(m, SlimPlan.full(arch_spec(m))), tmp_path / "x")
    with pytest.raises(VitSlimError, match="not a slim model"):
        save_slim(m, tmp_path / "y")


def test_load_bad_input(tmp_path):
    _, slim = named_slim("deit32")
    good = save_slim(slim, tmp_path / "good")
    meta = json.loads((good / "slim.json").read_text())

    def variant(name: str, meta_obj=None, raw: bytes | None = None, weights: bool = True):
        d = tmp_path / name
        d.mkdir()
        if raw is not None:
            (d / "slim.json").write_bytes(raw)
        elif meta_obj is not None:
            (d / "slim.json").write_text(json.dumps(meta_obj))
        if weights:
            (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        return d

    with pytest.raises(ScoreFileError, match="does not exist"):
        load_slim(tmp_path / "nothing")
    cases = {
        "nojson": variant("nojson", weights=True),
        "corrupt": variant("corrupt", raw=b"{not json"),
        "format": variant("format", dict(meta, format="other")),
        "version": variant("version", dict(meta, format_version=99)),
        "nomodel": variant("nomodel", dict(meta, model={"kwargs": {}})),
        "badplan": variant("badplan", dict(meta, plan={"format": "vitslim-plan", "format_version": 1})),
        "noweights": variant("noweights", meta, weights=False),
    }
    for name, d in cases.items():
        with pytest.raises(ScoreFileError) as e:
            load_slim(d)
        assert "\n" not in str(e.value), name
    bad = variant("badweights", meta, weights=False)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ScoreFileError):
        load_slim(bad)

    # weights saved for another plan of the same architecture
    other_plan = random_plan(slim.slim_plan.spec, np.random.default_rng(99))
    d = variant("otherplan", dict(meta, plan=other_plan.to_dict()))
    with pytest.raises(PlanMismatchError) as e:
        load_slim(d)
    assert "\n" not in str(e.value)
    # a plan for another architecture than the named base model
    _, slim64 = named_slim("deit")
    d = variant("otherarch", dict(meta, plan=slim64.slim_plan.to_dict()))
    with pytest.raises(PlanMismatchError):
        load_slim(d)


# ---------------------------------------------------------------- export
def test_export_program(tmp_path):
    from vitslim_core.export import export_program
    _, slim = named_slim("distilled")
    path = export_program(slim, tmp_path / "slim.pt2")
    program = torch.export.load(str(path))
    for batch in (2, 3):
        x = image("distilled", batch=batch)
        with torch.no_grad():
            assert max_diff(program.module()(x), slim(x)) < 1e-5


def test_export_onnx(tmp_path):
    from vitslim_core.export import export_onnx
    pytest.importorskip("onnx")
    _, slim = named_slim("deit", seed=2)
    set_fused(slim, False)
    path = export_onnx(slim, tmp_path / "slim.onnx")
    assert path.is_file() and path.stat().st_size > 1000
    import onnxruntime as ort  # in the export extra: this check must run, not skip
    x = image("deit", batch=3)
    out = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - slim(x).numpy()).max() < 1e-4
