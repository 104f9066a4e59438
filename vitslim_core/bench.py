"""Latency measurement: dense vs slim, side by side in one process."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from .errors import VitSlimError


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if not n:
        yield
        return
    limit = 4 * (os.cpu_count() or 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        # OpenMP crashes (or fails to create its kernels) far above the core count
        raise VitSlimError(f"threads must be an integer from 1 to {limit} on this machine, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a timm ViT (dense or slim) expects."""
    pe = model.patch_embed
    return (int(pe.proj.in_channels), *(int(s) for s in pe.img_size))


@torch.inference_mode()
def measure_latency(model: nn.Module, batch_size: int = 32, input_size: Sequence[int] | None = None,
                    runs: int = 10, warmup: int = 3, threads: int | None = None,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Time forward passes of ``model`` on random input.

    Args:
        model: any image model; put in eval mode for the measurement.
        batch_size: images per forward pass.
        input_size: (C, H, W); default from the model's patch embedding.
        runs: timed passes after ``warmup`` untimed ones.
        threads: CPU threads for the measurement (default: torch's current setting).
        device: "cpu" or "cuda" (CUDA times with events after a synchronise).

    Returns:
        median/min/max/p10/p90 milliseconds per batch, images per second, settings.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    x = torch.randn(batch_size, *(input_size or input_shape(model)), device=device)
    times: list[float] = []
    with _threads(threads):
        for _ in range(warmup):
            model(x)
        for _ in range(runs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t) * 1e3)
        n_threads = torch.get_num_threads()
    model.train(was_training)
    times.sort()
    med = statistics.median(times)
    q = lambda f: times[min(len(times) - 1, int(f * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": med, "min_ms": times[0], "max_ms": times[-1], "p10_ms": q(0.1), "p90_ms": q(0.9),
            "images_per_s": batch_size * 1e3 / med, "batch_size": batch_size, "runs": runs,
            "threads": n_threads if device.type == "cpu" else None, "device": str(device)}


def compare_latency(dense: nn.Module, slims: dict[str, nn.Module], batch_size: int = 32, runs: int = 10,
                    warmup: int = 3, threads: int | None = None, device: str = "cpu",
                    rounds: int = 3) -> list[dict[str, Any]]:
    """Dense and slim models timed in interleaved rounds (so machine noise hits all alike).

    Returns one row per model: FLOPs ratio, median ms, images/s, speedup, efficiency (speedup / (1/ratio)).
    """
    from .cost import count_cost
    models = {"dense": dense, **slims}
    per: dict[str, list[float]] = {k: [] for k in models}
    last: dict[str, dict] = {}
    for _ in range(rounds):
        for name, m in models.items():
            r = measure_latency(m, batch_size, runs=runs, warmup=warmup, threads=threads, device=device)
            per[name].append(r["median_ms"])
            last[name] = r
    dense_ms = statistics.median(per["dense"])
    rows = []
    for name, m in models.items():
        c = count_cost(m)
        ms = statistics.median(per[name])
        speedup = dense_ms / ms
        rows.append({"model": name, "gflops": c.gflops, "flops_ratio": c.flops_ratio, "params": c.params,
                     "median_ms": ms, "spread_ms": max(per[name]) - min(per[name]),
                     "images_per_s": batch_size * 1e3 / ms, "speedup": speedup,
                     "efficiency": speedup * c.flops_ratio, "threads": last[name]["threads"],
                     "batch_size": batch_size, "device": device})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("model", "GFLOPs", "FLOPs ratio", "params (M)", "median ms", "spread ms", "images/s", "speedup",
            "efficiency")
    body = [(r["model"], f"{r['gflops']:.3f}", f"{r['flops_ratio']:.3f}", f"{r['params'] / 1e6:.2f}",
             f"{r['median_ms']:.1f}", f"{r['spread_ms']:.1f}", f"{r['images_per_s']:.1f}",
             f"{r['speedup']:.2f}x", f"{r['efficiency']:.2f}") for r in rows]
    w = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(n) for v, n in zip(row, w)) for row in [head, *body]]
    return "\n".join(lines) + "\n(efficiency = measured speedup / FLOPs speedup; 1.0 means FLOPs savings fully realised)"
