"""Fashion-MNIST: the IDX reader, finding the files, the fixed validation split, fashion-vit, the bundled run."""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitslim_core import fashion
from vitslim_core.data import load_data
from vitslim_core.errors import DataError
from vitslim_core.fashion import CLASS_NAMES, FILES, find_files, read_fashion, read_idx, val_split
from vitslim_core.models import FASHION_ARCH, FASHION_MODEL, FASHION_TRAIN, build_model, data_config, rebuild_model

REAL = fashion.DEBIAN_DIR
HAVE_REAL = all((REAL / f"{stem}.gz").is_file() or (REAL / stem).is_file() for stem in FILES.values())
needs_real = pytest.mark.skipif(not HAVE_REAL, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
# sha256 of the sorted validation indices (int64 little-endian) of the real training labels: the split
# must be the same on every machine and in every version
VAL_SHA256_PREFIX = "d358764a42ac65c9"


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text
    return text


# ----------------------------------------------------------------------------- tiny IDX files


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else (0x800 | array.ndim)
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool, magic: int | None = None) -> Path:
    data = idx_bytes(array, magic)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def tiny_set(n_train: int = 240, n_test: int = 50, side: int = 28, seed: int = 0):
    """Random images whose class is written in their brightness (learnable), balanced labels."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, side, side)).astype(np.uint8) + (labels * 20)[:, None, None]
        out += [images.astype(np.uint8), labels]
    return out


def write_set(folder: Path, gz: bool = True, **kw) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = tiny_set(**kw)
    for key, array in zip(("train_images", "train_labels", "test_images", "test_labels"), arrays):
        write_idx(folder / FILES[key], array, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / "img", images, gz), "images")
    assert got.dtype == np.uint8 and got.shape == (7, 28, 28) and np.array_equal(got, images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "lab", labels, gz), "labels"), labels)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_wrong_magic(tmp_path, gz):
    labels = write_idx(tmp_path / "lab", np.arange(5, dtype=np.uint8), gz)
    with pytest.raises(DataError, match="not an IDX images file") as err:
        read_idx(labels, "images")  # a labels file (0x801) where images are expected
    assert "0x00000801" in one_line(err)
    ints = write_idx(tmp_path / "int", np.zeros((2, 28, 28)), gz, magic=0x00000C03)  # int32 type code
    with pytest.raises(DataError, match="0x00000c03"):
        read_idx(ints, "images")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_idx(tmp_path / "empty", "labels")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_truncated_or_padded(tmp_path, gz):
    data = idx_bytes(np.zeros((4, 28, 28)))
    for name, body, message in (("short", data[:-10], "is truncated: 3,126 of the 3,136 bytes"),
                                ("head", data[:10], "header is incomplete"),
                                ("long", data + b"\0", "has data after")):
        path = tmp_path / name
        path.write_bytes(gzip.compress(body) if gz else body)
        with pytest.raises(DataError, match=message) as err:
            read_idx(path, "images")
        one_line(err)


def test_idx_damaged_gzip_and_huge_header(tmp_path):
    packed = gzip.compress(idx_bytes(np.zeros((40, 28, 28))))
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="gzip data is truncated") as err:
        read_idx(tmp_path / "cut.gz", "images")
    one_line(err)
    (tmp_path / "bad.gz").write_bytes(packed[:12] + b"\xff" * 40 + packed[52:])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "bad.gz", "images")
    # a header claiming 2^32 x 28 x 28 values is refused before anything is allocated
    head = (0x803).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "huge").write_bytes(head + b"\0" * 100)
    with pytest.raises(DataError, match="far more than"):
        read_idx(tmp_path / "huge", "images")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope", "images")


def test_counts_dims_and_labels_are_checked(tmp_path):
    write_set(tmp_path / "ok")
    files = find_files(tmp_path / "ok")
    assert len(read_fashion(files)[0]) == 240
    bad = dict(files)
    write_idx(tmp_path / "lab", np.zeros(239, dtype=np.uint8), True)
    bad["train_labels"] = tmp_path / "lab.gz"
    with pytest.raises(DataError, match="240 images .* but 239 labels") as err:
        read_fashion(bad)
    one_line(err)
    write_idx(tmp_path / "img", np.zeros((50, 32, 32)), True)
    with pytest.raises(DataError, match="32x32 images; Fashion-MNIST images are 28x28"):
        read_fashion({**files, "test_images": tmp_path / "img.gz"})
    write_idx(tmp_path / "lab10", np.full(50, 10, dtype=np.uint8), True)
    with pytest.raises(DataError, match="label 10"):
        read_fashion({**files, "test_labels": tmp_path / "lab10.gz"})


# ----------------------------------------------------------------------------- finding the files


def test_path_forms_and_missing_files(tmp_path):
    write_set(tmp_path / "flat", gz=False)
    assert find_files(tmp_path / "flat")["test_images"].name == FILES["test_images"]
    write_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=True)  # a torchvision root
    assert find_files(tmp_path / "tv")["train_labels"].name == FILES["train_labels"] + ".gz"
    (tmp_path / "tv" / "FashionMNIST" / "raw" / (FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as err:
        find_files(tmp_path / "tv")
    assert "apt-get install dataset-fashion-mnist" in one_line(err)
    with pytest.raises(DataError, match="does not exist"):
        find_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Fashion-MNIST is not in .*empty.*--download") as err:
        load_data(f"fashion-mnist:{tmp_path / 'empty'}", img_size=28, in_chans=1, mean=0.5, std=0.5)
    one_line(err)


def test_default_places_and_download_only_when_allowed(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian")
    root = tmp_path / "root"
    calls = []

    class FakeFashionMNIST:  # stands in for torchvision's downloader: writes the raw files
        def __init__(self, where, train=True, download=False):
            calls.append((where, download))
            write_set(Path(where) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(DataError, match="no-debian or .*root/FashionMNIST/raw") as err:
        find_files(None, data_root=root)
    one_line(err)
    assert calls == []  # no download unless allowed
    files = find_files(None, data_root=root, download=True)
    assert calls == [(str(root), True)] and files["train_images"].parent == root / "FashionMNIST" / "raw"
    find_files(None, data_root=root, download=True)
    assert len(calls) == 1  # present now: not downloaded again
    write_set(tmp_path / "no-debian")  # Debian's folder comes first
    assert find_files(None, data_root=root)["train_images"].parent == tmp_path / "no-debian"


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*a, **kw):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError, match="downloading Fashion-MNIST .* failed .*apt-get") as err:
        find_files(None, data_root=tmp_path, download=True)
    one_line(err)


# ----------------------------------------------------------------------------- bundle and split


def test_bundle_splits_and_preprocessing(tmp_path):
    tr_x, tr_y, te_x, te_y = write_set(tmp_path)
    b = load_data(f"fashion-mnist:{tmp_path}", img_size=28, in_chans=1, mean=fashion.MEAN, std=fashion.STD,
                  augment=False)
    assert b.name == "fashion-mnist" and b.num_classes == 10 and b.class_names == list(CLASS_NAMES)
    assert b.input_size == (1, 28, 28)
    assert (len(b.train), len(b.val), len(b.test)) == (220, 20, 50)  # 1/12 held out
    assert b.selection == (b.val, "val")
    assert np.bincount(b.val.targets, minlength=10).tolist() == [2] * 10
    x, y = b.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(te_y[3])
    expect = (torch.from_numpy(te_x[3]).float() / 255 - fashion.MEAN[0]) / fashion.STD[0]
    assert torch.allclose(x[0], expect, atol=1e-6)
    # train and val are the training images, disjoint, in file order
    _, val_idx = val_split(tr_y)
    assert torch.equal(b.val.images, torch.from_numpy(tr_x[val_idx]))
    rgb = load_data(f"fashion-mnist:{tmp_path}", img_size=32, in_chans=3, mean=0.5, std=0.5, augment=False)
    x3, _ = rgb.val[0]
    assert x3.shape == (3, 32, 32) and torch.equal(x3[0], x3[2])


def test_val_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), [100, 200, 50, 50, 100, 100, 100, 100, 100, 100])
    tr, va = val_split(labels, size=100)
    assert len(va) == 100 and len(tr) == len(labels) - 100
    assert not set(tr) & set(va) and sorted([*tr, *va]) == list(range(len(labels)))
    counts = np.bincount(labels[va], minlength=10)
    assert np.all(np.abs(counts - np.bincount(labels) / 10) <= 1) and counts[1] == 20
    assert np.array_equal(val_split(labels, size=100)[1], va)
    assert not np.array_equal(val_split(labels, size=100, seed=1)[1], va)
    with pytest.raises(DataError, match="too few"):
        val_split(np.zeros(5, dtype=np.uint8))


def test_augmentation_is_seeded_per_sample_and_leaves_global_rng_alone(tmp_path):
    write_set(tmp_path)
    kw = dict(img_size=28, in_chans=1, mean=0.5, std=0.5)
    b = load_data(f"fashion-mnist:{tmp_path}", augment=True, seed=3, **kw)
    plain = load_data(f"fashion-mnist:{tmp_path}", augment=False, **kw)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    b.set_epoch(0)
    first = [b.train[i][0] for i in range(40)]
    again = [b.train[i][0] for i in range(40)]
    b.set_epoch(1)
    other = [b.train[i][0] for i in range(40)]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert 8 <= sum(not torch.equal(p, q) for p, q in zip(first, other)) <= 32  # a fresh coin per epoch
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    # the default augmentation is a horizontal mirror, about half of the time
    mirrored = [torch.equal(p, plain.train[i][0].flip(-1)) for i, p in enumerate(first)]
    assert all(m or torch.equal(p, plain.train[i][0]) for i, (p, m) in enumerate(zip(first, mirrored)))
    assert 8 <= sum(mirrored) <= 32
    assert torch.equal(b.test[0][0], plain.test[0][0]) and torch.equal(b.val[0][0], plain.val[0][0])
    # with crop padding: shifted copies (zero fill), still a pure function of (seed, epoch, index)
    images = plain.train.images.numpy()[:20]
    crop = fashion.FashionDataset(images, np.zeros(20), (28, 28), 1, (0.0,), (1.0,), augment=True, seed=1, pad=2)
    shifted = [crop[i][0] for i in range(20)]
    assert all(torch.equal(x, crop[i][0]) for i, x in enumerate(shifted))
    same = [torch.equal(x[0] * 255, torch.from_numpy(images[i]).float()) for i, x in enumerate(shifted)]
    assert sum(same) <= 3  # 1 in 50 draws is the identity


@needs_real
def test_real_files_counts_split_and_statistics():
    tr_x, tr_y, te_x, te_y = read_fashion(find_files())
    assert tr_x.shape == (60_000, 28, 28) and te_x.shape == (10_000, 28, 28)
    assert np.bincount(te_y).tolist() == [1000] * 10
    tr, va = val_split(tr_y)
    assert len(va) == 5000 and len(tr) == 55_000 and not np.intersect1d(tr, va).size
    assert np.bincount(tr_y[va]).tolist() == [500] * 10
    assert hashlib.sha256(va.astype("<i8").tobytes()).hexdigest().startswith(VAL_SHA256_PREFIX)
    pixels = tr_x[tr].astype(np.float64) / 255
    assert abs(pixels.mean() - fashion.MEAN[0]) < 1e-4 and abs(pixels.std() - fashion.STD[0]) < 1e-4


# ----------------------------------------------------------------------------- fashion-vit


def test_fashion_vit_recipe_round_trip(tmp_path):
    from safetensors.torch import save_file

    from vitslim_core import count_cost
    from vitslim_core.spec import arch_spec

    torch.manual_seed(0)
    model, recipe = build_model(FASHION_MODEL)
    spec = arch_spec(model)
    assert spec.grid == (7, 7) and spec.num_prefix_tokens == 1 and spec.depth == FASHION_ARCH["depth"]
    assert spec.in_chans == 1 and spec.num_classes == 10
    assert recipe["kwargs"] == {**FASHION_ARCH, "img_size": 28, "patch_size": 4}
    again = rebuild_model(json.loads(json.dumps(recipe)))
    assert arch_spec(again).to_dict() == spec.to_dict()
    cfg = data_config(model)
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == fashion.MEAN and cfg["std"] == fashion.STD
    assert count_cost(model).params == sum(p.numel() for p in model.parameters())
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, _ = build_model(FASHION_MODEL, checkpoint=path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_fashion_vit_recipe_learns(tmp_path):
    from vitslim_core.train import param_groups

    write_set(tmp_path)
    b = load_data(f"fashion-mnist:{tmp_path}", img_size=28, in_chans=1, mean=fashion.MEAN, std=fashion.STD,
                  augment=True)
    torch.manual_seed(0)
    model, _ = build_model(FASHION_MODEL)
    opt = torch.optim.AdamW(param_groups(model, FASHION_TRAIN["weight_decay"], FASHION_TRAIN["lr"], None))
    batch = FASHION_TRAIN["batch_size"] // 2
    model.train()
    losses = []
    for step in range(16):
        idx = [(step * batch + i) % len(b.train) for i in range(batch)]
        x = torch.stack([b.train[i][0] for i in idx])
        y = torch.tensor([b.train[i][1] for i in idx])
        loss = F.cross_entropy(model(x), y, label_smoothing=FASHION_TRAIN["label_smoothing"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), FASHION_TRAIN["clip_grad"])
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_search_and_retrain_evaluate_on_val(tmp_path):
    from vitslim_core.retrain import retrain
    from vitslim_core.search import SearchConfig, num_classes_of, search

    assert num_classes_of("fashion-mnist") == 10 and num_classes_of(f"fashion-mnist:{tmp_path}") == 10
    write_set(tmp_path / "data")
    spec = f"fashion-mnist:{tmp_path / 'data'}"
    res = search(SearchConfig(model=FASHION_MODEL, data=spec, out=str(tmp_path / "run"), batch_size=32, epochs=1,
                              max_steps=2, log_every=1, device="cpu"))
    ev = res.history["eval"][-1]
    assert ev["split"] == "val" and ev["n"] == 20
    assert res.scores.meta["data"]["name"] == spec and res.scores.class_names == list(CLASS_NAMES)
    rt = retrain(run=str(tmp_path / "run"), out=str(tmp_path / "rt"), flops=0.6, epochs=1, max_steps=2,
                 batch_size=32, device="cpu", distill="none")
    assert rt.history["eval"][-1]["split"] == "val" and rt.history["eval"][-1]["n"] == 20


# ----------------------------------------------------------------------------- the bundled run


def test_bundled_fashion_run_loads_with_its_samples():
    from vitslim_core import MaskScores
    from vitslim_core.demo import ASSETS, FASHION_DIR, SAMPLES_FILE
    from vitslim_core.run_folder import load_run

    if not (FASHION_DIR / "scores.safetensors").is_file():
        pytest.skip("the Fashion-MNIST run is not bundled yet (vitslim demo --data fashion-mnist builds it)")
    scores = MaskScores.load(FASHION_DIR)
    assert scores.meta["data"]["name"] == "fashion-mnist" and scores.class_names == list(CLASS_NAMES)
    assert scores.model_recipe["name"] == FASHION_MODEL
    _, model = load_run(FASHION_DIR)
    demo = json.loads((FASHION_DIR / "demo.json").read_text())
    assert demo["dense_test"]["top1"] >= 88.0 and demo["dense_test"]["n"] == 10_000
    rows = json.loads((FASHION_DIR / "sweep.json").read_text())["rows"]
    assert len(rows) >= 5 and all(r["top1"] > 10 for r in rows)
    images, labels, indices = fashion.load_samples(FASHION_DIR / SAMPLES_FILE)
    assert images.shape == (100, 28, 28) and np.bincount(labels).tolist() == [10] * 10
    assert len(set(indices.tolist())) == 100
    x, y = fashion.sample_inputs(FASHION_DIR / SAMPLES_FILE, scores.meta["data"])
    with torch.no_grad():
        acc = float((model(x).argmax(1) == torch.tensor(y)).float().mean())
    assert acc >= 0.75  # the searched model, masked at its soft scores, on clothing
    if HAVE_REAL:
        _, _, te_x, te_y = read_fashion(find_files())
        assert np.array_equal(images, te_x[indices]) and np.array_equal(labels, te_y[indices])
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size < 10_000_000, f"the bundled assets are {size:,} bytes"


def test_sample_file_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DataError, match="does not exist"):
        fashion.load_samples(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 30)
    with pytest.raises(DataError, match="cannot read sample file") as err:
        fashion.load_samples(tmp_path / "junk.safetensors")
    one_line(err)
    save_file({"images": torch.zeros(2, 28, 28, dtype=torch.uint8)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DataError, match="not a vitslim sample file"):
        fashion.load_samples(tmp_path / "foreign.safetensors")
    fashion.save_samples(tmp_path / "s.safetensors", np.zeros((3, 28, 28)), np.array([0, 1, 9]), np.arange(3))
    images, labels, _ = fashion.load_samples(tmp_path / "s.safetensors")
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 1, 9]


def test_user_images_are_preprocessed_like_the_data(tmp_path):
    import io

    from PIL import Image

    from vitslim_core.data import image_to_tensor

    cfg = {"input_size": (1, 28, 28), "mean": fashion.MEAN, "std": fashion.STD, "interpolation": "bilinear",
           "crop_pct": 1.0}
    garment = np.zeros((28, 28), dtype=np.uint8)  # like the data: a bright object on black
    garment[3:25, 6:22] = np.random.default_rng(2).integers(60, 256, size=(22, 16))
    ds = fashion.FashionDataset(garment[None], np.array([3]), (28, 28), 1, fashion.MEAN, fashion.STD)
    buf = io.BytesIO()
    Image.fromarray(garment).save(buf, format="PNG")
    png = Image.open(io.BytesIO(buf.getvalue()))
    for dataset in ("fashion-mnist", None):  # None: recognised by the statistics
        assert torch.equal(image_to_tensor(png, cfg, dataset=dataset)[0], ds[0][0])
    # a dark garment photographed on white paper, wider than high: inverted, fitted, aspect kept
    photo = np.full((60, 120), 255, dtype=np.uint8)
    photo[10:50, 30:90] = 40
    x = image_to_tensor(Image.fromarray(photo).convert("RGB"), cfg, dataset="fashion-mnist:/any/path")[0, 0]
    pixels = x * fashion.STD[0] + fashion.MEAN[0]
    assert x.shape == (28, 28)
    assert torch.allclose(pixels[:7], torch.zeros(7, 28), atol=1e-6)  # black bars above and below
    assert pixels[14, 14] > 0.8 and pixels[9, 2] < 0.05  # the garment is bright, the paper black
