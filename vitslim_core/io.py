"""Atomic file writes (temp file in the same folder, fsync, rename) and safe JSON reads."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ScoreFileError, VitSlimError


TEMP_MARK = ".vitslim-"  # in the names of our temp files (see remove_stale_temps)
_NAME_BYTES = 200  # of a file name kept in its temp name: 255-byte names still get a legal temp name


def _temp_prefix(name: str) -> str:
    short = name.encode("utf-8", "surrogateescape")[:_NAME_BYTES].decode("utf-8", "ignore")
    return f".{short}{TEMP_MARK}"


def _target(path: str | os.PathLike) -> Path:
    """The path to write: a symlink is followed, so writing ``LINK`` updates the file it points to."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` in one rename.

    A crash at any point leaves either the old file or the new one, never half a file.
    """
    path = _target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise VitSlimError(_os_message(e, path)) from None
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise VitSlimError(_os_message(e, path)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replaceable: frozenset[str] | None = None) -> Iterator[Path]:
    """Yield an empty temp folder next to ``path``; on success it takes the place of ``path`` in one step.

    A folder of several files (a slim model: weights and their description) switches from the old
    version to the new one at once: the new folder is exchanged with the old one by a single
    ``renameat2(RENAME_EXCHANGE)`` (Linux), so a crash at any moment leaves the old folder or the new
    one, never a mix. Where the exchange is not available (other systems, some file systems) the old
    folder is moved aside first, which leaves a short window without either.

    Args:
        path: the folder to write.
        replaceable: names an existing ``path`` may hold; if it holds anything else, nothing is
            written (VitSlimError): the user's own files are never swept away with the old version.
    """
    path = _target(path)
    if path.exists() and not path.is_dir():
        raise VitSlimError(f"cannot write {path}: it is a file, not a folder")
    if path.is_dir() and replaceable is not None:
        foreign = sorted(p.name for p in path.iterdir() if p.name not in replaceable and TEMP_MARK not in p.name)
        if foreign:
            more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
            raise VitSlimError(f"cannot write {path}: it holds other files ({', '.join(foreign[:3])}{more}); "
                               "choose a new or empty folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{glob.escape(_temp_prefix(path.name))}*.tmp"):  # a killed earlier write
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise VitSlimError(_os_message(e, path)) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _switch_dir(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise VitSlimError(_os_message(e, path)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder on failure, the old one after an exchange


def _switch_dir(new: Path, path: Path) -> None:
    """Put the folder ``new`` in the place of ``path``; an old ``path`` ends up at ``new`` (deleted after)."""
    if not path.is_dir():
        os.rename(new, path)
    elif not _exchange(new, path):
        aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent))
        os.rename(path, aside / "old")
        os.rename(new, path)
        shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    fn = getattr(_libc(), "renameat2", None) if os.name == "posix" else None
    if fn is None:
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # this file system (or sandbox) cannot exchange: move aside instead
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can open a folder for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask is process-wide and not thread-safe


def _os_message(e: OSError, path: str | os.PathLike | None = None, verb: str = "write") -> str:
    path = path if path is not None else (e.filename or "a file")
    if e.errno == errno.ENOSPC:
        return f"cannot {verb} {path}: the disk is full"
    if e.errno == errno.EDQUOT:
        return f"cannot {verb} {path}: the disk quota is exceeded"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot {verb} {path}: permission denied"
    if e.errno == errno.EROFS:
        return f"cannot {verb} {path}: the file system is read-only"
    if e.errno == errno.ENOTDIR:
        return f"cannot {verb} {path}: a part of the path is a file, not a folder"
    return f"cannot {verb} {path}: {e.strerror or e}"


def os_error_message(e: OSError) -> str:
    """A one-line message for an OSError that escaped (disk full, permission, missing folder)."""
    return _os_message(e, e.filename, "use") if e.filename else (e.strerror or str(e) or type(e).__name__)


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create an output folder and check that files can be written in it, before hours of training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise VitSlimError(_os_message(e, path)) from None
    return path


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temp files and folders a killed writer of ours left in ``folder`` and its direct
    sub-folders (named ``.<name>.vitslim-<random>.tmp``: nobody else's files match); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    pattern = f".*{TEMP_MARK}*.tmp"
    for p in [*folder.glob(pattern), *folder.glob(f"*/{pattern}")]:
        with contextlib.suppress(OSError):
            if p.is_symlink() or p.is_file():
                p.unlink()
                n += 1
            elif p.is_dir():
                shutil.rmtree(p)
                n += 1
    return n


def refuse_overlap(out: str | os.PathLike, inputs: list, flag: str = "--out") -> None:
    """Refuse an output that is, or holds, one of the inputs (writing it would destroy them).

    Args:
        out: the folder or file about to be written (or replaced).
        inputs: the files and folders the command reads (None entries are ignored).
        flag: how the user named the output, for the message.
    """
    o = Path(os.path.realpath(Path(out).expanduser()))
    for item in inputs:
        if item is None:
            continue
        i = Path(os.path.realpath(Path(item).expanduser()))
        if o == i or o in i.parents:
            what = "is" if o == i else "holds"
            raise VitSlimError(f"{flag} {out} {what} the input {item}: writing it would destroy the input; "
                               "choose another output")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Run ``save(tmp_path)`` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        save(tmp)


def read_json(path: str | os.PathLike, what: str, max_bytes: int = 64 << 20) -> Any:
    """Read a JSON file, turning every failure into a one-line ScoreFileError."""
    path = Path(path)
    if not path.is_file():
        raise ScoreFileError(f"{what} {path} does not exist")
    if path.stat().st_size > max_bytes:
        raise ScoreFileError(f"{what} {path} is too large to be a {what}")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ScoreFileError(f"{what} {path} is not valid JSON ({type(e).__name__})") from None
    except OSError as e:
        raise ScoreFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
