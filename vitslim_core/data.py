"""Datasets for search, retraining and the app: bundled digits, Fashion-MNIST, ImageFolder, CIFAR, synthetic.

Every dataset yields ``(image, label)`` with ``image`` a normalised float32 (C, H, W) tensor.
Training augmentation never touches the global random generators: each sample draws its
randomness from a generator seeded by ``(seed, epoch, index)``, so a resumed run sees exactly
the images the interrupted one would have seen. Call ``set_epoch`` on a training set (or on the
bundle) before each epoch, before the DataLoader iterator is made (workers copy the dataset when
they start, so ``persistent_workers=True`` would keep them on their first epoch).
"""
from __future__ import annotations

import io
import math
import numbers
import random
import socket
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DataError

SPEC_FORMS = ("digits, synthetic, synthetic:N, fashion-mnist, fashion-mnist:PATH, imagefolder:PATH, cifar10:PATH, "
              "cifar100:PATH")

DIGITS_NATIVE = 8  # scikit-learn digits are 8x8 block counts in 0..16
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# Pixel statistics of the digits training split at 16x16 (bilinear from 8x8, scaled to [0, 1]).
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3190,)

SYNTHETIC_CLASSES = 10
SYNTHETIC_DEFAULT_N = 256
MAX_SYNTHETIC = 1_000_000  # images per split: more is a typo (2e9 would try to allocate 16 GB of labels)

_DOWNLOAD_TIMEOUT_S = 30.0
MAX_SIDE = 16384  # pixels per side of a model input
MAX_CHANNELS = 64
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
# Formats ``load_image`` opens: photo and drawing formats (JPEG includes multi-picture MPO). Others are
# refused by name: EPS/PS run Ghostscript, the rest are rarely used parsers nobody needs here.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "AVIF", "JPEG2000", "PPM", "ICO", "ICNS", "TGA",
                 "QOI", "PCX", "SGI")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (same inputs, same seed, any process)."""
    entropy = [int(v) % 2**64 for v in (seed, epoch, index)]
    a, b = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class DatasetBundle:
    """A train/test pair (and maybe a validation split) plus what a model and the app need to know.

    Args:
        train: training split; has ``set_epoch(epoch)`` for reproducible augmentation.
        test: held-out split (never augmented): the numbers to publish.
        num_classes: number of labels.
        class_names: a readable name per label index.
        name: short dataset name ("digits", "synthetic", "cifar10", folder name...).
        spec: the spec string it was loaded from.
        input_size: (C, H, W) of every image tensor.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        val: a validation split carved from the training data for model selection (per-epoch
            evaluation), or None where the dataset has none (then ``test`` is used).
    """

    train: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    name: str
    spec: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: Dataset | None = None

    @property
    def selection(self) -> tuple[Dataset, str]:
        """The split to evaluate on during training and its name: ``val`` when there is one, else ``test``."""
        return (self.val, "val") if self.val is not None else (self.test, "test")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` for the training split."""
        set_epoch = getattr(self.train, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)


# ----------------------------------------------------------------------------- argument checks


def _size_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, (int, np.integer)) and not isinstance(img_size, bool):
        hw = (int(img_size), int(img_size))
    elif isinstance(img_size, (tuple, list)) and len(img_size) in (2, 3):
        hw = (int(img_size[-2]), int(img_size[-1]))
    else:
        raise DataError(f"img_size must be an int or (H, W), got {img_size!r}")
    if min(hw) < 1:
        raise DataError(f"img_size must be positive, got {img_size!r}")
    return hw


def _channel_stats(values: float | Sequence[float], in_chans: int, what: str) -> tuple[float, ...]:
    vals = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * in_chans
    if len(vals) != in_chans:
        raise DataError(f"{what} has {len(vals)} values but the images have {in_chans} channels")
    if what == "std" and min(vals) <= 0:
        raise DataError(f"std values must be positive, got {vals}")
    return vals


