"""Building models: names, recipes, data configs and local checkpoints."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from vitslim_core.data import DIGITS_MEAN, DIGITS_STD
from vitslim_core.errors import VitSlimError
from vitslim_core.models import DEMO_MODEL, DEMO_TRAIN, build_model, data_config, rebuild_model
from vitslim_core.spec import arch_spec

TINY = "deit_tiny_patch16_224"


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def tiny32():
    torch.manual_seed(0)
    model, recipe = build_model(TINY, img_size=32)
    return model.eval(), recipe


def logits(model: nn.Module, chans: int = 3, size: int = 32) -> torch.Tensor:
    x = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------- names and recipes


def test_unknown_name_suggests_close_ones():
    with pytest.raises(VitSlimError) as err:
        build_model("deit_tiny_patch16_22")
    assert "deit_tiny_patch16_224" in one_line(err)
    with pytest.raises(VitSlimError, match="unknown model"):
        build_model("qqqqqqqq")
    with pytest.raises(VitSlimError):
        build_model("")


def test_demo_model_shape_and_recipe():
    model, recipe = build_model(DEMO_MODEL)
    spec = arch_spec(model)
    assert spec.grid == (8, 8) and spec.num_prefix_tokens == 1 and spec.depth >= 6
    assert spec.in_chans == 1 and spec.num_classes == 10
    assert logits(model, 1, 16).shape == (2, 10)
    json.dumps(recipe)
    assert recipe["name"] == DEMO_MODEL
    assert {"num_classes", "img_size", "in_chans", "embed_dim", "depth"} <= set(recipe["kwargs"])
    again = rebuild_model(json.loads(json.dumps(recipe)))
    assert arch_spec(again).to_dict() == spec.to_dict()
    assert {"epochs", "batch_size", "lr", "weight_decay"} <= set(DEMO_TRAIN)


def test_recipe_keeps_what_shapes_the_architecture(tiny32):
    model, recipe = build_model(TINY, img_size=(32, 48), in_chans=1, num_classes=7, drop_path_rate=0.1,
                                global_pool="avg")
    kw = json.loads(json.dumps(recipe))["kwargs"]
    assert kw["num_classes"] == 7 and kw["img_size"] == [32, 48] and kw["in_chans"] == 1
    assert kw["drop_path_rate"] == 0.1 and kw["global_pool"] == "avg"
    again = rebuild_model(json.loads(json.dumps(recipe)))
    assert {k: v.shape for k, v in again.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert again.global_pool == "avg"
    assert tiny32[1]["kwargs"]["img_size"] == 32


@pytest.mark.parametrize("recipe", [None, [], {"name": 3}, {"name": TINY, "kwargs": [1]},
                                    {"name": TINY, "kwargs": {}, "extra": 1}, {"kwargs": {}},
                                    {"name": TINY, "kwargs": {"no_such_arg": 1}},
                                    {"name": TINY, "kwargs": {"pretrained": True}}])
def test_malformed_recipes(recipe):
    with pytest.raises(VitSlimError) as err:
        rebuild_model(recipe)
    one_line(err)


@pytest.mark.parametrize("kw", [dict(num_classes=-1), dict(num_classes=2.5), dict(in_chans=0)])
def test_bad_sizes(kw):
    with pytest.raises(VitSlimError) as err:
        build_model(DEMO_MODEL, **kw)
    one_line(err)


def test_model_kwargs_must_be_json():
    with pytest.raises(VitSlimError, match="JSON"):
        build_model(TINY, img_size=32, norm_layer=nn.LayerNorm)


# ----------------------------------------------------------------------------- data configs


def test_data_config_of_demo_and_timm_models(tiny32):
    cfg = data_config(build_model(DEMO_MODEL)[0])
    assert cfg["input_size"] == (1, 16, 16)
    assert cfg["mean"] == DIGITS_MEAN and cfg["std"] == DIGITS_STD
    assert {"interpolation", "crop_pct"} <= set(cfg)
    cfg = data_config(tiny32[0])
    assert cfg["input_size"] == (3, 32, 32)  # the model's size, not the pretrained 224
    assert len(cfg["mean"]) == 3 and cfg["interpolation"] == "bicubic"
    gray = data_config(build_model(TINY, img_size=32, in_chans=1)[0])
    assert gray["input_size"] == (1, 32, 32) and len(gray["mean"]) == len(gray["std"]) == 1
    json.dumps(cfg)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip(tiny32, tmp_path, suffix):
    model, _ = tiny32
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    # img_size comes from the checkpoint's position embedding when not given
    loaded, recipe = build_model(TINY, checkpoint=path)
    assert recipe["kwargs"]["img_size"] == 32 and recipe["kwargs"]["num_classes"] == 1000
    assert torch.equal(logits(loaded), logits(model))
    loaded2, _ = build_model(TINY, checkpoint=str(path), img_size=32)
    assert torch.equal(logits(loaded2), logits(model))


def test_wrapped_pth_checkpoint(tiny32, tmp_path):
    model, _ = tiny32
    path = tmp_path / "train_state.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    loaded, _ = build_model(TINY, checkpoint=path)
    assert torch.equal(logits(loaded), logits(model))


def test_new_num_classes_drops_only_the_head(tiny32, tmp_path):
    model, _ = tiny32
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    loaded, recipe = build_model(TINY, checkpoint=path, num_classes=5)
    assert loaded.head.weight.shape == (5, 192) and recipe["kwargs"]["num_classes"] == 5
    for name, value in loaded.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, model.state_dict()[name]), name
    assert logits(loaded).shape == (2, 5)
    assert logging.getLogger("timm.models._builder").level == logging.NOTSET  # left as found


def test_fine_tuned_head_is_kept(tmp_path):
    """A checkpoint with 10 classes loads its head when num_classes is unset or 10."""
    model, _ = build_model(TINY, img_size=32, num_classes=10)
    path = tmp_path / "ft.safetensors"
    save_file(model.state_dict(), str(path))
    for kw in ({}, {"num_classes": 10}):
        loaded, recipe = build_model(TINY, checkpoint=path, **kw)
        assert recipe["kwargs"]["num_classes"] == 10
        assert torch.equal(logits(loaded), logits(model))


def test_headless_checkpoint_gets_a_fresh_head(tiny32, tmp_path):
    model, _ = tiny32
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(tmp_path / "backbone.safetensors"))
    loaded, recipe = build_model(TINY, checkpoint=tmp_path / "backbone.safetensors")
    assert recipe["kwargs"]["num_classes"] == 1000
    assert torch.equal(loaded.blocks[5].mlp.fc2.weight, model.blocks[5].mlp.fc2.weight)
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(loaded.forward_head(loaded.forward_features(x), pre_logits=True),
                           model.eval().forward_head(model.forward_features(x), pre_logits=True))


def test_gray_checkpoint_keeps_its_channels(tmp_path):
    model, _ = build_model(TINY, img_size=32, in_chans=1, num_classes=3)
    path = tmp_path / "gray.pth"
    torch.save(model.state_dict(), path)
    loaded, recipe = build_model(TINY, checkpoint=path)
    assert recipe["kwargs"]["in_chans"] == 1
    assert torch.equal(logits(loaded, chans=1), logits(model, chans=1))


def test_corrupt_and_missing_checkpoints(tmp_path):
    for name in ("bad.safetensors", "bad.pth"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 50)
        with pytest.raises(VitSlimError, match="cannot read checkpoint") as err:
            build_model(TINY, checkpoint=tmp_path / name)
        one_line(err)
    with pytest.raises(VitSlimError, match="does not exist"):
        build_model(TINY, checkpoint=tmp_path / "none.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(VitSlimError, match="safetensors"):
        build_model(TINY, checkpoint=tmp_path / "w.txt")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(VitSlimError, match="no state dict"):
        build_model(TINY, checkpoint=tmp_path / "meta.pth")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a module, not tensors: needs full unpickling
    with pytest.raises(VitSlimError, match="cannot read checkpoint") as err:
        build_model(TINY, checkpoint=path)
    one_line(err)


def test_weights_that_do_not_fit(tiny32, tmp_path):
    model, _ = tiny32
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(VitSlimError, match="does not fit") as err:
        build_model("deit_small_patch16_224", checkpoint=path)
    assert "192" in one_line(err)
    state = dict(model.state_dict())
    del state["blocks.3.mlp.fc1.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    for kw in ({}, {"num_classes": 4}):  # the second makes timm load non-strictly
        with pytest.raises(VitSlimError, match="blocks.3.mlp.fc1.weight") as err:
            build_model(TINY, checkpoint=tmp_path / "partial.safetensors", **kw)
        one_line(err)


def test_pretrained_offline_suggests_a_checkpoint(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", offline)
    with pytest.raises(VitSlimError, match="--checkpoint FILE") as err:
        build_model(TINY, pretrained=True, img_size=32)
    one_line(err)
    with pytest.raises(VitSlimError, match="--checkpoint FILE"):
        build_model(DEMO_MODEL, pretrained=True)


def test_demo_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(DEMO_MODEL)
    save_file(model.state_dict(), str(tmp_path / "demo.safetensors"))
    torch.save(model.state_dict(), tmp_path / "demo.pth")
    for name in ("demo.safetensors", "demo.pth"):
        loaded, _ = build_model(DEMO_MODEL, checkpoint=tmp_path / name)
        assert torch.equal(logits(loaded, 1, 16), logits(model, 1, 16))
    fresh, _ = build_model(DEMO_MODEL, checkpoint=tmp_path / "demo.safetensors", num_classes=3)
    assert logits(fresh, 1, 16).shape == (2, 3)
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with pytest.raises(VitSlimError, match="does not fit") as err:
        build_model(DEMO_MODEL, checkpoint=tmp_path / "demo.safetensors", embed_dim=32, num_heads=2)
    one_line(err)
