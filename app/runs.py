"""Runs the app can show: the bundled runs, folders named on the command line, uploaded score files.

Two runs are bundled (``vitslim_core/assets``): the digits demo and the Fashion-MNIST run. Without run
folders the app and the widgets open both (``bundled_runs``); the Fashion-MNIST run comes first when
its data set is installed (evaluation and retraining need it; token masks use the run's bundled
sample images), the digits demo otherwise (it needs nothing outside the package).

A run is identified in the page by its folder path (the "run key"). Only folders given at start-up
and folders the app created under its work dir (uploads) are accepted, so a crafted request cannot
make the app read other files. Loaded runs are cached per app (``RunRegistry``), the searched model
and the test split are loaded on first use.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vitslim_core.demo import SAMPLES_FILE
from vitslim_core.errors import DataError, ScoreFileError, VitSlimError
from vitslim_core.run_folder import SWEEP_FILE, read_history, read_sweep_rows
from vitslim_core.scores import MaskScores

# datasets an uploaded run may name: built in, nothing read from or written to the server's disk
UPLOAD_DATASETS = ("digits", "synthetic")
MAX_UPLOAD_SYNTHETIC = 10_000
DATA_ROOT = "data"  # torchvision's root folder for Fashion-MNIST (relative to where the app runs), as in the CLI
SAMPLES_PER_CLASS = 1  # bundled Fashion-MNIST samples offered per class (the file holds 10 of each)


def fashion_install_hint(data_root: str | Path | None = None) -> str:
    """How to get Fashion-MNIST onto this machine (one line)."""
    data_root = DATA_ROOT if data_root is None else data_root
    return (f"install it with `apt-get install dataset-fashion-mnist`, put torchvision's FashionMNIST/raw files "
            f"under {Path(data_root)}/, or download them once with `vitslim eval RUN --download`")


def fashion_installed(data_root: str | Path | None = None) -> bool:
    """Whether Fashion-MNIST is where ``fashion-mnist`` (no path) looks: Debian's folder, then ``data_root``
    (default ``DATA_ROOT``)."""
    from vitslim_core.fashion import find_files
    try:
        find_files(None, DATA_ROOT if data_root is None else data_root)
    except DataError:
        return False
    return True


def bundled_labels() -> dict[Path, str]:
    """The page's name of each bundled run folder."""
    from vitslim_core.demo import DEMO_DIR, FASHION_DIR
    return {DEMO_DIR.resolve(): "digits demo (bundled)", FASHION_DIR.resolve(): "Fashion-MNIST (bundled)"}


def bundled_runs(data_root: str | Path | None = None) -> list[Path]:
    """The bundled run folders that exist, the default first.

    The default is the Fashion-MNIST run when its folder and the data set are both there, else the digits
    demo (always usable offline). A folder without ``scores.safetensors`` (a checkout without it) is left out.
    """
    from vitslim_core.demo import DEMO_DIR, FASHION_DIR
    found = [d.resolve() for d in (DEMO_DIR, FASHION_DIR) if (d / "scores.safetensors").is_file()]
    fashion = FASHION_DIR.resolve()
    if fashion in found and found[0] != fashion and fashion_installed(data_root):
        found.remove(fashion)
        found.insert(0, fashion)
    return found


def default_run(data_root: str | Path | None = None) -> Path:
    """The bundled run to open without a choice: Fashion-MNIST when it is bundled and its data set is
    installed, else the digits demo (what the notebooks and ``SlimPanel()`` show)."""
    from vitslim_core.demo import DEMO_DIR
    runs = bundled_runs(data_root)
    return runs[0] if runs else DEMO_DIR


class MissingWeightsError(VitSlimError):
    """The run has scores but no searched weights (model.safetensors)."""


@dataclass
class Sample:
    """One image the app offers: a preprocessed model input and a thumbnail."""

    name: str
    tensor: Any            # (1, C, H, W) normalised like the model's data
    thumb: Any             # (h, w, 3) uint8 for the gallery
    label: int | None = None


