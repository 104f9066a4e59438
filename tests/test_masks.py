"""Score masks on timm ViTs (DESIGN invariant 1 and where the masks act)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from vitslim_core import UnsupportedModelError, VitSlimError, add_masks, arch_spec, get_masks, remove_masks
from vitslim_core.masks import token_value

MODES = ("head_dim", "head", "uniform")
MODEL_KEYS = ("deit_tiny_32", "deit_tiny_64", "deit_tiny_distilled", "reg4_gap", "nobias_layerscale", "noprefix_gap")


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _mask_hooks(model):
    """Layers whose class add_masks swapped for a masked subclass (and the score each one reads)."""
    return [mod.__dict__["_vitslim_score"] for mod in model.modules() if "_vitslim_score" in mod.__dict__]


def _randomize_scores(model, seed=0):
    masks = get_masks(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mods in (masks.attn, masks.mlp):
            for m in mods:
                m.score.copy_(torch.rand(m.score.shape, generator=g) * 1.5)
        for m in masks.token:
            m.score.copy_(torch.rand(m.score.shape, generator=g) * 4 - 1)


def _reference_forward(model, x, attn, mlp, token):
    """The method written out by hand on an UNMASKED model: per-dim scores multiply q, k and v, MLP scores the
    activation of fc1, token values the normalised input of attention and MLP at patch positions only.

    attn[l]: (H, d); mlp[l]: (h,); token[l]: (M,) mask values. Unfused attention with scale d ** -0.5.
    """
    spec = arch_spec(model)
    P, H, d = spec.num_prefix_tokens, spec.num_heads, spec.head_dim
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        t = model.norm_pre(t)
        for l, blk in enumerate(model.blocks):
            m = torch.cat([torch.ones(P), token[l]])[:, None]
            h = blk.norm1(t) * m
            B, N, _ = h.shape
            qkv = blk.attn.qkv(h).reshape(B, N, 3, H, d) * attn[l]
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            a = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1)
            o = (a @ v).transpose(1, 2).reshape(B, N, H * d)
            t = t + blk.ls1(blk.attn.proj(o))
            h2 = blk.norm2(t) * m
            t = t + blk.ls2(blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(h2)) * mlp[l]))
        t = model.norm(t)
        return model.forward_head(t)


# ---------------------------------------------------------------------------------------------- invariant 1
@pytest.mark.parametrize("fused_attn", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", MODEL_KEYS)
def test_initial_masks_leave_logits_unchanged(vit, images, fused, key, mode, fused_attn):
    model = vit(key)
    fused(model, fused_attn)
    x = images(model)
    dense = _logits(model, x)
    add_masks(model, attn=mode)
    masked = _logits(model, x)
    assert masked.shape == dense.shape
    assert (masked - dense).abs().max().item() < 1e-6


@pytest.mark.parametrize("fused_attn", [False, True], ids=["unfused", "fused"])
def test_fused_and_unfused_masked_models_agree(vit, images, fused, fused_attn):
    model = vit("deit_tiny_distilled")
    add_masks(model)
    _randomize_scores(model)
    x = images(model)
    fused(model, fused_attn)
    a = _logits(model, x)
    fused(model, not fused_attn)
    b = _logits(model, x)
    assert (a - b).abs().max().item() < 1e-5


def test_remove_masks_restores_exactly(vit, images):
    model = vit("reg4_gap")
    x = images(model)
    dense = _logits(model, x)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    add_masks(model)
    _randomize_scores(model)
    assert (_logits(model, x) - dense).abs().max() > 1e-4  # the masks do act
    assert remove_masks(model) is model
    assert get_masks(model) is None and not hasattr(model, "slim_masks")
    assert _mask_hooks(model) == []
    assert torch.equal(_logits(model, x), dense)
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd_before)
    assert all(torch.equal(sd_after[k], v) for k, v in sd_before.items())
    remove_masks(model)  # no masks: a no-op
    assert torch.equal(_logits(model, x), dense)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_keys_unchanged_except_slim_masks(vit, mode):
    model = vit("deit_tiny_distilled")
    before = model.state_dict()
    add_masks(model, attn=mode)
    after = model.state_dict()
    own = [k for k in after if not k.startswith("slim_masks.")]
    assert own == list(before)
    assert all(torch.equal(after[k], before[k]) for k in own)
    spec = arch_spec(model)
    H, d, L = spec.num_heads, spec.head_dim, spec.depth
    want_attn = {"head_dim": (H, d), "head": (H,), "uniform": (d,)}[mode]
    extra = {k: tuple(v.shape) for k, v in after.items() if k.startswith("slim_masks.")}
    # one parameter per dimension holding every layer (per-layer views: masks.attn[l].score, ...)
    expected = {"slim_masks.attn_scores": (L, *want_attn), "slim_masks.mlp_scores": (L, spec.mlp_hidden),
                "slim_masks.token_scores": (L, spec.num_patches)}
    assert extra == expected
    # masks are parameters the optimizer can find by name
    names = {n for n, _ in model.named_parameters()}
    assert set(expected) <= names


def test_initial_score_values_and_l1_terms(vit):
    model = vit("deit_tiny_32")
    add_masks(model)
    masks = get_masks(model)
    spec = arch_spec(model)
    assert all(torch.equal(m.score, torch.ones(spec.num_heads, spec.head_dim)) for m in masks.attn)
    assert all(torch.equal(m.score, torch.ones(spec.mlp_hidden)) for m in masks.mlp)
    assert all(torch.equal(m.score, torch.full((spec.num_patches,), 3.0)) for m in masks.token)
    assert all(torch.equal(m.value(), torch.ones(spec.num_patches)) for m in masks.token)
    a, m, t = masks.l1_terms()
    L = spec.depth
    assert a.item() == pytest.approx(L * spec.attn_dim)
    assert m.item() == pytest.approx(L * spec.mlp_hidden)
    assert t.item() == pytest.approx(L * spec.num_patches, rel=1e-6)


# ---------------------------------------------------------------------------------------------- where masks act
@pytest.mark.parametrize("fused_attn", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["deit_tiny_distilled", "reg4_gap", "nobias_layerscale", "noprefix_gap"])
def test_masked_forward_equals_hand_written_method(vit, images, fused, key, mode, fused_attn):
    model = vit(key)
    ref = copy.deepcopy(model)
    fused(model, fused_attn)
    add_masks(model, attn=mode)
    _randomize_scores(model, seed=3)
    masks = get_masks(model)
    attn = [m.per_dim().detach() for m in masks.attn]
    mlp = [m.score.detach() for m in masks.mlp]
    token = [m.value().detach() for m in masks.token]
    x = images(model)
    got = _logits(model, x)
    want = _reference_forward(ref, x, attn, mlp, token)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - _logits(ref, x)).abs().max().item() > 1e-3


def _zero_head_rows(model, layer, head=None, dim=None):
    """Zero the q, k and v rows (weight and bias) of one head (or one dim of every head) in a dense model."""
    spec = arch_spec(model)
    H, d = spec.num_heads, spec.head_dim
    qkv = model.blocks[layer].attn.qkv
    rows = torch.zeros(3, H, d, dtype=torch.bool)
    if head is not None:
        rows[:, head, :] = True
    else:
        rows[:, :, dim] = True
    rows = rows.reshape(-1)
    with torch.no_grad():
        qkv.weight[rows] = 0
        if qkv.bias is not None:
            qkv.bias[rows] = 0


@pytest.mark.parametrize("fused_attn", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("mode", ["head_dim", "head"])
def test_zero_head_score_equals_zeroed_qkv_rows(vit, images, fused, mode, fused_attn):
    model = vit("deit_tiny_64")
    assert model.blocks[1].attn.qkv.bias is not None and model.blocks[1].attn.qkv.bias.abs().sum() > 0
    dense = copy.deepcopy(model)
    fused(model, fused_attn)
    add_masks(model, attn=mode)
    with torch.no_grad():
        get_masks(model).attn[1].score[2] = 0.0
    _zero_head_rows(dense, layer=1, head=2)
    x = images(model)
    got, want = _logits(model, x), _logits(dense, x)
    assert (got - want).abs().max().item() < 1e-5
    remove_masks(model)  # and zeroing the head does change the model
    assert (got - _logits(model, x)).abs().max().item() > 1e-4


def test_zero_uniform_score_equals_zeroed_dim_in_every_head(vit, images):
    model = vit("nobias_layerscale", init_values=0.5)
    dense = copy.deepcopy(model)
    add_masks(model, attn="uniform")
    with torch.no_grad():
        get_masks(model).attn[0].score[5] = 0.0
    _zero_head_rows(dense, layer=0, dim=5)
    x = images(model)
    assert (_logits(model, x) - _logits(dense, x)).abs().max().item() < 1e-5


def test_head_dim_score_scales_q_k_and_v_alike(vit, images):
    # scaling one head-dim by s multiplies q, k and v of that dim by s, i.e. the qkv rows
    model = vit("deit_tiny_32")
    dense = copy.deepcopy(model)
    add_masks(model)
    with torch.no_grad():
        get_masks(model).attn[0].score[1, 7] = 0.3
        rows = torch.zeros(3, 3, 64, dtype=torch.bool)
        rows[:, 1, 7] = True
        qkv = dense.blocks[0].attn.qkv
        qkv.weight[rows.reshape(-1)] *= 0.3
        qkv.bias[rows.reshape(-1)] *= 0.3
    x = images(model)
    assert (_logits(model, x) - _logits(dense, x)).abs().max().item() < 1e-5


def test_zero_mlp_scores_equal_zeroed_fc2_columns(vit, images):
    model = vit("deit_tiny_distilled")
    dense_one = copy.deepcopy(model)
    dense_all = copy.deepcopy(model)
    add_masks(model)
    x = images(model)
    base = _logits(model, x)
    with torch.no_grad():
        get_masks(model).mlp[0].score[[3, 100, 700]] = 0.0
        dense_one.blocks[0].mlp.fc2.weight[:, [3, 100, 700]] = 0.0
    one = _logits(model, x)
    assert (one - _logits(dense_one, x)).abs().max().item() < 1e-5
    assert (one - base).abs().max().item() > 1e-5
    with torch.no_grad():
        get_masks(model).mlp[1].score.zero_()
        dense_all.blocks[0].mlp.fc2.weight[:, [3, 100, 700]] = 0.0
        dense_all.blocks[1].mlp.fc2.weight.zero_()  # the branch outputs only fc2's bias
    every = _logits(model, x)
    assert (every - _logits(dense_all, x)).abs().max().item() < 1e-5
    assert (every - one).abs().max().item() > 1e-4


@pytest.mark.parametrize("key", ["deit_tiny_32", "deit_tiny_distilled", "reg4_gap"])
def test_prefix_tokens_are_never_masked(vit, images, key):
    model = vit(key)
    spec = arch_spec(model)
    P = spec.num_prefix_tokens
    assert P >= 1
    x = images(model)
    dense_norm1 = {}
    h = model.blocks[0].norm1.register_forward_hook(lambda m, i, o: [dense_norm1.setdefault("out", o.clone()), None][1])
    dense = _logits(model, x)
    h.remove()
    add_masks(model)
    with torch.no_grad():
        for m in get_masks(model).token:
            m.score.zero_()  # value tanh(0) = 0 at every patch position
    seen = []
    for blk in model.blocks:  # registered after the masks' hooks, so they see the masked output
        for norm in (blk.norm1, blk.norm2):
            norm.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    out = _logits(model, x)
    assert len(seen) == 2 * spec.depth
    for o in seen:
        assert torch.all(o[:, P:] == 0)  # every patch position is masked out
        assert o[:, :P].abs().sum() > 0  # prefix positions carry the attention / MLP input
    # layer 0's first input is the embedding: prefix positions are exactly the dense normalised input
    assert torch.equal(seen[0][:, :P], dense_norm1["out"][:, :P])
    assert torch.isfinite(out).all()
    assert (out - dense).abs().max().item() > 1e-4


def test_token_value_scales_patch_positions(vit, images):
    model = vit("deit_tiny_32")
    x = images(model)
    dense = {}
    model.blocks[0].norm1.register_forward_hook(lambda m, i, o: [dense.setdefault("o", o.clone()), None][1])
    _logits(model, x)
    add_masks(model)
    raw = torch.linspace(-2, 2, 4)
    with torch.no_grad():
        get_masks(model).token[0].score.copy_(raw)
    seen = []
    model.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    _logits(model, x)
    masked = seen[-1]
    assert torch.equal(masked[:, :1], dense["o"][:, :1])
    want = dense["o"][:, 1:] * (torch.tanh(raw) / torch.tanh(torch.tensor(3.0)))[None, :, None]
    assert (masked[:, 1:] - want).abs().max().item() < 1e-6
    assert torch.allclose(token_value(torch.tensor([3.0])), torch.ones(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["deit_tiny_32", "deit_tiny_distilled", "reg4_gap"])
def test_gradients_reach_every_score(vit, images, key, mode):
    model = vit(key)
    add_masks(model, attn=mode)
    _randomize_scores(model, seed=1)
    model.train()
    out = model(images(model, batch=4))
    if isinstance(out, tuple):  # distilled DeiT in train mode: (head, head_dist)
        out = out[0] + out[1]
    loss = F.cross_entropy(out, torch.arange(4) % out.shape[1])
    loss.backward()
    for name, p in get_masks(model).named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_masked_checkpoint_round_trip(vit, images):
    a = vit("deit_tiny_distilled", seed=0)
    add_masks(a, attn="head")
    _randomize_scores(a, seed=4)
    b = vit("deit_tiny_distilled", seed=7)
    add_masks(b, attn="head")
    b.load_state_dict(a.state_dict())
    x = images(a)
    assert torch.equal(_logits(a, x), _logits(b, x))


# ---------------------------------------------------------------------------------------------- copies, errors
def test_deepcopy_has_independent_masks(vit, images):
    model = vit("deit_tiny_32")
    add_masks(model)
    x = images(model)
    base = _logits(model, x)
    twin = copy.deepcopy(model)
    assert get_masks(twin) is not get_masks(model)
    for i, blk in enumerate(twin.blocks):  # the copy's masked layers act through the copy's scores
        assert blk.attn.qkv._vitslim_score is get_masks(twin).attn[i]
        assert blk.norm1._vitslim_score is get_masks(twin).token[i]
    with torch.no_grad():
        get_masks(twin).attn[0].score.zero_()
        get_masks(twin).token[1].score.zero_()
    assert torch.equal(_logits(model, x), base)
    assert (_logits(twin, x) - base).abs().max().item() > 1e-4
    remove_masks(twin)
    assert get_masks(model) is not None and len(_mask_hooks(model)) == 4 * arch_spec(model).depth
    assert torch.equal(_logits(model, x), base)


def test_add_masks_twice_is_an_error(vit, one_line):
    model = vit("deit_tiny_32")
    add_masks(model)
    with pytest.raises(VitSlimError) as e:
        add_masks(model, attn="head")
    one_line(e.value)
    assert get_masks(model).attn_mode == "head_dim"
    assert len(_mask_hooks(model)) == 4 * arch_spec(model).depth
    remove_masks(model)
    add_masks(model, attn="head")
    assert get_masks(model).attn_mode == "head"
    assert len(_mask_hooks(model)) == 4 * arch_spec(model).depth


def test_unknown_attention_mode_is_an_error(vit, one_line):
    model = vit("deit_tiny_32")
    with pytest.raises(VitSlimError) as e:
        add_masks(model, attn="heads")
    one_line(e.value)
    assert "heads" in str(e.value)
    assert get_masks(model) is None and _mask_hooks(model) == []


def _small_vt(**kw):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw)


def _meta(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw)


def _unsupported_cases():
    # attention-pool heads, GluMlp/SwiGLU MLPs and dynamic_img_size are supported now (tests/test_families.py)
    from timm.layers import SwiGLU
    cases = [
        ("qk_norm", lambda: _small_vt(qk_norm=True), "q_norm"),
        ("swiglu_sub_ln", lambda: _small_vt(mlp_layer=SwiGLU, scale_mlp_norm=True), "hidden norm"),
        ("patch_drop", lambda: _small_vt(patch_drop_rate=0.25), "patch drop"),
        ("swin", lambda: _meta("swin_tiny_patch4_window7_224"), "SwinTransformer"),
        ("resnet", lambda: _meta("resnet18"), "ResNet"),
    ]
    # rope ViTs and post-norm EVA blocks (timm Eva) are supported now (tests/test_families.py)
    return cases


@pytest.mark.parametrize("build,part", [c[1:] for c in _unsupported_cases()], ids=[c[0] for c in _unsupported_cases()])
def test_unsupported_models_name_the_part(build, part, one_line):
    model = build()
    with pytest.raises(UnsupportedModelError) as e:
        add_masks(model)
    one_line(e.value)
    assert part.lower() in str(e.value).lower()
    assert get_masks(model) is None
    assert _mask_hooks(model) == []
    with pytest.raises(UnsupportedModelError):
        arch_spec(model)
