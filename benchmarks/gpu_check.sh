#!/usr/bin/env bash
# The prepared GPU check of issue 8: one H100/H200, no network, at most 8 minutes.
#
# What travels: this repository (megatron_solo from source: the model/training path is pure Python;
# the C++ extension is only needed for preprocessing) and megatron-core as a wheel in .whl/ (ignored
# by git; the GPU image already has torch, numpy, packaging, sentencepiece, psutil, transformers).
# Put the wheel there once, on a machine with pip access, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl megatron-core==0.19.2
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#
# then run it on the device with `.whl` carried:  bash benchmarks/gpu_check.sh
# Here, without a GPU, the same script runs every step at toy size:  bash benchmarks/gpu_check.sh --cpu-dry-run
# Logs and gpu_check.json go to $OUT (the device tool's output folder) or bench_out/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/gpu_check}
mkdir -p "$OUT"
if [[ " $* " == *" --cpu-dry-run "* ]]; then
    PY=${PY:-.venv/bin/python}
else
    PY=${PY:-python3}
fi
if compgen -G ".whl/*.whl" >/dev/null && ! $PY -c "import megatron.core" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
# 470 s for the script leaves the rest of the 8 minutes for the install and the transfers.
set -o pipefail
timeout 470 $PY benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
