# Shared by the phase launchers (sourced, not run). A phase script writes its recipe as Megatron-LM's
# examples do, arrays of the trainer's flags with SOLO-7B's values (MODEL_ARGS, TRAINING_ARGS, DATA_ARGS,
# ...), then calls `run_phase`. This file holds what all phases share: the table of launcher variables,
# torchrun's arguments, `--help`, the pre-flight check and the one command that starts training.

REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}

# --- The launcher variables: one row each, the one place where a variable is tied to its flag ------------
# A variable set in the environment replaces its flag's value in the phase's recipe (or in DISTRIBUTED_ARGS);
# under PRESET=tiny the TINY column does where it has a value ('-': the recipe's; 'none': no flags), so the
# same launcher makes a 2-process CPU run. KIND: `value`, one word; `words`, split on spaces (a blend);
# `flags`, flags as given in place of the listed ones (set but empty: none of them); `torchrun`, a value of
# torchrun's. A flag the recipe leaves out is added when its variable is set. The same rows make `--help`
# and tell the pre-flight which variable an `error:` line names.
LAUNCHER_VARS=(
  # VARIABLE        KIND     FLAG(S)                         TINY  WHAT
  "PRESET            value    --model                         -     solo-7b | tiny (tiny also sets the TINY column of common.sh)"
  "BASE_HF           base     --load,--finetune               -  a Hugging Face base of any family (Mistral, Llama-3.x, Qwen2/2.5/3) to start stage 0/1 from: converted once into BASE_CKPT (default checkpoints/base-<its name>); every phase takes the architecture from the checkpoint it starts from (no --model), not PRESET; TOKENIZER_MODEL defaults to the converted base's SOLO tokenizer"
  "GPUS_PER_NODE     torchrun --nproc-per-node                2"
  "NNODES            torchrun --nnodes                        -     (SLURM: the job's nodes)"
  "NODE_RANK         torchrun --node-rank                     -     (SLURM: SLURM_NODEID)"
  "MASTER_ADDR       torchrun --master-addr                   -     (SLURM: the job's first host)"
  "MASTER_PORT       torchrun --master-port                   -"
  "TP                value    --tensor-model-parallel-size    -"
  "PP                value    --pipeline-model-parallel-size  -"
  "DIST_OPT_ARGS     flags    --use-distributed-optimizer     -"
  "SEQ_LENGTH        value    --seq-length                    128"
  "MICRO_BATCH_SIZE  value    --micro-batch-size              4"
  "GLOBAL_BATCH_SIZE value    --global-batch-size             8"
  "TRAIN_ITERS       value    --train-iters                   6     required at full scale"
  "LR                value    --lr                            1e-3"
  "MIN_LR            value    --min-lr                        1e-4"
  "LR_WARMUP_ITERS   value    --lr-warmup-iters               1"
  "WEIGHT_DECAY      value    --weight-decay                  -"
  "CLIP_GRAD         value    --clip-grad                     -"
  "PRECISION_ARGS    flags    --bf16,--fp16,--fp8-format      none  e.g. \"--bf16 --fp8-format hybrid\" (TE)"
  "RECOMPUTE_ARGS    flags    --recompute-granularity,--recompute-method,--recompute-num-layers none"
  "DATA_PATH         words    --data-path                     -     required: PREFIX or \"W1 PREFIX1 W2 PREFIX2 ...\""
  "VALID_DATA_PATH   words    --valid-data-path               -     held-out prefixes (then SPLIT is unused)"
  "SPLIT             value    --split                         -     train,valid,test of the packs (100,0,0: all train)"
  "TOKENIZER_MODEL   value    --tokenizer-model               -     required (tools/create_solo_tokenizer.py)"
  "LOSS_ROLE         value    --loss-role                     -"
  "SEED              value    --seed                          -"
  "SAVE_INTERVAL     value    --save-interval                 1000"
  "EVAL_INTERVAL     value    --eval-interval                 1000"
  "EVAL_ITERS        value    --eval-iters                    1"
  "LOG_INTERVAL      value    --log-interval                  -"
  "TENSORBOARD_DIR   value    --tensorboard-dir               -"
)
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended last, after the script's own arguments: any flag of the trainer

