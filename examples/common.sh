# Shared by the phase launchers: distributed settings (torchrun or SLURM), PRESET=tiny defaults,
# `--help`, the pre-flight check and the one command that starts training. Every value can be
# overridden from the environment. Sourced, not run.

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

# --- `bash examples/<phase>.sh --help`: the launcher's own header, then every variable it reads --------
launcher_help() {
  sed -n '2,/^set -euo pipefail/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  echo
  echo "Variables (environment), their value now (PRESET=$PRESET), and what they set. PRESET=tiny makes a"
  echo "2-process CPU run (TP=2, seq 128, a few iterations); the others are SOLO-7B's recipe on 8 GPUs."
  local row='  %-46s %s\n'
  printf "$row" "PRESET=$PRESET" "--model (solo-7b | tiny)"
  printf "$row" "DATA_PATH=${DATA_PATH:-<required>}" "--data-path: PREFIX or \"W1 PREFIX1 W2 PREFIX2 ...\""
  printf "$row" "TOKENIZER_MODEL=${TOKENIZER_MODEL:-<required>}" "--tokenizer-model (tools/create_solo_tokenizer.py)"
  printf "$row" "TRAIN_ITERS=${TRAIN_ITERS:-<required>}" "--train-iters"
  printf "$row" "SPLIT=${SPLIT:-99,1,0}" "--split train,valid,test of DATA_PATH's packs (100,0,0: all train)"
  printf "$row" "VALID_DATA_PATH=${VALID_DATA_PATH:-}" "--valid-data-path: held-out prefixes (SPLIT unused)"
  printf "$row" "GPUS_PER_NODE=$GPUS_PER_NODE NNODES=$NNODES NODE_RANK=$NODE_RANK" "torchrun --nproc-per-node, --nnodes, --node-rank"
  printf "$row" "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" "torchrun --master-addr, --master-port"
  printf "$row" "TP=$TP PP=$PP" "--tensor-model-parallel-size, --pipeline-model-parallel-size"
  printf "$row" "SEQ_LENGTH=$SEQ_LENGTH" "--seq-length"
  printf "$row" "MICRO_BATCH_SIZE=$MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE" "--micro-batch-size, --global-batch-size"
  printf "$row" "LR=$LR MIN_LR=$MIN_LR LR_WARMUP_ITERS=$LR_WARMUP_ITERS" "--lr, --min-lr, --lr-warmup-iters (cosine)"
  printf "$row" "WEIGHT_DECAY=$WEIGHT_DECAY CLIP_GRAD=$CLIP_GRAD" "--weight-decay, --clip-grad (Adam betas 0.9/0.95)"
  printf "$row" "PRECISION_ARGS=\"$PRECISION_ARGS\"" "flags as given (--bf16, --fp8-format hybrid ...)"
  printf "$row" "RECOMPUTE_ARGS=\"$RECOMPUTE_ARGS\"" "flags as given (--recompute-*)"
  printf "$row" "DIST_OPT_ARGS=\"$DIST_OPT_ARGS\"" "flags as given"
  printf "$row" "SAVE_INTERVAL=$SAVE_INTERVAL EVAL_INTERVAL=$EVAL_INTERVAL" "--save-interval, --eval-interval"
  printf "$row" "EVAL_ITERS=$EVAL_ITERS LOG_INTERVAL=$LOG_INTERVAL" "--eval-iters, --log-interval"
  printf "$row" "LOSS_ROLE=$LOSS_ROLE SEED=$SEED" "--loss-role, --seed"
  printf "$row" "TENSORBOARD_DIR=${TENSORBOARD_DIR:-}" "--tensorboard-dir"
  printf "$row" "EXTRA_ARGS=\"$EXTRA_ARGS\"" "appended last: any flag of the trainer"
  printf "$row" "PYTHON=$PYTHON" "the interpreter"
  echo "Arguments after the script name go to the trainer too ($PYTHON -m megatron_solo.train --help)."
  echo "The settings are checked in one process (megatron_solo.training.preflight) before torchrun starts:"
  echo "a mistake is one 'error:' line and exit code 2."
}
case "${1:-}" in -h|--help) launcher_help; exit 0 ;; esac

