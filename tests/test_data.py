"""Datasets and single-image preprocessing: what search, retraining and the app rely on."""
from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitslim_core.data import (
    DIGITS_MEAN, DIGITS_STD, DatasetBundle, digits_split, image_to_tensor, load_data, load_image,
    upscale_digits,
)
from vitslim_core.errors import DataError

DIGITS_CFG = {"input_size": (1, 16, 16), "mean": DIGITS_MEAN, "std": DIGITS_STD,
              "interpolation": "bilinear", "crop_pct": 1.0}
RGB_CFG = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
           "interpolation": "bicubic", "crop_pct": 0.9}


def digits(**kw) -> DatasetBundle:
    args = dict(img_size=16, in_chans=1, mean=DIGITS_MEAN, std=DIGITS_STD)
    return load_data("digits", **{**args, **kw})


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_and_stratified():
    x_tr, x_te, y_tr, y_te = digits_split()
    x_tr2, x_te2, y_tr2, y_te2 = digits_split()
    assert (len(y_tr), len(y_te)) == (1437, 360)
    assert np.array_equal(y_te, y_te2) and np.array_equal(x_te, x_te2)
    # stratified: every class has its share (+-1) of the 20% test split
    counts = np.bincount(y_te, minlength=10)
    full = np.bincount(np.concatenate([y_tr, y_te]), minlength=10)
    assert np.all(np.abs(counts - full * 0.2) <= 1)
    # no image in both splits (the data has no exact duplicates across the split)
    train_set = {a.tobytes() for a in x_tr}
    assert not any(a.tobytes() in train_set for a in x_te)
    assert x_tr.min() >= 0 and x_tr.max() <= 1


def test_digits_shapes_and_normalisation():
    b = digits(augment=False)
    assert b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert b.input_size == (1, 16, 16) and b.name == "digits"
    x, y = b.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    xs = torch.stack([b.train[i][0] for i in range(len(b.train))])
    # the published statistics are those of the training split: normalised data is ~N(0, 1)
    assert abs(xs.mean().item()) < 0.01 and abs(xs.std().item() - 1) < 0.01
    assert sorted(set(b.test.targets)) == list(range(10))


def test_digits_other_size_and_channels():
    b = digits(img_size=(32, 24), in_chans=3, mean=(0.5, 0.5, 0.5), std=0.5)
    x, _ = b.test[3]
    assert x.shape == (3, 32, 24)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6


def test_digits_augmentation_is_seeded_per_epoch_and_leaves_global_rng_alone():
    b = digits(augment=True, seed=3)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    b.set_epoch(0)
    first = [b.train[i][0] for i in range(5)]
    again = [b.train[i][0] for i in range(5)]
    b.set_epoch(1)
    other = [b.train[i][0] for i in range(5)]
    assert all(torch.equal(a, c) for a, c in zip(first, again))
    assert all(not torch.equal(a, c) for a, c in zip(first, other))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    # another seed, other draws; the test split is never augmented
    b2 = digits(augment=True, seed=4)
    assert not torch.equal(b2.train[0][0], first[0])
    assert torch.equal(b.test[0][0], digits(augment=False).test[0][0])


def test_digits_augmentation_same_in_a_fresh_process_order():
    """Resume: item i of epoch e does not depend on which items were read before it."""
    a, b = digits(seed=1), digits(seed=1)
    a.set_epoch(7)
    b.set_epoch(7)
    _ = [a.train[i] for i in range(50)]
    assert torch.equal(a.train[123][0], b.train[123][0])


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_sized():
    kw = dict(img_size=8, in_chans=3, mean=0.5, std=0.25, augment=False, seed=5)
    a, b = load_data("synthetic:40", **kw), load_data("synthetic:40", **kw)
    assert len(a.train) == len(a.test) == 40 and a.num_classes == 10
    assert all(torch.equal(a.train[i][0], b.train[i][0]) for i in range(40))
    assert a.train.targets == b.train.targets
    assert np.bincount(a.train.targets).tolist() == [4] * 10
    assert a.train[0][0].shape == (3, 8, 8)
    c = load_data("synthetic:40", **{**kw, "seed": 6})
    assert not torch.equal(a.train[0][0], c.train[0][0])
    assert len(load_data("synthetic", **kw).train) == 256


def test_synthetic_is_learnable():
    """Nearest class mean on train separates the test split (so tiny models can learn it)."""
    b = load_data("synthetic:200", img_size=16, in_chans=1, mean=0.5, std=0.5, augment=False)
    xtr = torch.stack([b.train[i][0] for i in range(200)]).flatten(1)
    ytr = torch.tensor(b.train.targets)
    xte = torch.stack([b.test[i][0] for i in range(200)]).flatten(1)
    yte = torch.tensor(b.test.targets)
    means = torch.stack([xtr[ytr == k].mean(0) for k in range(10)])
    acc = (torch.cdist(xte, means).argmin(1) == yte).float().mean().item()
    assert acc > 0.9


