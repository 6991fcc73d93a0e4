#!/usr/bin/env bash
# Throughput at 1, 2 and 4 data-parallel processes and per-rank training-state memory under
# ZeRO 0/1/2/3, on the tiny config (CPU, gloo). Prints one table; runs go to $OUT (default a
# temporary directory). Usage: tools/parallel_figures.sh [extra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
STEPS="${STEPS:-20}"
PY="${PY:-.venv/bin/python}"
COMMON=(train.steps="$STEPS" train.micro_batch_size=4 train.eval_interval=100000 checkpoint.save_final=false
        logging.wandb_mode=disabled data.cache_dir="$OUT/cache" "$@")

run() {  # name nproc overrides...
    local name=$1 nproc=$2; shift 2
    OMP_NUM_THREADS=$((2 / nproc > 0 ? 2 / nproc : 1)) "$PY" -m torch.distributed.run \
        --nproc_per_node="$nproc" -m sci_scale train "${COMMON[@]}" run.dir="$OUT/$name" "$@" \
        > "$OUT/$name.log" 2>&1
}

run dp1 1
run dp2_zero1 2 parallel.zero_stage=1
run dp4_zero1 4 parallel.zero_stage=1
for z in 0 2 3; do run "dp2_zero$z" 2 parallel.zero_stage=$z; done

"$PY" - "$OUT" <<'PY'
import statistics, sys
from pathlib import Path
from sci_scale.train.metrics import read_metrics
out = Path(sys.argv[1])
print(f"{'run':<11} {'median step':>11} {'tokens/s':>9} {'params MB':>9} {'grads MB':>8} {'optim MB':>8}")
for name in ["dp1", "dp2_zero0", "dp2_zero1", "dp2_zero2", "dp2_zero3", "dp4_zero1"]:
    records = read_metrics(out / name)
    step = statistics.median(r["step_time_s"] for r in records[2:])
    tps = statistics.median(r["tokens_per_s"] for r in records[2:])
    mb = [records[0][f"mem_{k}_mb"] for k in ("params", "grads", "optimizer")]
    params, grads, optim = ("n/a" if v is None else f"{v:.2f}" for v in mb)
    print(f"{name:<11} {step * 1e3:>9.0f}ms {tps:>9,.0f} {params:>9} {grads:>8} {optim:>8}")
PY