def _check_chans(in_chans: int) -> int:
    if isinstance(in_chans, bool) or not isinstance(in_chans, (int, np.integer)) or in_chans < 1:
        raise DataError(f"in_chans must be a positive int, got {in_chans!r}")
    return int(in_chans)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------- digits


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed stratified split of scikit-learn's digits.

    Returns:
        ``(x_train, x_test, y_train, y_test)``; images are (N, 8, 8) float32 in [0, 1], labels int64.
        Always the same 1437/360 split (20% test, stratified, random_state 0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=DIGITS_TEST_FRACTION, stratify=y,
                                  random_state=DIGITS_SPLIT_SEED))  # type: ignore[return-value]


def upscale_digits(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize (N, 1, 8, 8) digit images in [0, 1] to (N, 1, H, W) the way the datasets do (bilinear)."""
    if tuple(images.shape[-2:]) == hw:
        return images.clone()
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def random_affine(x: torch.Tensor, gen: torch.Generator, *, degrees: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.1,
                  shear: float = 0.1) -> torch.Tensor:
    """Random rotation/scale/shear/shift of one (C, H, W) image, zero fill, randomness from ``gen``.

    Args:
        x: image with a black (0) background.
        gen: the per-sample generator.
        degrees: rotation range +-degrees.
        scale: zoom range.
        translate: shift range as a fraction of the image side (+-).
        shear: shear range (+-, unitless).
    """
    u = torch.rand(5, generator=gen, dtype=torch.float64) * 2 - 1  # five draws in [-1, 1)
    angle = math.radians(degrees) * float(u[0])
    zoom = scale[0] + (scale[1] - scale[0]) * (float(u[1]) + 1) / 2
    sh = shear * float(u[2])
    # affine_grid maps output coordinates to input ones, so this matrix is the inverse warp; the
    # ranges are symmetric, so sampling the inverse directly gives the same distribution.
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[c, -s + sh, 2 * translate * float(u[3])],
                          [s, c, 2 * translate * float(u[4])]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


class DigitsDataset(Dataset):
    """One split of the digits, stored upscaled in [0, 1]; normalised (and augmented) per item.

    Args:
        images: (N, 8, 8) float images in [0, 1].
        labels: (N,) int labels.
        img_size: output (H, W).
        in_chans: channels (the gray image is repeated).
        mean: per-channel mean.
        std: per-channel std.
        augment: random affine per item (training).
        seed: augmentation seed.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, img_size: tuple[int, int], in_chans: int,
                 mean: tuple[float, ...], std: tuple[float, ...], augment: bool = False, seed: int = 0) -> None:
        base = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
        self.images = upscale_digits(base, img_size)  # (N, 1, H, W) in [0, 1]
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.targets = [int(v) for v in self.labels]
        self.in_chans, self.mean, self.std = in_chans, mean, std
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.augment:
            x = random_affine(x, _generator(sample_seed(self.seed, self.epoch, index)))
        x = _normalise(x.expand(self.in_chans, -1, -1), self.mean, self.std)
        return x.contiguous(), self.targets[index]


def _load_digits(img_size: tuple[int, int], in_chans: int, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: bool, seed: int, spec: str) -> DatasetBundle:
    x_tr, x_te, y_tr, y_te = digits_split()
    train = DigitsDataset(x_tr, y_tr, img_size, in_chans, mean, std, augment=augment, seed=seed)
    test = DigitsDataset(x_te, y_te, img_size, in_chans, mean, std, augment=False, seed=seed)
    return DatasetBundle(train, test, 10, [str(i) for i in range(10)], "digits", spec,
                         (in_chans, *img_size), mean, std)


# ----------------------------------------------------------------------------- synthetic


