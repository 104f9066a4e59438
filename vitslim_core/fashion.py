"""Fashion-MNIST: our own IDX reader, where the files are found, the fixed validation split.

The four IDX files (gzip or plain) are read with numpy, never through torchvision's pickled caches.
Without a path they are looked for in Debian's ``dataset-fashion-mnist`` folder, then in
torchvision's ``DATA_ROOT/FashionMNIST/raw`` layout; torchvision downloads them there only when
the caller allows it. 5,000 training images (500 per class, a fixed seed) are held out as the
validation split for model selection; the official 10,000 test images are kept for the numbers
we publish.
"""
from __future__ import annotations

import gzip
import socket
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
SIDE = 28
TRAIN_COUNT, TEST_COUNT = 60_000, 10_000
VAL_SIZE = 5_000  # of the 60,000 training images, stratified (500 per class); 1/12 of other counts
SPLIT_SEED = 0
# Pixel statistics (in [0, 1]) of the 55,000 training images left after the validation split.
MEAN = (0.2860,)
STD = (0.3530,)
# Training augmentation: a coin-flip horizontal mirror; a random crop of the image zero-padded by
# CROP_PAD pixels is available but off: fashion-vit's 10-epoch pretraining lost 2 points of top-1 with
# a 2-pixel crop + flip, and about 0.3 with the flip alone (see models.FASHION_TRAIN).
CROP_PAD = 0
HOW_TO_GET = ("install it with `apt-get install dataset-fashion-mnist` or let torchvision download it "
              "(download=True; `--download` on the command line)")

_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 dims / 1 dim
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_BYTES = 1 << 31  # far above the 47 MB of the training images: a header claiming more is damage
_DOWNLOAD_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path, kind: str) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed or plain, told apart by content).

    Args:
        path: the file.
        kind: ``"images"`` (magic 0x803, dims N x rows x cols) or ``"labels"`` (magic 0x801, dims N).

    Returns:
        A uint8 array of shape (N, rows, cols) or (N,).

    Raises:
        DataError: missing or unreadable file, wrong magic number, truncated or oversized data.
    """
    if kind not in ("images", "labels"):
        raise ValueError(f"kind must be 'images' or 'labels', not {kind!r}")
    path = Path(path)
    magic, ndim = (_IMAGES_MAGIC, 3) if kind == "images" else (_LABELS_MAGIC, 1)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        with open(path, "rb") as raw:
            packed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if packed else raw
            head = _read_exactly(stream, 4 + 4 * ndim)
            found = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
            if found != magic:
                what = "an empty file" if not head else (f"magic number 0x{found:08x}" if found is not None
                                                         else "a few bytes")
                raise DataError(f"{path} is not an IDX {kind} file ({what}; expected magic number 0x{magic:08x})")
            if len(head) < 4 + 4 * ndim:
                raise DataError(f"{path} is truncated: its header is incomplete")
            dims = tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
            need = int(np.prod(dims, dtype=np.int64))
            if need > _MAX_BYTES:
                raise DataError(f"{path} claims {' x '.join(map(str, dims))} values, far more than Fashion-MNIST has")
            body = _read_exactly(stream, need + 1)  # one byte more: trailing data is damage too
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {_damage(err)}") from None
    if len(body) < need:
        raise DataError(f"{path} is truncated: {len(body):,} of the {need:,} bytes its header announces")
    if len(body) > need:
        raise DataError(f"{path} has data after the {need:,} bytes its header announces")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_exactly(stream, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the file), read in chunks (no up-front allocation)."""
    parts, left = [], n
    while left > 0:
        chunk = stream.read(min(left, 1 << 24))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _damage(err: BaseException) -> str:
    if isinstance(err, EOFError):
        return "the gzip data is truncated"
    if isinstance(err, zlib.error) or type(err).__name__ == "BadGzipFile":
        return "the gzip data is damaged"
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------- finding the files


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):  # torchvision keeps both; the plain one reads faster
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> dict[str, Path] | None:
    found = {key: _file_in(folder, stem) for key, stem in FILES.items()}
    return None if any(p is None for p in found.values()) else found  # type: ignore[return-value]


def _missing_message(folders: Sequence[Path], where: str) -> str:
    for folder in folders:  # a folder holding some of the files: name the ones it lacks
        found = {key: _file_in(folder, stem) for key, stem in FILES.items()}
        if any(found.values()):
            lacking = ", ".join(f"{FILES[k]}[.gz]" for k, p in found.items() if p is None)
            return f"{folder} has only part of Fashion-MNIST (missing {lacking}); {HOW_TO_GET}"
    return f"Fashion-MNIST is not in {where}; {HOW_TO_GET}"


