"""Search step vs plain fine-tuning step: time and peak memory, side by side (CPU or CUDA).

One step = forward, cross-entropy (+ the l1 terms for search), backward, AdamW step.
Time: interleaved rounds in one process, median per step. Peak memory: each variant runs in a fresh
subprocess; we report its peak resident set size (VmHWM) and how much it grew during the steps after
the model, the optimizer state and a warm-up step exist (the activations of one step).

    python benchmarks/bench_search_step.py            # DeiT-S, EVA02-S shapes (img 224, batch 8), the demo model
    python benchmarks/bench_search_step.py --case eva02 --case deit   # only the cases whose name holds these
    python benchmarks/bench_search_step.py --quick    # smaller: DeiT-S shape at batch 4
    python benchmarks/bench_search_step.py --device cuda [--amp]   # GPU: DeiT-S batch 64, peak = CUDA allocator
    python benchmarks/bench_search_step.py --compile   # also torch.compile-d steps (time and kernels per step)
    python benchmarks/bench_search_step.py --recompute-norms   # masks recompute their norms in backward

Operations per step: eager, every aten op dispatched in one step (forward, loss, backward, AdamW with
foreach as ``vitslim search`` runs it), counted with a ``TorchDispatchMode``, for DeiT-S at 64 px batch 4
(the shape of issue 12) and the digits model. Compiled: the kernels inductor generated for the forward and
backward graphs (each launched once per step) plus the top-level aten calls the profiler sees in a step
(matrix products and attention run as extern kernels, the eager AdamW).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "deit_small (224px)": dict(name="deit_small_patch16_224", kwargs={}, batch=8, classes=1000),
    # EVA02-S: rope (whole-head attention scores), SwiGLU MLP (GluMlp), q/v biases, 256 patches of 14 px
    "eva02_small (224px)": dict(name="eva02_small_patch14_224", kwargs={"num_classes": 1000}, batch=8, classes=1000),
    # a step of about 0.1 s: many more rounds, or the medians of a few rounds swing by 10%
    "digits-vit demo": dict(name="digits-vit", kwargs={}, batch=64, classes=10, rounds=20, steps=5),
}
BIG = ("deit_small (224px)", "eva02_small (224px)")


OPS_CASES = {
    "deit_small (64px, batch 4)": dict(name="deit_small_patch16_224", kwargs={"img_size": 64}, batch=4, classes=1000),
    "digits-vit demo": dict(name="digits-vit", kwargs={}, batch=64, classes=10),
}

DEVICE = torch.device("cpu")
AMP = False
RECOMPUTE = False


def build(case: dict, masked: bool, compiled: bool = False):
    from vitslim_core import add_masks
    from vitslim_core.models import build_model
    from vitslim_core.train import CompiledModel, param_groups
    torch.manual_seed(0)
    model, _ = build_model(case["name"], **case["kwargs"])
    if masked:
        add_masks(model, recompute_norms=RECOMPUTE)
    model.train().to(DEVICE)
    opt = torch.optim.AdamW(param_groups(model, 0.05, 1e-4, 1e-3), lr=1e-4, foreach=True)  # as run_loop
    c, h, w = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    if compiled:
        model = CompiledModel(model)
    x = torch.randn(case["batch"], c, h, w, device=DEVICE)
    y = torch.randint(0, case["classes"], (case["batch"],), device=DEVICE)
    return model, opt, x, y


def step(model, opt, x, y, masked: bool) -> None:
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=AMP):
        loss = F.cross_entropy(model(x), y)
        if masked:
            loss = loss + _masks(model).l1_loss(2e-4, 5e-5, 1e-4)  # as the search step
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _masks(model):
    return getattr(model, "_orig_mod", model).slim_masks


def count_ops(case: dict, masked: bool, compiled: bool = False) -> int:
    """Operations of one step (after a warm-up step): aten ops dispatched (eager), or generated kernels
    plus top-level aten calls (compiled)."""
    model, opt, x, y = build(case, masked, compiled)
    if not compiled:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.n += 1
                return func(*args, **(kwargs or {}))

        step(model, opt, x, y, masked)
        with Count() as c:
            step(model, opt, x, y, masked)
        return c.n
    import torch._inductor.metrics as metrics
    metrics.reset()
    step(model, opt, x, y, masked)  # compiles the forward and the backward graph
    kernels = metrics.generated_kernel_count
    step(model, opt, x, y, masked)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, opt, x, y, masked)
    skip = ("aten::empty", "aten::resize", "aten::as_strided", "aten::set_")  # buffer bookkeeping, no kernel
    calls = sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")
                and not e.name.startswith(skip))
    return kernels + calls


def time_case(case: dict, rounds: int, steps: int, compiled: bool = False) -> dict:
    runs = {m: build(case, m, compiled) for m in (False, True)}
    for m, (model, opt, x, y) in runs.items():
        step(model, opt, x, y, m)  # warm-up
    times = {False: [], True: []}
    for _ in range(rounds):
        for m, (model, opt, x, y) in runs.items():
            _sync()
            t = time.perf_counter()
            for _ in range(steps):
                step(model, opt, x, y, m)
            _sync()
            times[m].append((time.perf_counter() - t) / steps)
    return {m: statistics.median(v) for m, v in times.items()}


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cuda_peak(case: dict, masked: bool, steps: int) -> tuple[float, float]:
    """Peak CUDA memory (MiB) over ``steps`` steps and its growth above the state after a warm-up step."""
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    model, opt, x, y = build(case, masked)
    step(model, opt, x, y, masked)
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step(model, opt, x, y, masked)
    _sync()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, x, y
    return peak / 2**20, (peak - base) / 2**20


def peak_memory(case_name: str, masked: bool, steps: int) -> tuple[float, float]:
    """Max RSS growth (MiB) while running ``steps`` steps, in a fresh process."""
    code = f"""
