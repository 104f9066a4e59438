"""A fork server that runs the vitslim CLI in child processes which SIGKILL themselves at a chosen
file write (used by test_crash.py).

Importing torch, timm and scikit-learn takes most of a short run's time, so this process imports
them once and forks a child per run. It reads one JSON request per line on stdin,
``{"mode": ..., "n": ..., "out": ..., "argv": [...]}``, and answers two lines on stdout:
``{"pid": PID}`` when the child starts and ``{"rc": RC}`` when it ends (``-9`` for SIGKILL).

MODE says where the N-th atomic write into ``out`` (counted at its rename; a folder switch of
``io.atomic_dir`` counts as one write) dies: ``before`` (temp
file complete, not renamed), ``half`` (temp file cut to half its length, as if the process died
while writing it) or ``after`` (renamed, the next write not begun); ``enospc`` makes that write fail as on a full disk.
``none`` never kills (the test
may still kill the child from outside at any moment). SIGKILL gives Python no chance to clean up:
no ``finally`` blocks, no atexit, open files as they are.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path


def _arm(mode: str, n: int, out: Path) -> None:
    real_replace = os.replace
    count = {"n": 0}

    def replace(src, dst, *a, **kw):
        if mode == "none" or out not in Path(dst).resolve().parents:
            return real_replace(src, dst, *a, **kw)
        count["n"] += 1
        if count["n"] == n:
            if mode == "enospc":  # the disk fills up: the write fails, the process goes on
                raise OSError(errno.ENOSPC, "No space left on device")
            if mode == "half":
                size = os.path.getsize(src)
                with open(src, "rb+") as f:
                    f.truncate(size // 2)
            if mode == "after":
                real_replace(src, dst, *a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **kw)

    os.replace = replace

    import vitslim_core.io as vio
    real_switch = vio._switch_dir

    def switch(new, path):  # a whole folder (slim model) changing in one step counts as one write
        if mode == "none" or out not in Path(path).resolve().parents:
            return real_switch(new, path)
        count["n"] += 1
        if count["n"] == n:
            if mode == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            if mode == "half":  # died while filling the new folder: its last file cut in half
                last = max(Path(new).iterdir(), key=lambda p: p.stat().st_mtime_ns)
                with open(last, "rb+") as f:
                    f.truncate(last.stat().st_size // 2)
            if mode == "after":
                real_switch(new, path)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_switch(new, path)

    vio._switch_dir = switch


def _child(req: dict) -> int:
    _arm(req["mode"], int(req["n"]), Path(req["out"]).resolve())
    from vitslim_core.cli import main
    return main(req["argv"])


def serve() -> None:
    import torch
    torch.set_num_threads(1)
    import sklearn.datasets  # noqa: F401  (the digits data)
    import timm  # noqa: F401
    import vitslim_core.cli  # noqa: F401
    import vitslim_core.retrain  # noqa: F401
    import vitslim_core.search  # noqa: F401
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        err_path = req.get("stderr")
        pid = os.fork()
        if pid == 0:  # the child: its stderr goes to a file the test reads
            rc = 1
            try:
                fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                rc = _child(req)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - a traceback goes to the child's stderr file
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    serve()