def test_synthetic_augmentation_changes_with_epoch():
    b = load_data("synthetic:20", img_size=8, in_chans=1, mean=0.5, std=0.5, augment=True)
    b.set_epoch(0)
    x0 = b.train[2][0]
    assert torch.equal(x0, b.train[2][0])
    b.set_epoch(1)
    assert not torch.equal(x0, b.train[2][0])


@pytest.mark.parametrize("spec", ["mnist", "digits:3", "synthetic:0", "synthetic:x", "", "imagefolder:"])
def test_bad_specs_are_one_line_data_errors(spec):
    with pytest.raises(DataError) as err:
        load_data(spec, img_size=16, in_chans=1, mean=0.5, std=0.5)
    assert "\n" not in str(err.value)


def test_unknown_spec_lists_the_valid_forms():
    with pytest.raises(DataError, match="imagefolder:PATH"):
        load_data("mnist", img_size=16, in_chans=1, mean=0.5, std=0.5)


@pytest.mark.parametrize("kw", [dict(img_size=0), dict(in_chans=0), dict(mean=(0.1, 0.2)), dict(std=0.0)])
def test_bad_sizes_and_stats(kw):
    args = dict(img_size=16, in_chans=1, mean=0.5, std=0.5)
    with pytest.raises(DataError):
        load_data("synthetic:10", **{**args, **kw})


# ----------------------------------------------------------------------------- image folders