class SyntheticDataset(Dataset):
    """Learnable random images: a fixed low-resolution pattern per class plus per-image noise.

    Every image is a pure function of ``(seed, split, index)`` (and of the epoch when augmented),
    so nothing is stored beyond the class patterns.

    Args:
        n: number of images.
        prototypes: (classes, C, H, W) class patterns in [0, 1].
        split: 0 for train, 1 for test (separates the noise streams).
        mean: per-channel mean.
        std: per-channel std.
        augment: add fresh per-epoch noise.
        seed: data seed.
    """

    NOISE = 0.25

    def __init__(self, n: int, prototypes: torch.Tensor, split: int, mean: tuple[float, ...],
                 std: tuple[float, ...], augment: bool = False, seed: int = 0) -> None:
        self.prototypes, self.split, self.mean, self.std = prototypes, split, mean, std
        self.augment, self.seed, self.epoch = augment, seed, 0
        gen = _generator(sample_seed(seed, -1 - split, 0))
        classes = prototypes.shape[0]
        # balanced labels in a shuffled order
        self.targets = [int(v) for v in (torch.randperm(n, generator=gen) % classes)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        proto = self.prototypes[label]
        gen = _generator(sample_seed(self.seed, 1_000_003 * (self.split + 1), index))
        x = proto + self.NOISE * torch.randn(proto.shape, generator=gen)
        if self.augment:
            aug = _generator(sample_seed(self.seed, self.epoch, index))
            x = x + 0.5 * self.NOISE * torch.randn(proto.shape, generator=aug)
        return _normalise(x.clamp(0.0, 1.0), self.mean, self.std), label


def _load_synthetic(n: int, img_size: tuple[int, int], in_chans: int, mean: tuple[float, ...],
                    std: tuple[float, ...], augment: bool, seed: int, spec: str) -> DatasetBundle:
    gen = _generator(sample_seed(seed, -100, 0))
    coarse = torch.rand(SYNTHETIC_CLASSES, in_chans, 4, 4, generator=gen)
    protos = F.interpolate(coarse, size=img_size, mode="nearest")  # blocky: patch tokens see it
    train = SyntheticDataset(n, protos, 0, mean, std, augment=augment, seed=seed)
    test = SyntheticDataset(n, protos, 1, mean, std, augment=False, seed=seed)
    names = [f"class{i}" for i in range(SYNTHETIC_CLASSES)]
    return DatasetBundle(train, test, SYNTHETIC_CLASSES, names, "synthetic", spec,
                         (in_chans, *img_size), mean, std)


# ----------------------------------------------------------------------------- torchvision sets


class SeededDataset(Dataset):
    """Wraps a dataset whose transform uses the global RNGs (torchvision/timm) to make it reproducible.

    Around each ``base[index]`` the torch, Python and NumPy global generators are seeded from
    ``(seed, epoch, index)`` and restored afterwards, so the caller's random state is untouched.

    Args:
        base: the dataset with random transforms.
        seed: augmentation seed.
    """

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base, self.seed, self.epoch = base, int(seed), 0

    @property
    def targets(self) -> list[int]:
        return list(getattr(self.base, "targets"))

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.base, "classes"))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        s = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2**32)
                return self.base[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ConvertChannels:
    """PIL image -> 'L' (one channel) or 'RGB' (otherwise), handling alpha, palettes and 16-bit.

    Picklable, so DataLoader workers can use it.
    """

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_standard_mode(img, gray=self.in_chans == 1)


class RepeatChannels:
    """Repeat a one-channel tensor to ``in_chans`` channels (for models with unusual channel counts)."""

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[0] == self.in_chans else x[:1].expand(self.in_chans, -1, -1).contiguous()


def _timm_transform(input_size: tuple[int, int, int], is_training: bool, interpolation: str,
                    mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float) -> Callable:
    """timm's train or eval transform, preceded by the channel conversion our images need."""
    from timm.data import create_transform
    from torchvision import transforms

    c = input_size[0]
    # timm's transforms work on 1- or 3-channel PIL images; other counts repeat a gray channel
    work = c if c in (1, 3) else 1
    tf = create_transform(input_size=(work, *input_size[1:]), is_training=is_training,
                          interpolation=interpolation, mean=mean[:work], std=std[:work], crop_pct=crop_pct)
    steps: list[Callable] = [ConvertChannels(work), tf]
    if work != c:
        steps.append(RepeatChannels(c))
    return transforms.Compose(steps)


def _image_loader(path: str) -> Image.Image:
    """ImageFolder loader: our guarded reader (channel conversion happens in the transform)."""
    return load_image(path)


def _load_imagefolder(root: Path, input_size: tuple[int, int, int], mean: tuple[float, ...],
                      std: tuple[float, ...], interpolation: str, crop_pct: float, augment: bool, seed: int,
                      spec: str) -> DatasetBundle:
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = root / "train", root / "val"
    if not (train_dir.is_dir() and val_dir.is_dir()):
        raise DataError(f"{root} has no train/ and val/ folders (expected PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg)")
    train_tf = _timm_transform(input_size, augment, interpolation, mean, std, crop_pct)
    eval_tf = _timm_transform(input_size, False, interpolation, mean, std, crop_pct)
    try:
        train = ImageFolder(str(train_dir), transform=train_tf, loader=_image_loader)
        test = ImageFolder(str(val_dir), transform=eval_tf, loader=_image_loader)
    except (FileNotFoundError, PermissionError) as err:
        raise DataError(f"cannot use image folder {root}: {_first_line(err)}") from None
    classes = list(train.classes)
    extra = sorted(set(test.classes) - set(classes))
    if extra:
        raise DataError(f"{val_dir} has classes that train/ lacks: {', '.join(extra[:5])}")
    # index val by the train classes, so a class missing from val/ does not shift the labels
    remap = {test.class_to_idx[c]: train.class_to_idx[c] for c in test.classes}
    test.samples = test.imgs = [(p, remap[t]) for p, t in test.samples]
    test.targets = [t for _, t in test.samples]
    test.classes, test.class_to_idx = classes, dict(train.class_to_idx)
    return DatasetBundle(SeededDataset(train, seed), test, len(classes), classes, root.name or str(root),
                         spec, input_size, mean, std)


def _load_cifar(which: str, root: Path, input_size: tuple[int, int, int], mean: tuple[float, ...],
                std: tuple[float, ...], interpolation: str, crop_pct: float, augment: bool, seed: int,
                spec: str, download: bool = True) -> DatasetBundle:
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    train_tf = _timm_transform(input_size, augment, interpolation, mean, std, crop_pct)
    eval_tf = _timm_transform(input_size, False, interpolation, mean, std, crop_pct)
    label = "CIFAR-10" if which == "cifar10" else "CIFAR-100"
    if not download:
        try:
            train = cls(str(root), train=True, transform=train_tf, download=False)
            test = cls(str(root), train=False, transform=eval_tf, download=False)
        except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError or OSError here
            raise DataError(f"{label} is not in {root}: copy the extracted dataset folder there, or pass "
                            f"--download to let torchvision fetch it ({_first_line(err)})") from None
        classes = list(train.classes)
        return DatasetBundle(SeededDataset(train, seed), test, len(classes), classes, which, spec,
                             input_size, mean, std)
    old_timeout = socket.getdefaulttimeout()
    try:
        root.mkdir(parents=True, exist_ok=True)
        # torchvision opens URLs without a timeout; a bounded wait keeps offline machines from hanging
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        train = cls(str(root), train=True, transform=train_tf, download=True)
        test = cls(str(root), train=False, transform=eval_tf, download=False)
    except Exception as err:  # download errors come as URLError, OSError, RuntimeError...
        raise DataError(f"{label} is not in {root} and downloading it failed ({_first_line(err)}); "
                        f"copy the extracted dataset folder there or go online") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    classes = list(train.classes)
    return DatasetBundle(SeededDataset(train, seed), test, len(classes), classes, which, spec,
                         input_size, mean, std)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------- entry point


def load_data(spec: str, *, img_size: int | tuple[int, int], in_chans: int,
              mean: float | Sequence[float], std: float | Sequence[float], interpolation: str = "bicubic",
              crop_pct: float = 0.875, augment: bool = True, seed: int = 0, data_root: str | Path = "data",
              download: bool = False) -> DatasetBundle:
    """Load a train/test pair by spec, preprocessed for a model.

    Args:
        spec: ``digits``, ``synthetic``, ``synthetic:N`` (N images per split), ``fashion-mnist``
            (found in Debian's folder or under ``data_root``), ``fashion-mnist:PATH`` (a folder with
            the four IDX files, or a torchvision root), ``imagefolder:PATH`` (PATH/train and PATH/val
            in ImageNet layout), ``cifar10:PATH`` or ``cifar100:PATH``.
        img_size: output side or (H, W).
        in_chans: output channels (gray images are repeated, colour images made gray for 1).
        mean: per-channel normalisation mean (one value is broadcast).
        std: per-channel normalisation std.
        interpolation: resize filter for ImageFolder/CIFAR (timm names).
        crop_pct: centre-crop fraction of the eval transform for ImageFolder/CIFAR.
        augment: random training augmentation (the test split is never augmented).
        seed: augmentation/data seed; with ``set_epoch`` it fixes every augmented image.
        data_root: torchvision's root folder for ``fashion-mnist`` without a path.
        download: torchvision sets (CIFAR, ``fashion-mnist`` into ``data_root``) may be downloaded when they
            are not on disk (False, the default: a missing data set is an error and nothing is created).

    Returns:
        The bundle; ``bundle.train.set_epoch(e)`` selects epoch ``e``'s augmentation.

    Raises:
        DataError: unknown spec, missing folders or files, unusable sizes.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset must be one of: {SPEC_FORMS}")
    in_chans = _check_chans(in_chans)
    hw = _size_hw(img_size)
    mean_t = _channel_stats(mean, in_chans, "mean")
    std_t = _channel_stats(std, in_chans, "std")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    input_size = (in_chans, *hw)
    if kind == "digits" and not arg:
        return _load_digits(hw, in_chans, mean_t, std_t, augment, seed, spec)
    if kind == "synthetic":
        n = SYNTHETIC_DEFAULT_N
        if arg:
            try:
                n = int(arg)
            except ValueError:
                n = 0
            if n < 1:
                raise DataError(f"synthetic:N needs a positive number of images, got {arg!r}")
            if n > MAX_SYNTHETIC:
                raise DataError(f"synthetic:N takes at most {MAX_SYNTHETIC:,} images, got {n:,}")
        return _load_synthetic(n, hw, in_chans, mean_t, std_t, augment, seed, spec)
    if kind == "fashion-mnist":
        from .fashion import load_bundle
        return load_bundle(arg or None, hw, in_chans, mean_t, std_t, augment, seed, spec, data_root, download)
    if kind in ("imagefolder", "cifar10", "cifar100"):
        if not arg:
            raise DataError(f"{kind} needs a folder: {kind}:PATH")
        root = Path(arg).expanduser()
        if kind == "imagefolder":
            if not root.is_dir():
                raise DataError(f"image folder {root} does not exist")
            return _load_imagefolder(root, input_size, mean_t, std_t, interpolation, crop_pct, augment, seed, spec)
        return _load_cifar(kind, root, input_size, mean_t, std_t, interpolation, crop_pct, augment, seed, spec,
                           download)
    raise DataError(f"unknown dataset {spec!r}; use one of: {SPEC_FORMS}")


# ----------------------------------------------------------------------------- single images


def load_for(data_cfg: dict, name: str | None = None, *, input_size: Sequence[int] | None = None,
             augment: bool = False, seed: int = 0, data_root: str | Path = "data",
             download: bool = False) -> DatasetBundle:
    """Load a dataset preprocessed as a model's data config says (``data_config(model)`` or a run's
    ``scores.meta["data"]``: input_size, mean, std, interpolation, crop_pct, name).

    Args:
        data_cfg: the config; missing mean/std fall back to 0.5.
        name: dataset spec overriding ``data_cfg["name"]``.
        input_size: (C, H, W) to use when the config has none.
        augment: training augmentation.
        seed: augmentation seed.
        data_root: torchvision's root folder (``fashion-mnist`` without a path).
        download: whether a torchvision set may be downloaded (and its folder created); only ever
            when the user asked for it (``--download``).
    """
    spec = name or data_cfg.get("name")
    if not spec:
        raise DataError("which dataset? the run does not name one (pass --data)")
    inp = data_cfg.get("input_size") or input_size
    if not inp:
        raise DataError("the data config has no input size")
    return load_data(spec, img_size=tuple(int(v) for v in inp[1:]), in_chans=int(inp[0]),
                     mean=data_cfg.get("mean", 0.5), std=data_cfg.get("std", 0.5),
                     interpolation=data_cfg.get("interpolation", "bicubic"), crop_pct=data_cfg.get("crop_pct", 0.875),
                     augment=augment, seed=seed, data_root=data_root, download=download)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def data_config_problem(cfg: Any) -> str | None:
    """Why a data config read from a file is unusable (None when it is fine).

    Checks the types of the keys the engine and the app read: input_size (C, H, W), mean, std,
    interpolation, crop_pct, crop_mode, name, class_names, num_classes. Unknown keys are allowed.
    """
    if not isinstance(cfg, dict):
        return f"the data config is a {type(cfg).__name__}, not a mapping"
    inp = cfg.get("input_size")
    if inp is not None and (not isinstance(inp, (list, tuple)) or len(inp) != 3
                            or not all(_is_int(v) for v in inp)
                            or not (1 <= inp[0] <= MAX_CHANNELS and 1 <= inp[1] <= MAX_SIDE and 1 <= inp[2] <= MAX_SIDE)):
        return f"input_size must be three positive integers (C, H, W), got {_short(inp)}"
    for key in ("mean", "std"):
        v = cfg.get(key)
        if v is not None and not (_is_num(v) or (isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_CHANNELS
                                                  and all(_is_num(x) for x in v))):
            return f"{key} must be a number or a list of numbers, got {_short(v)}"
    for key in ("interpolation", "crop_mode", "name"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            return f"{key} must be a string, got {_short(cfg[key])}"
    if cfg.get("interpolation") is not None and cfg["interpolation"] not in INTERPOLATIONS:
        return f"unknown interpolation {_short(cfg['interpolation'])}"
    if cfg.get("crop_mode") is not None and cfg["crop_mode"] not in CROP_MODES:
        return f"unknown crop_mode {_short(cfg['crop_mode'])}"
    crop = cfg.get("crop_pct")
    if crop is not None and not (_is_num(crop) and 0 < crop <= 4):
        return f"crop_pct must be a number in (0, 4], got {_short(crop)}"
    names = cfg.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        return "class_names must be a list of strings"
    n = cfg.get("num_classes")
    if n is not None and not (_is_int(n) and n >= 0):
        return f"num_classes must be a non-negative integer, got {_short(n)}"
    return None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def load_image(path_or_bytes: str | Path | bytes | bytearray | BinaryIO,
               max_pixels: int = 50_000_000) -> Image.Image:
    """Read one image safely: size-checked before decoding, first frame only, EXIF rotation applied.

    Args:
        path_or_bytes: a file path, the file's bytes, or a binary file object.
        max_pixels: refuse images with more pixels than this (decompression bombs).

    Returns:
        A fully loaded PIL image, independent of the source file.

    Raises:
        DataError: missing/unreadable file, not an image, too many pixels.
    """
    if isinstance(path_or_bytes, (bytes, bytearray)):
        source: Any = io.BytesIO(bytes(path_or_bytes))
        where = "image data"
    elif isinstance(path_or_bytes, (str, Path)):
        source = Path(path_or_bytes)
        where = str(path_or_bytes)
        if not source.is_file():
            raise DataError(f"image file {where} does not exist")
    else:
        source, where = path_or_bytes, "image stream"
    try:
        with warnings.catch_warnings():
            # our own pixel limit answers first; Pillow's bomb and corrupt-EXIF warnings stay inside
            warnings.simplefilter("ignore")
            with Image.open(source, formats=IMAGE_FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise DataError(f"{where} is {w}x{h} pixels, more than the limit of {max_pixels:,}")
                if w == 0 or h == 0:
                    raise DataError(f"{where} is empty ({w}x{h} pixels)")
                img.load()  # an opened image sits on its first frame; n_frames would parse every frame
                out = ImageOps.exif_transpose(img.copy())
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{where} has too many pixels (decompression bomb guard)") from None
    except (UnidentifiedImageError, SyntaxError):
        fmt = _format_of(source)
        if fmt and fmt not in IMAGE_FORMATS:
            raise DataError(f"{where} is in {fmt} format, which is not accepted (use PNG, JPEG, WEBP, "
                            f"AVIF, TIFF, GIF or BMP)") from None
        raise DataError(f"{where} is not an image PIL can read") from None
    except MemoryError:
        raise DataError(f"{where} is too large to decode") from None
    except (OSError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError, OverflowError,
            struct.error, RuntimeError) as err:  # Pillow's decoders raise all of these on damaged files
        raise DataError(f"cannot read {where}: {_first_line(err)}") from None
    return out


def _format_of(source: Any) -> str | None:
    """The format Pillow would give a file it is not allowed to open (header only, nothing decoded)."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as probe:
                return probe.format
    except Exception:  # noqa: BLE001 - any failure: not an image we can name
        return None


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_standard_mode(img: Image.Image, gray: bool) -> Image.Image:
    """Convert any PIL mode to 'L' (``gray``) or 'RGB'.

    Transparent pixels are composited onto white (drawings on a transparent canvas read as ink on
    paper); 16-bit and float images are scaled to 8 bits rather than clipped.
    """
    mode = img.mode
    try:
        if mode in _SIXTEEN_BIT:
            arr = np.asarray(img).astype(np.float64)
            arr[~np.isfinite(arr)] = 0.0
            if mode == "F":
                top = 1.0 if arr.size == 0 or arr.max() <= 1.0 else float(arr.max())
            elif mode == "I":
                top = 255.0 if arr.size == 0 or arr.max() <= 255 else 65535.0
            else:
                top = 65535.0
            arr = np.clip(arr / top, 0.0, 1.0)
            img = Image.fromarray(np.round(arr * 255).astype(np.uint8), mode="L")
        elif mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to LA / RGBA
            img = img.convert("LA" if mode == "La" else "RGBA")
        if img.mode in ("P", "PA", "RGBA", "LA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(paper, rgba).convert("RGB")
        if gray and img.mode == "LAB":  # Pillow has no LAB -> L; the L band is the lightness
            img = img.getchannel("L")
        return img.convert("L" if gray else "RGB")
    except (ValueError, OSError) as err:
        raise DataError(f"cannot convert a {mode} image to {'grayscale' if gray else 'RGB'}: "
                        f"{_first_line(err)}") from None


def is_digits_config(data_cfg: dict) -> bool:
    """Whether a data config is the digits demo's (one channel with the digits statistics)."""
    mean, std = tuple(data_cfg.get("mean", ())), tuple(data_cfg.get("std", ()))
    return (len(mean) == 1 and len(std) == 1 and abs(mean[0] - DIGITS_MEAN[0]) < 1e-6
            and abs(std[0] - DIGITS_STD[0]) < 1e-6)


DIGITS_WORK_SIDE = 256  # the digit is averaged down to 8x8: more resolution than this is never needed
MAX_ASPECT = 64  # sides of a photo for a square model input may differ by at most this factor


def _digits_image(gray: Image.Image, hw: tuple[int, int]) -> torch.Tensor:
    """A gray photo/drawing of a digit -> (1, H, W) in [0, 1], shaped like the digits data."""
    if max(gray.size) > DIGITS_WORK_SIDE:
        # work at a bounded size: squaring the ink box of a 30000 x 1 image would take 3.4 GB
        f = DIGITS_WORK_SIDE / max(gray.size)
        gray = gray.resize((max(1, round(gray.width * f)), max(1, round(gray.height * f))), Image.Resampling.BOX)
    arr = np.asarray(gray, dtype=np.float32) / 255.0
    if arr.mean() > 0.5:  # dark ink on light paper: the data is white on black
        arr = 1.0 - arr
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo > 1e-6:
        arr = (arr - lo) / (hi - lo)
        rows = np.flatnonzero((arr > 0.5).any(axis=1))
        cols = np.flatnonzero((arr > 0.5).any(axis=0))
        # the digits data are size-normalised: the ink box fills the frame, centred
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        side = max(r1 - r0, c1 - c0)
        square = np.zeros((side, side), dtype=np.float32)
        top, left = (side - (r1 - r0)) // 2, (side - (c1 - c0)) // 2
        square[top:top + r1 - r0, left:left + c1 - c0] = arr[r0:r1, c0:c1]
        arr = square
    else:
        arr = np.zeros_like(arr)
    # box-average to 8x8 (the data are 4x4 block counts of 32x32 bitmaps), then upscale like the data
    small = Image.fromarray(arr, mode="F").resize((DIGITS_NATIVE, DIGITS_NATIVE), Image.Resampling.BOX)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32).copy()).clamp_(0.0, 1.0)
    return upscale_digits(x[None, None], hw)[0]


