#!/usr/bin/env bash
# The quick start (`make demo`). Until the full digits demo lands, it runs the parts that exist.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo_out}
mkdir -p "$OUT"
echo "== [1/1] SOLO tokenizer from the real Mistral-7B-v0.1 tokenizer (mistral-common)"
$PY tools/create_solo_tokenizer.py --base mistral-common --output "$OUT/tokenizer"
