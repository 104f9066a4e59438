"""MaskScores: reading scores from a model, the score file (DESIGN invariant 6), damaged files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from vitslim_core import (MaskScores, PlanMismatchError, ScoreFileError, VitSlimError, add_masks, arch_spec,
                          get_masks, plan_for_flops, plan_for_ratios)

MODES = ("head_dim", "head", "uniform")
META = {
    "model": {"name": "deit_tiny_patch16_224", "kwargs": {"img_size": 32, "depth": 2}},
    "data": {"name": "synthetic", "class_names": ["cat", "dog", "émeu", "a b"], "mean": [0.5, 0.5, 0.5],
             "std": [0.25, 0.25, 0.25]},
    "search": {"epochs": 3, "w_attn": 2e-4, "searched": {"attn": True, "mlp": True, "token": False}},
    "versions": {"timm": "1.0.31", "torch": "2.x"},
}


def _same_scores(a: MaskScores, b: MaskScores) -> None:
    assert a.attn_mode == b.attn_mode
    assert a.spec == b.spec
    assert a.meta == b.meta
    for kind in ("attn", "mlp", "token"):
        va, vb = getattr(a, kind), getattr(b, kind)
        assert len(va) == len(vb)
        for x, y in zip(va, vb):
            assert x.dtype == y.dtype == torch.float32
            assert torch.equal(x, y)


def _masked(vit, mode="head_dim", key="deit_tiny_distilled", seed=0):
    model = vit(key)
    add_masks(model, attn=mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mods in (get_masks(model).attn, get_masks(model).mlp):
            for m in mods:
                m.score.copy_(torch.randn(m.score.shape, generator=g))
        for m in get_masks(model).token:
            m.score.copy_(3 * torch.randn(m.score.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(vit, tmp_path, mode):
    sc = MaskScores.from_model(_masked(vit, mode), meta=META)
    path = sc.save(tmp_path / "scores.safetensors")
    assert path == tmp_path / "scores.safetensors"
    back = MaskScores.load(path)
    _same_scores(sc, back)
    assert back.spec.model_name == "deit_tiny_patch16_224"
    assert back.spec.model_kwargs == {"img_size": 32, "depth": 2}
    assert back.class_names == ["cat", "dog", "émeu", "a b"]
    assert back.searched() == {"attn": True, "mlp": True, "token": False}
    # derived views survive the trip bit for bit
    assert np.array_equal(sc.attn_values(), back.attn_values())
    assert np.array_equal(sc.token_values(), back.token_values())
    assert sorted(os.listdir(tmp_path)) == ["scores.safetensors"]


def test_save_to_a_run_folder(vit, tmp_path):
    sc = MaskScores.from_model(_masked(vit, "head"))
    run = tmp_path / "run1"
    path = sc.save(run)  # a folder path (need not exist yet)
    assert path == run / "scores.safetensors" and path.is_file()
    _same_scores(sc, MaskScores.load(run))
    run2 = tmp_path / "existing.folder"
    run2.mkdir()
    assert sc.save(run2) == run2 / "scores.safetensors"
    _same_scores(sc, MaskScores.load(run2))


def test_saving_twice_overwrites(vit, tmp_path):
    a = MaskScores.from_model(_masked(vit, seed=1))
    b = MaskScores.from_model(_masked(vit, seed=2))
    p = a.save(tmp_path / "s.safetensors")
    b.save(p)
    _same_scores(b, MaskScores.load(p))
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]


def test_dense_scores_round_trip_and_plan_the_same(deit_s_spec, rscores, tmp_path):
    sc = rscores(deit_s_spec, "uniform", seed=5, meta={"note": "x"})
    back = MaskScores.load(sc.save(tmp_path / "scores.safetensors"))
    _same_scores(sc, back)
    a, b = plan_for_flops(sc, 0.5), plan_for_flops(back, 0.5)
    assert np.array_equal(a.attn, b.attn) and np.array_equal(a.mlp, b.mlp) and np.array_equal(a.token, b.token)
    dense = MaskScores.dense(deit_s_spec)
    _same_scores(dense, MaskScores.load(dense.save(tmp_path / "dense.safetensors")))
    assert plan_for_ratios(dense).flops_ratio == 1.0


# ---------------------------------------------------------------------------------------------- from_model / load_into
@pytest.mark.parametrize("mode", MODES)
def test_from_model_reflects_the_model_scores(vit, mode):
    model = _masked(vit, mode)
    masks = get_masks(model)
    sc = MaskScores.from_model(model)
    assert sc.attn_mode == mode
    assert sc.spec.shape_key() == arch_spec(model).shape_key()
    for kind in ("attn", "mlp", "token"):
        for m, v in zip(getattr(masks, kind), getattr(sc, kind)):
            assert torch.equal(m.score.detach(), v)
    np.testing.assert_allclose(sc.token_values(), np.stack([m.value().detach().double().numpy()
                                                            for m in masks.token]), rtol=1e-6, atol=1e-7)
    # a snapshot: later training steps do not change it
    before = sc.mlp[0].clone()
    with torch.no_grad():
        masks.mlp[0].score.add_(1.0)
    assert torch.equal(sc.mlp[0], before)
    assert not torch.equal(MaskScores.from_model(model).mlp[0], before)


def test_from_model_without_masks_is_an_error(vit, one_line):
    with pytest.raises(VitSlimError) as e:
        MaskScores.from_model(vit("deit_tiny_32"))
    one_line(e.value)


def test_attn_values_broadcast_by_mode(vit):
    for mode in MODES:
        sc = MaskScores.from_model(_masked(vit, mode))
        s = sc.spec
        v = sc.attn_values()
        assert v.shape == (s.depth, s.num_heads, s.head_dim)
        if mode == "head":
            assert np.array_equal(v[1, :, 0], sc.attn[1].double().numpy()) and (v == v[:, :, :1]).all()
        elif mode == "uniform":
            assert np.array_equal(v[1, 0, :], sc.attn[1].double().numpy()) and (v == v[:, :1, :]).all()
        else:
            assert np.array_equal(v[1], sc.attn[1].double().numpy())
    grid = sc.token_grid()
    assert grid.shape == (s.depth, *s.grid)
    np.testing.assert_allclose(grid[1].reshape(-1), np.tanh(sc.token[1].double().numpy()) / np.tanh(3.0))


@pytest.mark.parametrize("mode", MODES)
def test_load_into_round_trip(vit, images, tmp_path, mode):
    src = _masked(vit, mode, seed=3)
    path = MaskScores.from_model(src).save(tmp_path / "scores.safetensors")
    dst = vit("deit_tiny_distilled")
    add_masks(dst, attn=mode)
    x = images(dst)
    with torch.no_grad():
        assert (src(x) - dst(x)).abs().max() > 1e-4
    MaskScores.load(path).load_into(dst)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    _same_scores(MaskScores.from_model(src), MaskScores.from_model(dst))


def test_load_into_refuses_mismatches(vit, one_line):
    sc = MaskScores.from_model(_masked(vit, "head_dim"))
    other_mode = vit("deit_tiny_distilled")
    add_masks(other_mode, attn="head")
    with pytest.raises(ScoreFileError) as e:
        sc.load_into(other_mode)
    one_line(e.value)
    with pytest.raises(ScoreFileError):
        sc.load_into(vit("deit_tiny_distilled"))  # no masks
    other_shape = vit("deit_tiny_64")
    add_masks(other_shape)
    with pytest.raises(PlanMismatchError) as e:
        sc.load_into(other_shape)
    one_line(e.value)
    assert torch.equal(get_masks(other_shape).mlp[0].score, torch.ones(768))  # untouched


# ---------------------------------------------------------------------------------------------- construction checks
def test_invalid_scores_are_refused_in_memory(deit_s_spec):
    good = MaskScores.dense(deit_s_spec)
    bad_values = [torch.full((6, 64), float("nan")), torch.full((6, 64), float("inf")), torch.ones(6),
                  torch.ones(6, 64, dtype=torch.int32)]
    for v in bad_values:
        with pytest.raises(ScoreFileError):
            MaskScores(deit_s_spec, "head_dim", [v] + good.attn[1:], good.mlp, good.token)
    with pytest.raises(ScoreFileError):
        MaskScores(deit_s_spec, "head_dim", good.attn[:-1], good.mlp, good.token)
    with pytest.raises(ScoreFileError):
        MaskScores(deit_s_spec, "heads", good.attn, good.mlp, good.token)


# ---------------------------------------------------------------------------------------------- damaged files
@pytest.fixture
def saved(vit, tmp_path):
    sc = MaskScores.from_model(_masked(vit, "head_dim"), meta=META)
    path = sc.save(tmp_path / "good.safetensors")
    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return path, md, tensors


def _rewrite(path, tensors, md):
    safetensors.torch.save_file(tensors, str(path), metadata=md)
    return path


def _header_edit(edit):
    def apply(tensors, md):
        h = json.loads(md["vitslim"])
        edit(h)
        md["vitslim"] = json.dumps(h)
    return apply


BAD_SCORE_FILES = {
    "no_metadata": lambda t, md: md.clear(),
    "foreign_format": lambda t, md: md.update(format="something-else"),
    "version_999": lambda t, md: md.update(format_version="999"),
    "header_not_json": lambda t, md: md.update(vitslim="{not json"),
    "header_a_list": lambda t, md: md.update(vitslim="[1, 2]"),
    "header_missing": lambda t, md: md.pop("vitslim"),
    "nan_scores": lambda t, md: t["mlp.1"].fill_(float("nan")),
    "inf_token": lambda t, md: t["token.0"].__setitem__(0, float("inf")),
    "wrong_shape": lambda t, md: t.update({"attn.0": torch.ones(3, 63)}),
    "wrong_mode_shape": _header_edit(lambda h: h.update(attn_mode="head")),
    "unknown_mode": _header_edit(lambda h: h.update(attn_mode="bogus")),
    "int_scores": lambda t, md: t.update({"mlp.0": torch.ones(768, dtype=torch.int64)}),
    "missing_tensor": lambda t, md: t.pop("token.1"),
    "arch_missing": _header_edit(lambda h: h.pop("arch")),
    "arch_incomplete": _header_edit(lambda h: h["arch"].pop("mlp_hidden")),
    "arch_depth_not_a_number": _header_edit(lambda h: h["arch"].update(depth="2")),
    "arch_grid_garbage": _header_edit(lambda h: h["arch"].update(grid=["a", "b"])),
    "arch_deeper": _header_edit(lambda h: h["arch"].update(depth=3)),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORE_FILES))
def test_damaged_score_files_are_one_line_score_file_errors(saved, tmp_path, case, one_line):
    _, md, tensors = saved
    BAD_SCORE_FILES[case](tensors, md)
    path = _rewrite(tmp_path / "bad.safetensors", tensors, md)
    with pytest.raises(ScoreFileError) as e:
        MaskScores.load(path)
    one_line(e.value)


def test_the_fixture_file_itself_is_valid(saved):
    path, md, tensors = saved
    _rewrite(path.with_name("copy.safetensors"), tensors, md)
    MaskScores.load(path.with_name("copy.safetensors"))


@pytest.mark.parametrize("content", ["random", "truncated", "empty", "json", "huge_header"])
def test_unreadable_score_files_are_one_line_score_file_errors(saved, tmp_path, content, one_line):
    path, _, _ = saved
    data = path.read_bytes()
    blobs = {
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "json": b'{"format": "vitslim-scores"}',
        "huge_header": (10 ** 12).to_bytes(8, "little") + b"{}",
    }
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blobs[content])
    with pytest.raises(ScoreFileError) as e:
        MaskScores.load(bad)
    one_line(e.value)


def test_foreign_safetensors_file(tmp_path, one_line):
    p = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"weight": torch.ones(3, 3)}, str(p))
    with pytest.raises(ScoreFileError) as e:
        MaskScores.load(p)
    one_line(e.value)
    assert "not a vitslim score file" in str(e.value)


def test_missing_score_files(tmp_path, one_line):
    with pytest.raises(ScoreFileError) as e:
        MaskScores.load(tmp_path / "nope.safetensors")
    one_line(e.value)
    with pytest.raises(ScoreFileError) as e:
        MaskScores.load(tmp_path)  # a run folder without scores.safetensors
    one_line(e.value)
    assert "scores.safetensors" in str(e.value)


# ---------------------------------------------------------------------------------------------- atomic writes
def _listing(folder):
    return sorted(os.listdir(folder))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_files(vit, tmp_path, monkeypatch):
    old = MaskScores.from_model(_masked(vit, seed=1))
    path = old.save(tmp_path / "scores.safetensors")
    before = path.read_bytes()
    new = MaskScores.from_model(_masked(vit, seed=2))
    real = safetensors.torch.save_file

    class Boom(RuntimeError):
        pass

    def half_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # leave a half-written file behind, then fail
            f.truncate(os.path.getsize(filename) // 2)
        raise Boom("interrupted")
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(Boom):
        new.save(path)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["scores.safetensors"]
    monkeypatch.undo()
    _same_scores(old, MaskScores.load(path))


def test_disk_full_is_a_one_line_error_and_keeps_the_old_file(vit, tmp_path, monkeypatch, one_line):
    old = MaskScores.from_model(_masked(vit, seed=1))
    path = old.save(tmp_path / "scores.safetensors")
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(VitSlimError) as e:
        MaskScores.from_model(_masked(vit, seed=2)).save(path)
    one_line(e.value)
    assert "disk is full" in str(e.value)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["scores.safetensors"]