def _fashion_image(gray: Image.Image, hw: tuple[int, int]) -> torch.Tensor:
    """A gray photo of a garment -> (1, H, W) in [0, 1], shaped like Fashion-MNIST: light on black
    (inverted when the border is light), the whole picture fitted into the frame with its aspect kept."""
    arr = np.asarray(gray, dtype=np.float32) / 255.0
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    if border.mean() > 0.5:
        arr = 1.0 - arr
    rows, cols = arr.shape
    h, w = hw
    scale = min(h / rows, w / cols)
    size = (max(1, min(w, round(cols * scale))), max(1, min(h, round(rows * scale))))  # PIL: (width, height)
    pic = Image.fromarray(arr, mode="F")
    if size != pic.size:
        pic = pic.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)
    frame = np.zeros((h, w), dtype=np.float32)
    top, left = (h - size[1]) // 2, (w - size[0]) // 2
    frame[top:top + size[1], left:left + size[0]] = np.asarray(pic, dtype=np.float32)
    return torch.from_numpy(frame).clamp_(0.0, 1.0)[None]


def is_fashion_config(data_cfg: dict) -> bool:
    """Whether a data config is Fashion-MNIST's (one channel with its training statistics)."""
    from .fashion import MEAN, STD

    mean, std = tuple(data_cfg.get("mean", ())), tuple(data_cfg.get("std", ()))
    return (len(mean) == 1 and len(std) == 1 and abs(mean[0] - MEAN[0]) < 1e-6
            and abs(std[0] - STD[0]) < 1e-6)


