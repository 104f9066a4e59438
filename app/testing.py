"""Helpers for the app's tests and benchmarks: a small run folder, free ports, chromium options."""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# a few search steps with strong penalties and a fast mask learning rate: scores that differ
QUICK_SEARCH = dict(epochs=1, max_steps=8, batch_size=32, lr=5e-4, mask_lr=0.2, w_attn=2e-2, w_mlp=1e-2,
                    w_token=2e-2, log_every=2, device="cpu", seed=0)


def bundled_demo() -> Path | None:
    """The bundled demo run, if it has been built."""
    from vitslim_core.demo import DEMO_DIR
    return DEMO_DIR if (DEMO_DIR / "scores.safetensors").is_file() else None


def build_quick_run(out: Path) -> Path:
    """A real search run of the digits ViT in a few seconds (random start, eight search steps)."""
    from vitslim_core.search import SearchConfig, search
    out = Path(out)
    if (out / "scores.safetensors").is_file() and (out / "model.safetensors").is_file():
        return out
    os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    search(SearchConfig(model="digits-vit", data="digits", out=str(tmp), **QUICK_SEARCH))
    (tmp / "checkpoint.pt").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run_for_tests(base: Path) -> Path:
    """The run the app tests use: ``VITSLIM_TEST_RUN``, else the bundled demo, else a quick run in ``base``
    (built once: later calls with the same ``base`` reuse it)."""
    env = os.environ.get("VITSLIM_TEST_RUN")
    if env:
        return Path(env)
    return bundled_demo() or build_quick_run(Path(base) / "quick-run")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (bounded wait loops in tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