def _write_folder(root: Path, split: str, classes: dict[str, int], mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        d = root / split / name
        d.mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert(mode)
            img.save(d / f"{i}.png")


def test_imagefolder_needs_train_and_val(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no train/ and val/ folders"):
        load_data(f"imagefolder:{tmp_path}", img_size=16, in_chans=3, mean=0.5, std=0.5)
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}", img_size=16, in_chans=3, mean=0.5, std=0.5)


def test_imagefolder_loads_and_keeps_labels_aligned(tmp_path):
    _write_folder(tmp_path, "train", {"cat": 3, "dog": 2, "eel": 2}, mode="RGBA")
    _write_folder(tmp_path, "val", {"dog": 2, "eel": 1})  # no "cat" in val
    b = load_data(f"imagefolder:{tmp_path}", img_size=16, in_chans=3, mean=RGB_CFG["mean"],
                  std=RGB_CFG["std"], augment=True)
    assert b.class_names == ["cat", "dog", "eel"] and b.num_classes == 3
    assert len(b.train) == 7 and len(b.test) == 3
    assert b.test.targets == [1, 1, 2]  # indexed by the train classes
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    state = torch.get_rng_state()
    b.set_epoch(2)
    a1, a2 = b.train[4][0], b.train[4][0]
    b.set_epoch(3)
    assert torch.equal(a1, a2) and not torch.equal(a1, b.train[4][0])
    assert torch.equal(torch.get_rng_state(), state)
    gray = load_data(f"imagefolder:{tmp_path}", img_size=12, in_chans=1, mean=0.5, std=0.5, augment=False)
    assert gray.test[0][0].shape == (1, 12, 12)


def test_imagefolder_empty_or_foreign_val(tmp_path):
    _write_folder(tmp_path, "train", {"a": 1})
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError):
        load_data(f"imagefolder:{tmp_path}", img_size=8, in_chans=3, mean=0.5, std=0.5)
    _write_folder(tmp_path, "val", {"zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        load_data(f"imagefolder:{tmp_path}", img_size=8, in_chans=3, mean=0.5, std=0.5)


@pytest.mark.timeout(120)
def test_cifar_offline_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10") as err:
        load_data(f"cifar10:{tmp_path}", img_size=32, in_chans=3, mean=0.5, std=0.5)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- single images


def _rgb_image(size=(40, 30)) -> Image.Image:
    arr = np.random.default_rng(1).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
@pytest.mark.parametrize("cfg", [RGB_CFG, DIGITS_CFG], ids=["rgb", "digits"])
def test_image_to_tensor_any_mode(mode, cfg):
    img = _rgb_image()
    if mode in ("I;16", "I", "F"):
        arr = np.asarray(img.convert("L"), dtype=np.float32)
        img = Image.fromarray((arr * 257).astype(np.uint16)) if mode == "I;16" else \
            Image.fromarray(arr * 257, mode="F").convert(mode) if mode == "I" else Image.fromarray(arr / 255.0, mode="F")
    else:
        img = img.convert(mode)
    x = image_to_tensor(img, cfg)
    assert x.shape == (1, *cfg["input_size"]) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((10, 10), 30000, dtype=np.uint16)
    img16 = Image.fromarray(arr)
    img8 = Image.fromarray(np.full((10, 10), round(30000 / 65535 * 255), dtype=np.uint8))
    assert torch.allclose(image_to_tensor(img16, RGB_CFG), image_to_tensor(img8, RGB_CFG))


def test_rgb_matches_timm_eval_transform():
    from timm.data import create_transform

    img = _rgb_image((50, 37))
    tf = create_transform(input_size=RGB_CFG["input_size"], interpolation=RGB_CFG["interpolation"],
                          mean=RGB_CFG["mean"], std=RGB_CFG["std"], crop_pct=RGB_CFG["crop_pct"])
    assert torch.allclose(image_to_tensor(img, RGB_CFG)[0], tf(img), atol=1e-6)


def test_transparent_background_reads_as_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    assert torch.allclose(image_to_tensor(img, RGB_CFG), image_to_tensor(white, RGB_CFG))


def test_tiny_and_empty_images():
    assert image_to_tensor(Image.new("RGB", (1, 1), (10, 200, 30)), RGB_CFG).shape == (1, 3, 32, 32)
    assert image_to_tensor(Image.new("L", (1, 1), 255), DIGITS_CFG).shape == (1, 1, 16, 16)
    with pytest.raises(DataError, match="empty"):
        image_to_tensor(Image.new("RGB", (0, 5)), RGB_CFG)


def test_digits_photo_matches_the_data():
    """A dark-on-light rendering of a test digit, blown up, gives back (nearly) the data tensor."""
    b = digits(augment=False)
    _, x_te, _, _ = digits_split()
    # pick a digit whose ink spans rows 0..7 and columns 1..6 (centred, like most of the data)
    idx = next(i for i, a in enumerate(x_te)
               if (a[:, 1] > 0.5).any() and (a[:, 6] > 0.5).any() and not a[:, [0, 7]].any()
               and (a[0] > 0.5).any() and (a[7] > 0.5).any())
    ink = np.kron(x_te[idx], np.ones((16, 16)))  # 128x128, nearest upscaling
    img = Image.fromarray(np.round((1 - ink) * 255).astype(np.uint8))  # black ink on white paper
    x = image_to_tensor(img, DIGITS_CFG)
    assert torch.allclose(x[0], b.test[idx][0], atol=0.02)
    # the digits treatment can be asked for by name, e.g. for a timm model trained on digits
    y = image_to_tensor(img.convert("RGB"), RGB_CFG, dataset="digits")
    assert y.shape == (1, 3, 32, 32)
    ref = upscale_digits(torch.from_numpy(x_te[idx])[None, None], (32, 32))[0, 0]
    mean, std = RGB_CFG["mean"][0], RGB_CFG["std"][0]
    assert torch.allclose(y[0, 0], (ref - mean) / std, atol=0.05)


# ----------------------------------------------------------------------------- load_image


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (what a decompression bomb looks like up front)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_load_image_guards_against_bombs(tmp_path):
    with pytest.raises(DataError, match="pixels"):
        load_image(_png_header_only(100_000, 100_000))
    with pytest.raises(DataError, match="pixels"):
        load_image(_png_header_only(8000, 8000))  # under PIL's own limit, over ours
    img = _rgb_image((20, 20))
    path = tmp_path / "a.png"
    img.save(path)
    with pytest.raises(DataError, match="limit"):
        load_image(path, max_pixels=100)
    assert load_image(path).size == (20, 20)


def test_load_image_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "x.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="not an image"):
        load_image(tmp_path / "x.png")
    buf = io.BytesIO()
    _rgb_image().save(buf, format="PNG")
    with pytest.raises(DataError):
        load_image(buf.getvalue()[:60])  # truncated


def test_load_image_first_frame_of_animation():
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    assert img.convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    buf2 = io.BytesIO()
    _rgb_image().save(buf2, format="PNG")
    buf2.seek(0)
    assert load_image(buf2).size == (40, 30)


@pytest.mark.parametrize("fmt", ["AVIF", "JPEG2000", "WEBP", "TIFF"])
def test_load_image_reads_modern_formats(fmt):
    import io as _io
    from PIL import features
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    if fmt == "JPEG2000" and not features.check("jpg_2000"):
        pytest.skip("this Pillow has no JPEG 2000 support")
    buf = _io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(buf, fmt)
    assert load_image(buf.getvalue()).size == (32, 24)


def test_refused_formats_are_named(tmp_path):
    eps = tmp_path / "drawing.eps"  # EPS would run Ghostscript: refused before anything is decoded
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(DataError, match="EPS format, which is not accepted"):
        load_image(eps)
