#!/usr/bin/env bash
# GPU checks, run on a CUDA machine from the repo root (prints everything; nothing here runs in CI):
#   1. search step vs plain step on CUDA (bf16 autocast and fp32, batch 64 and 256): operations per step,
#      time and peak allocator memory, eager and torch.compile-d (--compile);
#   2. dense vs slim DeiT-S throughput on CUDA, eager and torch.compile-d;
#   3. a CUDA + AMP search killed with SIGKILL after a checkpoint, resumed, compared with an
#      uninterrupted run; then retraining with AMP and evaluation of the slim model.
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (SKIP_STEP=1: skip part 1)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/vitslim-gpu}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} VITSLIM_NO_PROGRESS=1 PYTHONUNBUFFERED=1
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

if [ -z "${SKIP_STEP:-}" ]; then
  echo "== 1. search step vs plain step"
  $PY benchmarks/bench_search_step.py --device cuda --amp --compile
  $PY benchmarks/bench_search_step.py --device cuda --amp --batch 256 --compile --no-ops
  $PY benchmarks/bench_search_step.py --device cuda --compile --no-ops
  $PY benchmarks/bench_search_step.py --device cuda --batch 256 --compile --no-ops
  $PY benchmarks/bench_search_step.py --device cuda --amp --recompute-norms --no-ops  # norm recompute on
fi

echo "== 2. dense vs slim DeiT-S"
$PY benchmarks/bench_slim.py --device cuda --batch 256
$PY benchmarks/bench_slim.py --device cuda --batch 256 --compile

echo "== 3. CUDA + AMP search, SIGKILL, resume"
S="search --data digits --device cuda --batch-size 64 --max-steps 60 --checkpoint-every 5 --log-every 5 --seed 2 --lr 1e-3 --mask-lr 1e-2"
$PY -m vitslim_core $S --out "$OUTDIR/ref" >/dev/null || echo "reference search FAILED"
$PY -m vitslim_core $S --out "$OUTDIR/crash" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 600); do  # at most 60 s for a checkpoint past step 20
  step=$($PY -c "import json,sys; print(json.load(open(sys.argv[1])).get('step', 0))" "$OUTDIR/crash/history.json" 2>/dev/null || echo 0)
  [ "$step" -ge 20 ] && break
  sleep 0.1
done
kill -9 $pid; wait $pid 2>/dev/null
echo "killed at step >= $step"
$PY -m vitslim_core $S --out "$OUTDIR/crash" --resume >/dev/null || echo "resume FAILED"
$PY - "$OUTDIR" <<'EOF'
import sys, torch
from vitslim_core.run_folder import load_run
a, _ = load_run(sys.argv[1] + "/ref"); b, _ = load_run(sys.argv[1] + "/crash")
d = max(float((x - y).abs().max()) for x, y in zip(a.attn + a.mlp + a.token, b.attn + b.mlp + b.token))
print(f"resumed vs uninterrupted CUDA/AMP search: max |score difference| = {d:.3g}; complete={b.meta['complete']}")
EOF
$PY -m vitslim_core retrain "$OUTDIR/ref" --flops 0.5 --device cuda --epochs 2 --batch-size 64 --out "$OUTDIR/rt" \
  | tail -3 || echo "retrain FAILED"
$PY -m vitslim_core eval "$OUTDIR/rt/best" --device cuda 2>&1 | tail -3 || echo "eval FAILED"
$PY -m vitslim_core eval "$OUTDIR/rt/best" --device cpu 2>&1 | tail -1

echo "== 4. --compile on CUDA: the search of part 3 compiled (bf16: close, not bitwise), then a compiled retrain"
$PY -m vitslim_core $S --compile --out "$OUTDIR/compiled" >/dev/null || echo "compiled search FAILED"
$PY - "$OUTDIR" <<'EOF'
import sys
from vitslim_core.run_folder import load_run
a, _ = load_run(sys.argv[1] + "/ref"); b, _ = load_run(sys.argv[1] + "/compiled")
d = max(float((x - y).abs().max()) for x, y in zip(a.attn + a.mlp + a.token, b.attn + b.mlp + b.token))
print(f"compiled vs eager CUDA/AMP search: max |score difference| = {d:.3g}")
EOF
$PY -m vitslim_core retrain "$OUTDIR/ref" --flops 0.5 --device cuda --epochs 2 --batch-size 64 --compile \
  --out "$OUTDIR/rt_compiled" | tail -3 || echo "compiled retrain FAILED"