# run_phase NAME SAVE_DIR INIT_CKPT [extra train flags...]
# Resumes SAVE_DIR when it holds a checkpoint; otherwise starts from INIT_CKPT with --finetune
# (weights only: how each stage starts from the previous one), or from scratch when INIT_CKPT is empty.
run_phase() {
  local name=$1 save_dir=$2 init_ckpt=$3; shift 3
  local missing
  local dry=${DRY_RUN:-0}  # DRY_RUN=1: plan the job in one process (--dry-run), no data needed
  [[ "$dry" == 1 ]] && { DATA_PATH=${DATA_PATH:-none}; TRAIN_ITERS=${TRAIN_ITERS:-1}; TOKENIZER_MODEL=${TOKENIZER_MODEL:-}; }
  for missing in DATA_PATH TOKENIZER_MODEL TRAIN_ITERS; do
    if [[ -z "${!missing:-}" && "$dry" != 1 ]]; then
      echo "error: set $missing (bash $0 --help lists every variable)" >&2
      exit 2
    fi
  done
  # Which launcher variables hold the checkpoints (SAVE_VAR/INIT_VAR, set by the launcher), for error lines.
  local load_var=${INIT_VAR:-INIT_CKPT}
  local load_args=()
  if [[ -f "$save_dir/latest_checkpointed_iteration.txt" ]]; then
    load_args=(--load "$save_dir")
    load_var=${SAVE_VAR:-}
  elif [[ -n "$init_ckpt" ]] && [[ "$dry" != 1 || -d "$init_ckpt" ]]; then
    load_args=(--load "$init_ckpt" --finetune)
  fi
  local valid_args=()
  [[ -n "${VALID_DATA_PATH:-}" ]] && valid_args=(--valid-data-path $VALID_DATA_PATH)
  local tb_args=()
  [[ -n "${TENSORBOARD_DIR:-}" ]] && tb_args=(--tensorboard-dir "$TENSORBOARD_DIR")
  # shellcheck disable=SC2086
  local train_args=(
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
  )
  if [[ "$dry" == 1 ]]; then  # torchrun's world size, one process: megatron_solo/training/dry_run.py
    WORLD_SIZE=$((GPUS_PER_NODE * NNODES)) exec "$PYTHON" -m megatron_solo.train "${train_args[@]}" --dry-run
  fi
  # Pre-flight: the trainer's own checks in one process, before torchrun (a mistake: one line, exit 2).
  local vars="model=PRESET tensor-model-parallel-size=TP pipeline-model-parallel-size=PP seq-length=SEQ_LENGTH
    micro-batch-size=MICRO_BATCH_SIZE global-batch-size=GLOBAL_BATCH_SIZE train-iters=TRAIN_ITERS lr=LR min-lr=MIN_LR
    lr-warmup-iters=LR_WARMUP_ITERS weight-decay=WEIGHT_DECAY clip-grad=CLIP_GRAD data-path=DATA_PATH
    valid-data-path=VALID_DATA_PATH split=SPLIT tokenizer-model=TOKENIZER_MODEL loss-role=LOSS_ROLE seed=SEED
    save-interval=SAVE_INTERVAL eval-interval=EVAL_INTERVAL eval-iters=EVAL_ITERS log-interval=LOG_INTERVAL
    bf16=PRECISION_ARGS fp16=PRECISION_ARGS fp8-format=PRECISION_ARGS recompute-granularity=RECOMPUTE_ARGS
    recompute-method=RECOMPUTE_ARGS ${SAVE_VAR:+save=$SAVE_VAR} ${load_var:+load=$load_var finetune=$load_var}"
  "$PYTHON" -m megatron_solo.training.preflight --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" \
    --launcher-vars "$vars" -- "${train_args[@]}" || exit $?
  echo "== $name: $NNODES node(s) x $GPUS_PER_NODE process(es), TP=$TP PP=$PP, preset $PRESET, save $save_dir" >&2
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_solo.train "${train_args[@]}"
}