@dataclass
class OpenRun:
    """A loaded run: its scores (always), history and sweep (if present), weights (on demand)."""

    key: str
    label: str
    folder: Path
    scores: MaskScores
    history: dict | None
    bundled: bool = False
    uploaded: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _model: Any = field(default=None, repr=False)
    _data: Any = field(default=None, repr=False)
    _samples: list[Sample] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ facts
    @property
    def spec(self):
        return self.scores.spec

    @property
    def has_weights(self) -> bool:
        return (self.folder / "model.safetensors").is_file()

    @property
    def data_cfg(self) -> dict[str, Any]:
        d = {k: v for k, v in (self.scores.meta.get("data") or {}).items() if v is not None}
        s = self.spec
        d.setdefault("input_size", [s.in_chans, *s.img_size])
        d.setdefault("mean", [0.5] * s.in_chans)
        d.setdefault("std", [0.5] * s.in_chans)
        return d

    @property
    def dataset_name(self) -> str | None:
        return (self.scores.meta.get("data") or {}).get("name")

    def check_dataset(self) -> None:
        """Refuse datasets an uploaded run must not use: an uploaded score file could otherwise make the
        server read an image folder or download CIFAR into any path it names (or make a huge data set)."""
        name = self.dataset_name
        if not self.uploaded or not name:
            return
        kind, _, arg = name.strip().partition(":")
        ok = kind.lower() == "digits" and not arg
        if kind.lower() == "synthetic":
            ok = not arg or (arg.isdigit() and 0 < int(arg) <= MAX_UPLOAD_SYNTHETIC)
        if not ok:
            raise DataError(f"uploaded run '{self.label}' names the dataset {name[:60]!r}; uploaded runs can only "
                            f"use the built-in datasets ({', '.join(UPLOAD_DATASETS)}, synthetic:N up to "
                            f"{MAX_UPLOAD_SYNTHETIC:,}): evaluate and retrain it with the command line")

    def check_data(self, what: str) -> None:
        """Raise a one-line DataError saying how to install the data set when ``what`` (evaluating,
        retraining) needs Fashion-MNIST and it is not on this machine. Other datasets fail when loaded."""
        kind, _, path = (self.dataset_name or "").strip().partition(":")
        if kind.lower() != "fashion-mnist" or self._data is not None:
            return
        from vitslim_core.fashion import find_files
        try:
            find_files(path or None, DATA_ROOT)
        except DataError:
            where = f" (looked in {path})" if path else ""
            raise DataError(f"{what} needs the Fashion-MNIST data set, which is not on this machine{where}: "
                            f"{fashion_install_hint()}") from None

    def missing_weights_message(self, what: str) -> str:
        return (f"{what} needs the searched weights, but run '{self.label}' has only its scores "
                f"(no model.safetensors next to scores.safetensors)")

    # ------------------------------------------------------------------ heavy parts, loaded once
    def model(self):
        """The searched model with masks set to the scores (shared: never modify it, slim a copy)."""
        if not self.has_weights:
            raise MissingWeightsError(self.missing_weights_message("this"))
        with self._lock:
            if self._model is None:
                from vitslim_core.run_folder import load_run
                _, self._model = load_run(self.folder)
            return self._model

    def dense_architecture(self):
        """The architecture with random weights (enough to time it): no weights needed."""
        from vitslim_core.models import rebuild_model
        recipe = self.scores.model_recipe
        if not recipe:
            raise ScoreFileError(f"run '{self.label}' does not say which model it was made for")
        return rebuild_model(recipe, expect=self.spec).eval()  # checked on the meta device first

    def data(self, augment: bool = False):
        """The run's dataset bundle (test split for evaluation)."""
        with self._lock:
            if self._data is None:
                from vitslim_core.data import load_for
                name = self.dataset_name
                if not name:
                    raise VitSlimError(f"run '{self.label}' does not name its dataset")
                self.check_dataset()
                self._data = load_for(self.data_cfg, name, augment=augment, data_root=DATA_ROOT)
            return self._data

    def samples(self) -> list[Sample]:
        """Images to try: one test image per class (the run's bundled samples, else the dataset's test
        split for built-in datasets) and, for colour models, three photos."""
        with self._lock:
            if self._samples is not None:
                return self._samples
        out: list[Sample] = []
        if (self.folder / SAMPLES_FILE).is_file():
            try:
                out.extend(self._bundled_samples())
            except VitSlimError:  # a damaged sample file: the test split or the photos instead
                pass
        name = self.dataset_name or ""
        built_in = name == "digits" or name.startswith("synthetic") or (name == "fashion-mnist" and fashion_installed())
        if not out and built_in:
            try:
                out.extend(self._dataset_samples())
            except VitSlimError:
                pass
        if self.spec.in_chans == 3 or not out:
            out.extend(self._photo_samples())
        with self._lock:
            self._samples = out
        return out

    def _thumb(self, x: Any) -> Any:
        from vitslim_core.viz import display_image
        thumb = display_image(x, self.data_cfg)
        f = max(1, 64 // max(thumb.shape[:2]))
        return thumb.repeat(f, 0).repeat(f, 1)

    def _bundled_samples(self) -> list[Sample]:
        """The run's ``samples.safetensors`` (Fashion-MNIST test images kept next to the run, so token masks
        work without the data set), ``SAMPLES_PER_CLASS`` per class in class order."""
        from vitslim_core.fashion import sample_inputs
        xs, labels = sample_inputs(self.folder / SAMPLES_FILE, self.data_cfg)
        if tuple(xs.shape[1:]) != (self.spec.in_chans, *self.spec.img_size):
            return []
        names = self.scores.class_names
        seen: dict[int, int] = {}
        out = []
        for i, y in enumerate(labels):
            if seen.get(y, 0) >= SAMPLES_PER_CLASS:
                continue
            seen[y] = seen.get(y, 0) + 1
            x = xs[i:i + 1]
            out.append(Sample(f"test image: {names[y] if y < len(names) else y}", x, self._thumb(x), y))
        return sorted(out, key=lambda smp: smp.label)

    def _dataset_samples(self, n: int = 10) -> list[Sample]:
        test = self.data().test
        names = self.scores.class_names
        picked: dict[int, int] = {}
        targets = getattr(test, "targets", None) or [test[i][1] for i in range(min(len(test), 200))]
        for i, t in enumerate(targets):  # one image per class first, in class order
            if int(t) not in picked:
                picked[int(t)] = i
            if len(picked) >= n:
                break
        out = []
        for cls in sorted(picked)[:n]:
            x, y = test[picked[cls]]
            x = x[None]
            thumb = self._thumb(x)
            label = names[int(y)] if int(y) < len(names) else str(int(y))
            out.append(Sample(f"test digit {label}" if self.dataset_name == "digits" else f"test image: {label}",
                              x, thumb, int(y)))
        return out

    def _photo_samples(self) -> list[Sample]:
        from PIL import Image

        from vitslim_core.data import image_to_tensor
        try:
            import skimage.data as skd
        except ImportError:
            return []
        out = []
        for name in ("astronaut", "coffee", "chelsea"):
            try:
                img = Image.fromarray(getattr(skd, name)())
            except Exception:  # noqa: BLE001 - a missing sample file just means one sample fewer
                continue
            x = image_to_tensor(img, self.data_cfg, dataset=self.dataset_name)
            thumb = img.copy()
            thumb.thumbnail((96, 96))
            import numpy as np
            out.append(Sample(name, x, np.asarray(thumb.convert("RGB")), None))
        return out


# ====================================================================== registry
class RunRegistry:
    """The runs one app may open, loaded lazily and cached by folder and file time.

    Args:
        runs: run folders (or score files) given at start-up; the first is the default.
        workdir: the app's work dir (uploads go to ``workdir/uploads``).
        bundled: the bundled run folder(s) among ``runs`` (named by ``bundled_labels``, never written to).
    """

    def __init__(self, runs: list[str | Path], workdir: Path, bundled: Path | Sequence[Path] | None = None) -> None:
        self.workdir = Path(workdir)
        self.uploads = self.workdir / "uploads"
        if bundled is None:
            bundled = ()
        elif isinstance(bundled, (str, Path)):
            bundled = (bundled,)
        self.bundled = tuple(Path(b).resolve() for b in bundled)
        self.startup = [self._folder(r) for r in runs]
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, OpenRun]] = {}

    @staticmethod
    def _folder(path: str | Path) -> Path:
        p = Path(path).expanduser().resolve()
        return p.parent if p.is_file() and p.name == "scores.safetensors" else p

    def default_key(self) -> str:
        return str(self.startup[0]) if self.startup else ""

    def label(self, folder: Path) -> str:
        """The page's name of a start-up run: "digits demo (bundled)", ..., or the folder name."""
        if folder in self.bundled:
            return bundled_labels().get(folder, f"{folder.name} (bundled)")
        return folder.name or str(folder)

    def startup_choices(self) -> list[tuple[str, str]]:
        return [(self.label(p), str(p)) for p in self.startup]

    def allowed(self, key: str) -> bool:
        if not key or not isinstance(key, (str, Path)):
            return False
        try:
            p = Path(key).resolve()
        except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
            return False
        if p in self.startup:
            return True
        try:
            p.relative_to(self.uploads.resolve())
        except ValueError:
            return False
        return (p / "scores.safetensors").is_file()

    def get(self, key: str | None) -> OpenRun:
        """The run of a key from the page (the default run for an empty key)."""
        key = key or self.default_key()
        if not isinstance(key, (str, Path)):
            raise ScoreFileError(f"a run is named by its folder, not by a {type(key).__name__}")
        if not key:
            raise ScoreFileError("no run is open: start the app with a run folder or upload a scores.safetensors")
        if not self.allowed(key):
            raise ScoreFileError(f"run {str(key)[:200]!r} is not one this app was started with")
        folder = Path(key).resolve()
        scores_file = folder / "scores.safetensors"
        try:
            stamp = scores_file.stat().st_mtime
        except OSError:
            raise ScoreFileError(f"run folder {folder} has no scores.safetensors") from None
        with self._lock:
            hit = self._cache.get(str(folder))
            if hit and hit[0] == stamp:
                return hit[1]
        scores = MaskScores.load(scores_file)  # header, recipe and data config all checked here
        uploaded = folder not in self.startup
        label = self._upload_label(folder) if uploaded else self.label(folder)
        run = OpenRun(str(folder), label, folder, scores, read_history(folder), bundled=folder in self.bundled,
                      uploaded=uploaded)
        with self._lock:
            self._cache[str(folder)] = (stamp, run)
        return run

    def _upload_label(self, folder: Path) -> str:
        try:
            name = str(json.loads((folder / "upload.json").read_text()).get("name", folder.name))
        except (OSError, ValueError, AttributeError):
            name = folder.name
        return f"uploaded: {name}"

    # ------------------------------------------------------------------ uploads
    def add_upload(self, files: list[str | Path]) -> OpenRun:
        """Make a run folder from uploaded files: one score file, optional weights and history.json.

        Files are recognised by content (safetensors metadata "format"), not by name.
        """
        from safetensors import SafetensorError, safe_open
        scores_src = weights_src = history_src = None
        for f in files:
            if not isinstance(f, (str, Path)) or not str(f) or "\x00" in str(f):
                raise ScoreFileError(f"an upload is a file path, not {str(f)[:40]!r}")
            f = Path(f)
            if not f.is_file():
                raise ScoreFileError(f"{f.name or f} is not an uploaded file")
            if f.suffix.lower() == ".json":
                history_src = f
                continue
            if f.suffix.lower() != ".safetensors":
                raise ScoreFileError(f"{f.name} is not a .safetensors or history .json file")
            try:
                with safe_open(str(f), framework="pt") as st:
                    fmt = (st.metadata() or {}).get("format")
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
                raise ScoreFileError(f"{f.name} is not a readable safetensors file ({reason})") from None
            if fmt == "vitslim-scores":
                scores_src = f
            elif fmt == "vitslim-weights":
                weights_src = f
            else:
                raise ScoreFileError(f"{f.name} is neither a vitslim score file nor searched weights "
                                     f"(its format is {fmt!r})")
        if scores_src is None:
            raise ScoreFileError("upload a scores.safetensors (weights model.safetensors and history.json optional)")
        MaskScores.load(scores_src)  # validate everything before keeping anything
        digest = hashlib.sha256()
        for f in (scores_src, weights_src):
            if f is not None:
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
        folder = self.uploads / digest.hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        tmp_names = []
        for src, name in ((scores_src, "scores.safetensors"), (weights_src, "model.safetensors"),
                          (history_src, "history.json")):
            if src is not None:
                tmp = folder / f".{name}.part"
                shutil.copyfile(src, tmp)
                tmp_names.append((tmp, folder / name))
        for tmp, dst in tmp_names:
            os.replace(tmp, dst)
        (folder / "upload.json").write_text(json.dumps({"name": f"{Path(scores_src).name} ({folder.name[:6]})"}))
        run = self.get(str(folder))
        if weights_src is not None:
            try:
                run.model()
            except VitSlimError:
                (folder / "model.safetensors").unlink(missing_ok=True)
                with run._lock:
                    run._model = None
                raise
        return run


def sweep_file(run: OpenRun, workdir: Path) -> Path:
    """Where the app writes a run's sweep: the run folder if it is ours to write, else the work dir."""
    if not run.bundled and os.access(run.folder, os.W_OK):
        return run.folder / "sweep.json"
    h = hashlib.sha256(str(run.folder).encode()).hexdigest()[:16]
    return Path(workdir) / "sweeps" / h / "sweep.json"


def read_sweep(run: OpenRun, workdir: Path) -> list[dict] | None:
    """Rows of the run's sweep.json (work-dir copy first, then the run folder); None if absent."""
    for p in (sweep_file(run, workdir), run.folder / SWEEP_FILE):
        rows = read_sweep_rows(p)
        if rows is not None:
            return rows
    return None