def find_files(path: str | Path | None = None, data_root: str | Path = "data",
               download: bool = False) -> dict[str, Path]:
    """Locate the four IDX files.

    Args:
        path: a folder holding the four files, or a torchvision root (``PATH/FashionMNIST/raw``).
            None looks in Debian's folder, then under ``data_root``.
        data_root: torchvision's root folder, used when ``path`` is None.
        download: with ``path`` None, download through torchvision into ``data_root`` when the files
            are nowhere (needs internet).

    Returns:
        ``{"train_images": Path, "train_labels": ..., "test_images": ..., "test_labels": ...}``.

    Raises:
        DataError: the files are missing (with how to get them) or the download failed.
    """
    if path is not None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST folder {root} does not exist")
        folders = [root, root / TORCHVISION_SUBDIR, root / "raw"]
        where = str(root)
    else:
        root = Path(data_root).expanduser()
        folders = [DEBIAN_DIR, root / TORCHVISION_SUBDIR]
        where = f"{DEBIAN_DIR} or {root / TORCHVISION_SUBDIR}"
    for folder in folders:
        found = _complete(folder)
        if found is not None:
            return found
    if path is None and download:
        _download(root)
        found = _complete(root / TORCHVISION_SUBDIR)
        if found is not None:
            return found
        raise DataError(f"torchvision's download left no complete Fashion-MNIST in {root / TORCHVISION_SUBDIR}")
    raise DataError(_missing_message(folders, where))


def _download(root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    old_timeout = socket.getdefaulttimeout()
    try:
        root.mkdir(parents=True, exist_ok=True)
        # torchvision opens URLs without a timeout; a bounded wait keeps offline machines from hanging
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        FashionMNIST(str(root), train=False, download=True)  # fetches and unpacks all four files
    except Exception as err:  # noqa: BLE001 - URLError, OSError, RuntimeError...
        text = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise DataError(f"downloading Fashion-MNIST into {root} failed ({text}); "
                        f"install it with `apt-get install dataset-fashion-mnist` instead") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


# ----------------------------------------------------------------------------- arrays and split


def read_fashion(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check the four files: ``(train_images, train_labels, test_images, test_labels)``.

    Raises:
        DataError: unreadable files, counts of images and labels that disagree, images that are not
            28x28, labels outside 0..9.
    """
    arrays = {key: read_idx(p, "images" if key.endswith("images") else "labels") for key, p in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (SIDE, SIDE):
            raise DataError(f"{files[f'{split}_images']} holds {images.shape[1]}x{images.shape[2]} images; "
                            f"Fashion-MNIST images are {SIDE}x{SIDE}")
        if len(images) != len(labels):
            raise DataError(f"the {split} files disagree: {len(images):,} images in {files[f'{split}_images'].name} "
                            f"but {len(labels):,} labels in {files[f'{split}_labels'].name}")
        if len(images) == 0:
            raise DataError(f"{files[f'{split}_images']} holds no images")
        if labels.max() >= len(CLASS_NAMES):
            raise DataError(f"{files[f'{split}_labels']} has label {int(labels.max())}; "
                            f"Fashion-MNIST labels are 0..{len(CLASS_NAMES) - 1}")
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def val_split(labels: np.ndarray, size: int | None = None, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified validation split of the training labels: ``(train_idx, val_idx)``, sorted.

    Args:
        labels: the training labels.
        size: validation images; default ``VAL_SIZE`` for the 60,000 official training images
            (the same fraction, rounded, of any other count).
        seed: the split's seed.

    Each class gives its share of ``size`` (largest remainders round), drawn with NumPy's legacy
    ``RandomState``, whose streams never change between versions: the same split on every machine.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if size is None:
        size = int(round(n * VAL_SIZE / TRAIN_COUNT))
    if not 0 < size < n:
        raise DataError(f"{n} training images are too few to hold out a validation split "
                        f"(Fashion-MNIST has {TRAIN_COUNT:,})")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / n
    take = np.floor(exact).astype(np.int64)
    short = size - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    rng = np.random.RandomState(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


# ----------------------------------------------------------------------------- dataset


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop of one (C, H, W) image zero-padded by ``pad`` pixels, then a coin-flip mirror."""
    draws = torch.randint(0, 2 * pad + 1, (2,), generator=gen) if pad else torch.zeros(2, dtype=torch.int64)
    flip = bool(torch.randint(0, 2, (1,), generator=gen))
    if pad:
        h, w = x.shape[-2:]
        top, left = int(draws[0]), int(draws[1])
        x = F.pad(x, (pad, pad, pad, pad))[..., top:top + h, left:left + w]
    return x.flip(-1) if flip else x


class FashionDataset(Dataset):
    """One split of Fashion-MNIST kept in memory as uint8; normalised (and augmented) per item.

    Args:
        images: (N, 28, 28) uint8 images.
        labels: (N,) labels.
        img_size: output (H, W) (bilinear resize when it is not 28x28).
        in_chans: channels (the gray image is repeated).
        mean: per-channel mean.
        std: per-channel std.
        augment: horizontal flip per item (training), plus a random crop when ``pad`` > 0.
        seed: augmentation seed.
        pad: crop padding in pixels of the 28x28 image (0: no crop).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, img_size: tuple[int, int], in_chans: int,
                 mean: tuple[float, ...], std: tuple[float, ...], augment: bool = False, seed: int = 0,
                 pad: int = CROP_PAD) -> None:
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8))  # (N, 28, 28), a writable copy
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.targets = [int(v) for v in self.labels]
        self.img_size, self.in_chans, self.pad = tuple(img_size), in_chans, int(pad)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> torch.Tensor:
        """Item ``index`` as the model sees it before normalisation: (1, H, W) float in [0, 1]."""
        from .data import _generator, sample_seed

        x = self.images[index][None].float().div_(255.0)
        if self.augment:
            x = random_crop_flip(x, _generator(sample_seed(self.seed, self.epoch, index)), self.pad)
        if x.shape[-2:] != self.img_size:
            x = F.interpolate(x[None], size=self.img_size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.image(index).expand(self.in_chans, -1, -1)
        return ((x - self.mean) / self.std).contiguous(), self.targets[index]


def load_bundle(path: str | None, img_size: tuple[int, int], in_chans: int, mean: tuple[float, ...],
                std: tuple[float, ...], augment: bool, seed: int, spec: str, data_root: str | Path = "data",
                download: bool = False):
    """The Fashion-MNIST ``DatasetBundle``: train (55,000), val (5,000), test (the official 10,000).

    ``path`` is the part of the spec after ``fashion-mnist:`` (None to search the usual places).
    """
    from .data import DatasetBundle

    tr_x, tr_y, te_x, te_y = read_fashion(find_files(path, data_root, download))
    train_idx, val_idx = val_split(tr_y)
    args = (img_size, in_chans, mean, std)
    train = FashionDataset(tr_x[train_idx], tr_y[train_idx], *args, augment=augment, seed=seed)
    val = FashionDataset(tr_x[val_idx], tr_y[val_idx], *args)
    test = FashionDataset(te_x, te_y, *args)
    return DatasetBundle(train, test, len(CLASS_NAMES), list(CLASS_NAMES), "fashion-mnist", spec,
                         (in_chans, *img_size), mean, std, val=val)


# ----------------------------------------------------------------------------- bundled samples

SAMPLES_FORMAT = "vitslim-samples"


def pick_samples(labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, class by class (a fixed choice)."""
    labels = np.asarray(labels)
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))]
    if any(len(p) < per_class for p in picked):
        raise DataError(f"some class has fewer than {per_class} images")
    return np.concatenate(picked)


