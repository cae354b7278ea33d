# Shared by the phase launchers: distributed settings (torchrun or SLURM), PRESET=tiny defaults,
# and the one command that starts training. Every value can be overridden from the environment.
# Sourced, not run.

REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
PRESET=${PRESET:-solo-7b}

# --- where the processes come from: SLURM when present, else plain torchrun variables -------------
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ "$PRESET" == "tiny" ]]; then
  # A CPU-sized run of the same launcher: 2 processes over gloo, a few iterations.
  GPUS_PER_NODE=${GPUS_PER_NODE:-2}
  TP=${TP:-2}; PP=${PP:-1}
  SEQ_LENGTH=${SEQ_LENGTH:-128}
  MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
  GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}
  TRAIN_ITERS=${TRAIN_ITERS:-6}
  LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-1}
  LR=${LR:-1e-3}; MIN_LR=${MIN_LR:-1e-4}
  PRECISION_ARGS=${PRECISION_ARGS:-}
  RECOMPUTE_ARGS=${RECOMPUTE_ARGS:-}
  SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
  EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
  EVAL_ITERS=${EVAL_ITERS:-1}
  LOG_INTERVAL=${LOG_INTERVAL:-1}
else
  # SOLO-7B's recipe on 8 GPUs (SOLO_SPEC): TP=2, DP=4, seq 32768 packed, global batch 128.
  GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  TP=${TP:-2}; PP=${PP:-1}
  SEQ_LENGTH=${SEQ_LENGTH:-32768}
  MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
  GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-128}
  LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-200}
  LR=${LR:-5e-5}; MIN_LR=${MIN_LR:-5e-6}
  PRECISION_ARGS=${PRECISION_ARGS:---bf16}
  RECOMPUTE_ARGS=${RECOMPUTE_ARGS:---recompute-granularity full --recompute-method uniform --recompute-num-layers 1}
  SAVE_INTERVAL=${SAVE_INTERVAL:-500}
  EVAL_INTERVAL=${EVAL_INTERVAL:-500}
  EVAL_ITERS=${EVAL_ITERS:-10}
  LOG_INTERVAL=${LOG_INTERVAL:-1}
fi
WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}
CLIP_GRAD=${CLIP_GRAD:-1.0}
LOSS_ROLE=${LOSS_ROLE:-assistant}
SEED=${SEED:-1234}
DIST_OPT_ARGS=${DIST_OPT_ARGS:---use-distributed-optimizer}
EXTRA_ARGS=${EXTRA_ARGS:-}

# run_phase NAME SAVE_DIR INIT_CKPT [extra train flags...]
# Resumes SAVE_DIR when it holds a checkpoint; otherwise starts from INIT_CKPT with --finetune
# (weights only: how each stage starts from the previous one), or from scratch when INIT_CKPT is empty.
run_phase() {
  local name=$1 save_dir=$2 init_ckpt=$3; shift 3
  : "${DATA_PATH:?set DATA_PATH to the data blend, PREFIX or W1 PREFIX1 W2 PREFIX2 ...}"
  : "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the SOLO tokenizer.model (tools/create_solo_tokenizer.py)}"
  : "${TRAIN_ITERS:?set TRAIN_ITERS (or TRAIN_SAMPLES via EXTRA_ARGS)}"
  local load_args=()
  if [[ -f "$save_dir/latest_checkpointed_iteration.txt" ]]; then
    load_args=(--load "$save_dir")
  elif [[ -n "$init_ckpt" ]]; then
    load_args=(--load "$init_ckpt" --finetune)
  fi
  local valid_args=()
  [[ -n "${VALID_DATA_PATH:-}" ]] && valid_args=(--valid-data-path $VALID_DATA_PATH)
  local tb_args=()
  [[ -n "${TENSORBOARD_DIR:-}" ]] && tb_args=(--tensorboard-dir "$TENSORBOARD_DIR")
  echo "== $name: $NNODES node(s) x $GPUS_PER_NODE process(es), TP=$TP PP=$PP, preset $PRESET, save $save_dir" >&2
  # shellcheck disable=SC2086
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_solo.train \
    --model "$PRESET" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" $DIST_OPT_ARGS \
    --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" \
    --train-iters "$TRAIN_ITERS" \
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$LR_WARMUP_ITERS" \
    --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD" --adam-beta1 0.9 --adam-beta2 0.95 \
    $PRECISION_ARGS $RECOMPUTE_ARGS \
    --data-path $DATA_PATH "${valid_args[@]}" --split "${SPLIT:-99,1,0}" \
    --tokenizer-model "$TOKENIZER_MODEL" --loss-role "$LOSS_ROLE" --seed "$SEED" \
    --save "$save_dir" --save-interval "$SAVE_INTERVAL" "${load_args[@]}" \
    --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL" \
    "${tb_args[@]}" --exit-signal-handler \
    "$@" $EXTRA_ARGS
}
