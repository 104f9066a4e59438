"""Atomic file writes (temp file in the same folder, fsync, rename) and safe JSON reads."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ScoreFileError, VitSlimError


TEMP_MARK = ".vitslim-"  # in the names of our temp files (see remove_stale_temps)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` in one rename.

    A crash at any point leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp", dir=path.parent)
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
    """Delete the temp files a killed writer of ours left in ``folder`` and its direct sub-folders
    (named ``.<file name>.vitslim-<random>.tmp``: nobody else's files match); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    pattern = f".*{TEMP_MARK}*.tmp"
    for p in [*folder.glob(pattern), *folder.glob(f"*/{pattern}")]:
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


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
