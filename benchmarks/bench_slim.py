"""Dense vs physically slimmed DeiT-S: measured throughput speedup against the FLOPs ratio.

Random weights and random scores (timing depends only on the kept widths): plans from the FLOPs
solver at 70% and 50% of dense FLOPs, which contain ragged heads, removed heads, narrower MLPs and
dropped tokens. Models are timed in interleaved rounds in one process.

    python benchmarks/bench_slim.py                      # CPU, batch 32, 2 threads
    python benchmarks/bench_slim.py --device cuda        # on a GPU machine
    python benchmarks/bench_slim.py --multiple 1         # no width rounding
    python benchmarks/bench_slim.py --compile            # every model torch.compile-d (nn.Module.compile)
Target: speedup >= 0.9 x (1 / FLOPs ratio), i.e. efficiency >= 0.9.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--multiple", type=int, default=None, help="width rounding (default: automatic)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (in place)")
    args = ap.parse_args()
    import timm
    from vitslim_core import MaskScores, arch_spec, plan_for_flops, slim_model
    from vitslim_core.bench import compare_latency, format_table
    from vitslim_core.plan import BudgetWarning

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    spec = arch_spec(model, args.model)
    g = torch.Generator().manual_seed(0)
    sc = MaskScores.dense(spec)
    sc.attn = [torch.rand(t.shape, generator=g) for t in sc.attn]
    sc.mlp = [torch.rand(t.shape, generator=g) for t in sc.mlp]
    sc.token = [torch.randn(t.shape, generator=g) for t in sc.token]
    slims = {}
    for b in (float(x) for x in args.budgets.split(",")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)
            plan = plan_for_flops(sc, b, multiple=args.multiple)
        layers = plan.layers()
        ragged = sum(len(set(d for d in r["dims_per_head"] if d)) > 1 for r in layers)
        removed = sum(r["dims_per_head"].count(0) for r in layers)
        print(f"plan {b:.2f}: {ragged} layers with ragged heads, {removed} heads removed, "
              f"MLP widths {min(r['mlp'] for r in layers)}-{max(r['mlp'] for r in layers)}, "
              f"tokens {min(r['tokens'] for r in layers)}-{max(r['tokens'] for r in layers)} of {spec.num_patches}")
        slims[f"slim {b:.2f}"] = slim_model(model, plan).to(args.device)
    model = model.to(args.device)
    if args.compile:  # in place: the modules keep their attributes (input shape, cost model)
        for m in (model, *slims.values()):
            m.compile()
    rows = compare_latency(model, slims, batch_size=args.batch, runs=args.runs, warmup=2,
                           threads=args.threads if args.device == "cpu" else None, device=args.device,
                           rounds=args.rounds)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"{args.model}, batch {args.batch}, {dev}{', torch.compile' if args.compile else ''}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
