#!/usr/bin/env bash
# `make bench`: every benchmark at modest default sizes, each printing its ratio against a baseline
# measured in the same run (docs/BENCHMARKS.md records command, machine and results).
# The GPU check runs here as its CPU dry run only; on a GPU machine run benchmarks/gpu_check.sh itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${BENCH_OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
run() {
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -e '^W[0-9]' -e 'DEPRECATED' -e 'Warning'
}
run train_step $PY benchmarks/train_step.py --repeats 5
run qwen3_step $PY benchmarks/qwen3_step.py --seq-length 128 --micro-batch-size 4 --repeats 5
run vision_experts_step $PY benchmarks/vision_experts_step.py --threads 1 --repeats 7 --warmup 2
run vision_experts_memory $PY benchmarks/vision_experts_step.py --memory --threads 1 --warmup 2 --steps 3
run loader $PY benchmarks/loader.py --samples 10000 --work "$OUT/loader"
run preprocess $PY benchmarks/preprocess.py --docs 120 --rss-docs 100
run convert $PY benchmarks/convert.py --work "$OUT/convert"
run checkpoint_save $PY benchmarks/checkpoint_save.py --repeats 5
run gpu_check_dry env OUT="$OUT/gpu_dry" bash benchmarks/gpu_check.sh --cpu-dry-run
echo "== logs in $OUT/"