def image_to_tensor(img: Image.Image, data_cfg: dict, *, dataset: str | None = None) -> torch.Tensor:
    """Preprocess one user image like the evaluation transform of the model's data.

    Args:
        img: any PIL image (gray, RGB(A), palette, CMYK, 16-bit...).
        data_cfg: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``
            (as from ``vitslim_core.models.data_config``).
        dataset: the training dataset's name; ``"digits"`` selects the digits preprocessing (gray,
            inverted if dark-on-light, ink box fitted to the frame), ``"fashion-mnist[:PATH]"`` the
            Fashion-MNIST one (gray, inverted if the border is light, the picture fitted to the frame
            with its aspect kept: a 28x28 test image stays as it is). ``None`` recognises either
            model by its normalisation statistics.

    Returns:
        A (1, C, H, W) float32 tensor.

    Raises:
        DataError: an empty image, a malformed config or an unconvertible mode.
    """
    if not isinstance(img, Image.Image):
        raise DataError(f"expected a PIL image, got {type(img).__name__}")
    if img.width == 0 or img.height == 0:
        raise DataError(f"the image is empty ({img.width}x{img.height} pixels)")
    problem = data_config_problem(data_cfg)
    if problem:
        raise DataError(f"unusable data config: {problem}")
    try:
        c, h, w = (int(v) for v in data_cfg["input_size"])
        mean = _channel_stats(data_cfg["mean"], c, "mean")
        std = _channel_stats(data_cfg["std"], c, "std")
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"data config needs input_size (C, H, W), mean and std: {_first_line(err)}") from None
    digits = dataset == "digits" if dataset is not None else is_digits_config(data_cfg)
    clothes = (dataset.partition(":")[0].strip().lower() == "fashion-mnist" if dataset is not None
               else is_fashion_config(data_cfg))
    long, short = max(img.size), min(img.size)
    if not digits and long > MAX_ASPECT * short:
        # the resize to the model's side keeps the aspect ratio: 200000 x 1 would become 224 x 44.8 M
        raise DataError(f"the image is {img.width}x{img.height} pixels: its sides differ by more than "
                        f"{MAX_ASPECT}x, too elongated to resize for a {w}x{h} model input")
    if digits:
        x = _digits_image(to_standard_mode(img, gray=True), (h, w))
    elif clothes:
        x = _fashion_image(to_standard_mode(img, gray=True), (h, w))
    else:
        from timm.data import create_transform

        work = 1 if c == 1 else 3
        # identity normalisation gives floats in [0, 1]; ours follows (handles any channel count)
        tf = create_transform(input_size=(work, h, w), is_training=False,
                              interpolation=data_cfg.get("interpolation", "bicubic"),
                              crop_pct=data_cfg.get("crop_pct", 0.875),
                              crop_mode=data_cfg.get("crop_mode", "center"),
                              mean=(0.0,) * work, std=(1.0,) * work)
        x = tf(to_standard_mode(img, gray=c == 1))
        if c not in (1, 3):
            x = x[:1]
    x = _normalise(x.expand(c, -1, -1) if x.shape[0] == 1 else x, mean, std)
    return x.contiguous()[None].float()