def save_samples(path: str | Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """Write sample images as one safetensors file: uint8 ``images`` (N, 28, 28), int64 ``labels``
    and ``indices`` (positions in the official test set), atomically."""
    import json

    from safetensors.torch import save_file

    from .io import atomic_save

    tensors = {"images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
               "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
               "indices": torch.from_numpy(np.asarray(indices, dtype=np.int64))}
    meta = {"format": SAMPLES_FORMAT, "dataset": "fashion-mnist", "split": "test",
            "class_names": json.dumps(list(CLASS_NAMES))}
    atomic_save(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a sample file written by ``save_samples``: ``(images uint8 (N, 28, 28), labels, indices)``.

    Raises:
        DataError: a missing, damaged or foreign file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"sample file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types on damaged files
        raise DataError(f"cannot read sample file {path}: {(str(err).strip() or type(err).__name__).splitlines()[0]}") \
            from None
    if meta.get("format") != SAMPLES_FORMAT or set(tensors) != {"images", "labels", "indices"}:
        raise DataError(f"{path} is not a vitslim sample file")
    images, labels, indices = tensors["images"], tensors["labels"], tensors["indices"]
    n = images.shape[0] if images.ndim == 3 else -1
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (SIDE, SIDE) or labels.shape != (n,) \
            or indices.shape != (n,) or labels.dtype != torch.int64 or indices.dtype != torch.int64:
        raise DataError(f"{path} holds tensors of unexpected shapes or types")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= len(CLASS_NAMES)):
        raise DataError(f"{path} has labels outside 0..{len(CLASS_NAMES) - 1}")
    return images.numpy(), labels.numpy(), indices.numpy()


def sample_inputs(path: str | Path, data_cfg: dict) -> tuple[torch.Tensor, list[int]]:
    """The sample images as a model input batch (N, C, H, W), preprocessed like the test split.

    Args:
        path: a sample file (``vitslim_core/assets/fashion/samples.safetensors``).
        data_cfg: ``input_size``, ``mean`` and ``std`` of the model (a run's ``scores.meta["data"]``).
    """
    from .data import _channel_stats

    images, labels, _ = load_samples(path)
    c, h, w = (int(v) for v in data_cfg["input_size"])
    ds = FashionDataset(images, labels, (h, w), c, _channel_stats(data_cfg["mean"], c, "mean"),
                        _channel_stats(data_cfg["std"], c, "std"))
    return torch.stack([ds[i][0] for i in range(len(ds))]), [int(v) for v in labels]