# torchrun's arguments: one node of 8 GPUs unless the table's variables (or SLURM) say otherwise.
DISTRIBUTED_ARGS=(
    --nproc-per-node 8
    --nnodes 1
    --node-rank 0
    --master-addr 127.0.0.1
    --master-port 29500
)
if [[ -n "${SLURM_JOB_ID:-}" ]]; then  # one task per node (slurm_submit.sh): SLURM says where this one is
  NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
  if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
fi
DRY_RUN=${DRY_RUN:-0}  # 1: plan the job in one process (--dry-run), no data needed
if [[ "$DRY_RUN" == 1 ]]; then  # placeholders where the plan needs no input (tiny has its TRAIN_ITERS)
  DATA_PATH=${DATA_PATH:-none}
  [[ "${PRESET:-}" == tiny ]] || TRAIN_ITERS=${TRAIN_ITERS:-1}
fi
# The recipes name these as Megatron-LM's examples name theirs ("$DATA_PATH"): inputs without a default,
# empty when not given (run_phase then says which to set).
DATA_PATH=${DATA_PATH:-} TOKENIZER_MODEL=${TOKENIZER_MODEL:-} TRAIN_ITERS=${TRAIN_ITERS:-}

# apply_launcher_vars torchrun|trainer TOKENS...: TOKENS with the table's rows of that kind applied (the
# `torchrun` rows to torchrun's arguments, the others to the trainer's), into APPLIED. Each row's value in
# effect goes into NOW[VARIABLE]; a flag left without a value puts its variable into UNSET (a required input).
declare -A NOW=()
UNSET=()
apply_launcher_vars() {
  local scope=$1; shift
  local tokens=("$@") row var kind flags tiny what i override have
  for row in "${LAUNCHER_VARS[@]}"; do
    read -r var kind flags tiny what <<<"$row"
    [[ $kind == base ]] && continue  # run_phase's start (base_start), not a flag of the recipe
    [[ ($scope == torchrun && $kind == torchrun) || ($scope != torchrun && $kind != torchrun) ]] || continue
    have=0  # the override: the environment's value, else the TINY column's under PRESET=tiny
    if [[ $kind == flags ]]; then [[ -n "${!var+x}" ]] && { override=${!var}; have=1; }
    elif [[ -n "${!var:-}" ]]; then override=${!var}; have=1
    fi
    if ((!have)) && [[ "${PRESET:-}" == tiny && $tiny != - ]]; then override=${tiny/#none/}; have=1; fi
    # Take the row's flags out of the tokens with the words that follow each (up to the next flag; one
    # for a `value`); the value in effect goes back where the first of them stood.
    local kept=() value=() at=-1
    for ((i = 0; i < ${#tokens[@]}; i++)); do
      if [[ ",$flags," != *",${tokens[i]},"* ]]; then kept+=("${tokens[i]}"); continue; fi
      ((at < 0)) && at=${#kept[@]}
      [[ $kind == flags ]] && value+=("${tokens[i]}")
      while ((i + 1 < ${#tokens[@]})) && [[ ${tokens[i + 1]} != --* ]]; do
        value+=("${tokens[++i]}")
        [[ $kind == value || $kind == torchrun ]] && break
      done
    done
    if ((have)); then
      if [[ $kind == words || $kind == flags ]]; then read -ra value <<<"$override"; else value=("$override"); fi
    elif [[ $kind == words ]]; then
      read -ra value <<<"${value[*]}"  # the recipe's "$DATA_PATH": a blend is several words
    fi
    NOW[$var]="${value[*]}"
    ((at < 0)) && { ((${#value[@]})) || continue; at=${#kept[@]}; }  # a flag the recipe leaves out: added
    if [[ $kind != flags ]]; then
      [[ -z "${value[*]}" ]] && { UNSET+=("$var"); value=(""); }
      value=("${flags%%,*}" "${value[@]}")
    fi
    tokens=("${kept[@]:0:at}" "${value[@]}" "${kept[@]:at}")
  done
  APPLIED=("${tokens[@]}")
}

# --- `bash examples/<phase>.sh --help`: the script's own header, then every variable with its value now ----
launcher_help() {
  sed -n '2,/^set -euo pipefail/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  echo
  echo "Variables (environment), their value now (PRESET=${NOW[PRESET]}), and the flag each sets. PRESET=tiny"
  echo "makes a 2-process CPU run (seq 128, a few iterations); the other values are the recipe in $0."
  local row var kind flags tiny what value
  for row in "${LAUNCHER_VARS[@]}"; do
    read -r var kind flags tiny what <<<"$row"
    value=${NOW[$var]-}
    if [[ -z $value && " ${UNSET[*]} " == *" $var "* ]]; then value="<required>"
    elif [[ $kind == words || $kind == flags ]]; then value="\"$value\""
    fi
    [[ $kind == flags ]] && flags="in place of ${flags//,/, }"
    [[ $kind == torchrun ]] && flags="torchrun $flags"
    [[ $kind == base ]] && { value=${BASE_HF:-}; flags="${flags//,/ }"; }
    if [[ $what == "("* ]]; then what=" $what"; elif [[ -n $what ]]; then what=": $what"; fi
    printf '  %-46s %s\n' "$var=$value" "$flags$what"
  done
  printf '  %-46s %s\n' "EXTRA_ARGS=\"$EXTRA_ARGS\"" "appended last: any flag of the trainer" \
    "DRY_RUN=$DRY_RUN" "1: plan the job in one process (--dry-run), no data needed" "PYTHON=$PYTHON" "the interpreter"
  echo "Arguments after the script name go to the trainer too ($PYTHON -m megatron_solo.train --help)."
  echo "The settings are checked (megatron_solo.training.preflight) before torchrun starts its workers:"
  echo "a mistake is one 'error:' line and exit code 2."
}

# run_phase NAME SAVE_DIR INIT_CKPT [the script's arguments...]: the phase's recipe arrays (MODEL_ARGS,
# MODEL_PARALLEL_ARGS, TRAINING_ARGS, DATA_ARGS, EVAL_AND_LOGGING_ARGS) with the launcher variables applied.
# Resumes SAVE_DIR when it holds a checkpoint; otherwise starts from INIT_CKPT with --finetune (weights
# only: how each stage starts from the previous one), or from scratch when INIT_CKPT is empty.
# SAVE_VAR/INIT_VAR (set by the phase script) name the checkpoint variables in error lines.
# base_start: with BASE_HF set, the converted base (BASE_CKPT, converted here when it holds no checkpoint yet,
# the vocabulary padded for the run's TP) becomes the phase's start; its SOLO tokenizer is TOKENIZER_MODEL
# unless that is set. Sets BASE_START (empty without BASE_HF).
base_start() {
  BASE_START=
  [[ -n "${BASE_HF:-}" ]] || return 0
  if [[ ! -f "$BASE_HF/config.json" ]]; then
    echo "error: BASE_HF=$BASE_HF: not a Hugging Face model directory (no config.json); set BASE_HF" >&2; exit 2
  fi
  BASE_CKPT=${BASE_CKPT:-checkpoints/base-$(basename "$BASE_HF")}
  if [[ ! -f "$BASE_CKPT/latest_checkpointed_iteration.txt" ]]; then
    echo "== converting BASE_HF=$BASE_HF into BASE_CKPT=$BASE_CKPT (once; tools/convert_checkpoint.py)" >&2
    "$PYTHON" "$REPO_ROOT/tools/convert_checkpoint.py" hf-to-megatron --hf-dir "$BASE_HF" --save "$BASE_CKPT" \
      --target-tensor-parallel-size "${NOW[TP]:-1}" >&2 || exit $?
  fi
  if [[ -z "${TOKENIZER_MODEL:-}" ]]; then  # the converted checkpoint's copy of SOLO's tokenizer, of the base's kind
    local f
    for f in "$BASE_CKPT"/tokenizer/tokenizer.{model,json}; do [[ -f $f ]] && { TOKENIZER_MODEL=$f; break; }; done
  fi
  BASE_START=$BASE_CKPT
}

run_phase() {
  local name=$1 save_dir=$2 init_ckpt=$3; shift 3
  apply_launcher_vars torchrun "${DISTRIBUTED_ARGS[@]}"
  local torchrun_args=("${APPLIED[@]}")
  apply_launcher_vars trainer "${MODEL_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}"
  case "${1:-}" in -h|--help) launcher_help; exit 0 ;; esac
  # With BASE_HF, every phase takes the architecture from the checkpoint it starts from or resumes (below),
  # and the base's SOLO tokenizer; the phases that start from the base (USE_BASE=1: stage 0, stage 1) start from it.
  if [[ -n "${BASE_HF:-}" ]]; then
    local from_base=0
    [[ "${USE_BASE:-0}" == 1 && ! -f "$save_dir/latest_checkpointed_iteration.txt" ]] && from_base=1
    if ((from_base)) && [[ -n "$init_ckpt" ]]; then
      echo "error: set BASE_HF or ${INIT_VAR:-INIT_CKPT}, not both (each chooses the checkpoint to start from)" >&2
      exit 2
    fi
    base_start
    ((from_base)) && init_ckpt=$BASE_START INIT_VAR=BASE_HF
    UNSET=()  # TOKENIZER_MODEL may be set now: the recipe again
    apply_launcher_vars trainer "${MODEL_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" \
      "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}"
  fi
  local recipe=("${APPLIED[@]}")
  if [[ ${#UNSET[@]} -gt 0 && "$DRY_RUN" != 1 ]]; then
    echo "error: set ${UNSET[0]} (bash $0 --help lists every variable)" >&2
    exit 2
  fi
  local load_var=${INIT_VAR:-INIT_CKPT}
  local load_args=()
  if [[ -f "$save_dir/latest_checkpointed_iteration.txt" ]]; then
    load_args=(--load "$save_dir")
    load_var=${SAVE_VAR:-}
  elif [[ -n "$init_ckpt" ]] && [[ "$DRY_RUN" != 1 || -d "$init_ckpt" ]]; then
    load_args=(--load "$init_ckpt" --finetune)
  fi
  if [[ -n "${BASE_HF:-}" ]] && ((${#load_args[@]})); then
    # The trainer takes the architecture from the checkpoint it starts from when no --model names one
    # (without a checkpoint, a dry run, the preset's stays).
    local kept=() i
    for ((i = 0; i < ${#recipe[@]}; i++)); do
      if [[ ${recipe[i]} == --model ]]; then ((++i)); else kept+=("${recipe[i]}"); fi
    done
    recipe=("${kept[@]}")
  fi
  # shellcheck disable=SC2206  # EXTRA_ARGS is flags as given
  local train_args=("${recipe[@]}" --save "$save_dir" "${load_args[@]}" "$@" $EXTRA_ARGS)
  local gpus=${NOW[GPUS_PER_NODE]} nnodes=${NOW[NNODES]}
  if [[ "$DRY_RUN" == 1 ]]; then  # torchrun's world size, one process: megatron_solo/training/dry_run.py
    WORLD_SIZE=$((gpus * nnodes)) exec "$PYTHON" -m megatron_solo.train "${train_args[@]}" --dry-run
  fi
  # Pre-flight: the trainer's own checks, before torchrun starts its workers (a mistake: one line, exit 2),
  # told by the table which variable sets which flag. torchrun's agent runs it (megatron_solo.training.torchrun
  # --preflight): the quick checks before torch loads, the rest with the torch the agent needs anyway.
  local row var kind flags tiny what flag names=()
  for row in "${LAUNCHER_VARS[@]}"; do
    read -r var kind flags tiny what <<<"$row"
    for flag in ${flags//,/ }; do names+=("${flag#--}=$var"); done
  done
  names+=(${SAVE_VAR:+save=$SAVE_VAR} ${load_var:+load=$load_var finetune=$load_var})
  local arch="preset ${NOW[PRESET]}"
  [[ -n "${BASE_HF:-}" ]] && ((${#load_args[@]})) && arch="the architecture of ${load_args[1]}"
  # then torchrun itself, but Ctrl-C (or a SIGTERM) ends with the workers' save line and how to resume, no traceback
  exec "$PYTHON" -m megatron_solo.training.torchrun \
    --preflight --nproc-per-node "$gpus" --nnodes "$nnodes" --launcher-vars "${names[*]}" \
    --banner "== $name: $nnodes node(s) x $gpus process(es), TP=${NOW[TP]} PP=${NOW[PP]}, $arch, save $save_dir" \
    --torchrun "${torchrun_args[@]}" -m megatron_solo.train "${train_args[@]}"
}