import json, resource, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import bench_search_step as b
torch.set_num_threads(torch.get_num_threads())
b.RECOMPUTE = {RECOMPUTE}
model, opt, x, y = b.build(b.CASES[{case_name!r}], {masked})
b.step(model, opt, x, y, {masked})
import gc; gc.collect()
with open('/proc/self/status') as f:
    rss = [int(l.split()[1]) for l in f if l.startswith('VmRSS')][0]
for _ in range({steps}):
    b.step(model, opt, x, y, {masked})
with open('/proc/self/status') as f:
    peak = [int(l.split()[1]) for l in f if l.startswith('VmHWM')][0]
print(json.dumps({{"rss_kb": rss, "peak_kb": peak}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak_kb"] / 1024, (r["peak_kb"] - r["rss_kb"]) / 1024


def _table(head: tuple, body: list) -> None:
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    for row in [head, *body]:
        print("  ".join(v.rjust(n) for v, n in zip(row, w)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 4 for DeiT-S, fewer rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (as vitslim search does on CUDA)")
    ap.add_argument("--batch", type=int, help="DeiT-S / EVA02-S batch size (default 8 on CPU, 64 on CUDA)")
    ap.add_argument("--case", action="append", default=[], help="run only cases whose name contains this")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile-d steps and count their kernels")
    ap.add_argument("--recompute-norms", action="store_true", help="masks recompute their norms in backward")
    ap.add_argument("--no-ops", action="store_true", help="skip the operation counts")
    ap.add_argument("--no-time", action="store_true", help="only the operation counts")
    args = ap.parse_args()
    global DEVICE, AMP, RECOMPUTE
    DEVICE, AMP, RECOMPUTE = torch.device(args.device), args.amp, args.recompute_norms
    torch.set_num_threads(args.threads)
    for name in [n for n in CASES if args.case and not any(c in n for c in args.case)]:
        del CASES[name]
    big = [n for n in BIG if n in CASES]
    if args.quick:
        for n in big:
            CASES[n]["batch"] = 4
    rounds, steps = (3, 2) if args.quick else (5, 3)
    if DEVICE.type == "cuda":
        for n in big:
            CASES[n]["batch"] = 64
        if "digits-vit demo" in CASES:
            CASES["digits-vit demo"]["batch"] = 256
        rounds, steps = 7, 10
    if args.batch:
        for n in big:
            CASES[n]["batch"] = args.batch
    modes = [False, True] if args.compile else [False]
    where = (f"CUDA {torch.cuda.get_device_name()}{', bf16 autocast' if AMP else ', fp32'}; peak = CUDA allocator"
             if DEVICE.type == "cuda" else f"CPU, {args.threads} threads")
    where += ", masks recompute norms" if RECOMPUTE else ""
    if not args.no_ops:
        body = []
        for name, case in OPS_CASES.items():
            for c in modes:
                n0, n1 = count_ops(case, False, c), count_ops(case, True, c)
                body.append((name, "compiled" if c else "eager", str(n0), str(n1), f"{n1 / n0:.3f}x"))
        _table(("model", "mode", "plain ops/step", "search ops/step", "ops ratio"), body)
        print(f"({where}; eager: aten ops dispatched; compiled: generated kernels + top-level aten calls; "
              f"target: ops ratio <= 1.25x)\n")
    if args.no_time:
        return
    rows = []
    for name, case in CASES.items():
        for c in modes:
            small = DEVICE.type == "cpu" and not args.quick and "rounds" in case
            t = time_case(case, case["rounds"] if small else rounds, case["steps"] if small else steps, c)
            if c:
                rows.append((name, case["batch"], "compiled", t[False] * 1e3, t[True] * 1e3, t[True] / t[False]))
                continue
            if DEVICE.type == "cuda":
                (pk0, grow0), (pk1, grow1) = cuda_peak(case, False, 2), cuda_peak(case, True, 2)
            else:
                (pk0, grow0), (pk1, grow1) = peak_memory(name, False, 2), peak_memory(name, True, 2)
            rows.append((name, case["batch"], "eager", t[False] * 1e3, t[True] * 1e3, t[True] / t[False], pk0, pk1,
                         pk1 / pk0, grow0, grow1))
    head = ("model", "batch", "mode", "plain ms/step", "search ms/step", "time ratio", "plain peak MiB",
            "search peak MiB", "peak ratio", "plain step growth MiB", "search step growth MiB")
    body = [(r[0], str(r[1]), r[2], f"{r[3]:.1f}", f"{r[4]:.1f}", f"{r[5]:.3f}x",
             *((f"{r[6]:.0f}", f"{r[7]:.0f}", f"{r[8]:.3f}x", f"{r[9]:.0f}", f"{r[10]:.0f}") if len(r) > 6
               else ("-",) * 5)) for r in rows]
    _table(head, body)
    print(f"({where}; target: time ratio and peak ratio <= 1.10x)")
    if any(r[2] == "compiled" for r in rows):
        plain = {(r[0], r[2]): r[3] for r in rows}
        srch = {(r[0], r[2]): r[4] for r in rows}
        for name in CASES:
            print(f"{name}: compiled / eager step time: plain {plain[(name, 'compiled')] / plain[(name, 'eager')]:.3f}x, "
                  f"search {srch[(name, 'compiled')] / srch[(name, 'eager')]:.3f}x")


if __name__ == "__main__":
    main()
