#!/usr/bin/env bash
# SOLO stage 1: build visual features from scratch on ImageNet-21k ("image, then class name")
# plus ~30% text. Starts from INIT_CKPT (a Mistral converted with
# `tools/convert_checkpoint.py hf-to-megatron`), or from scratch when INIT_CKPT is empty. This file holds
# the recipe as arrays of the trainer's flags; the launcher variables (listed by --help) replace its values.
# Checkpoints:
#   STAGE1_CKPT (default checkpoints/stage1)  --save; resumed when it already holds a checkpoint
#   INIT_CKPT (default: none)                 --load --finetune: the converted Mistral to start from
#   BASE_HF (default: none)                   instead: a Hugging Face base of any family, converted once
#                                             into BASE_CKPT; its architecture and SOLO tokenizer are used
# Example (full scale; PRESET=tiny and a small DATA_PATH make it a CPU run of minutes):
#   DATA_PATH="0.7 data/in21k 0.3 data/slimpajama" TOKENIZER_MODEL=tok/tokenizer.model \
#   INIT_CKPT=checkpoints/mistral-init TRAIN_ITERS=... bash examples/stage1_pretrain.sh
# FROM_STAGE0=1 starts instead from the optional alignment stage's checkpoint (STAGE0_CKPT, default
# checkpoints/stage0, made by examples/stage0_align.sh), weights only.
set -euo pipefail
source "$(dirname "$0")/common.sh"

# SOLO-7B on 8 GPUs (TP=2 x DP=4), as in the paper's stage 1.
MODEL_ARGS=(
    --model solo-7b                            # Mistral-7B-v0.1 + the patch embedding (model/config.py)
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --use-distributed-optimizer
)
TRAINING_ARGS=(
    --seq-length 32768                         # documents packed to 32768 tokens
    --micro-batch-size 1
    --global-batch-size 128                    # ~4M tokens a step
    --train-iters "$TRAIN_ITERS"
    --lr 5e-5 --min-lr 5e-6 --lr-decay-style cosine --lr-warmup-iters 200
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
    --bf16
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --seed 1234
)
DATA_ARGS=(
    --data-path "$DATA_PATH"                   # e.g. "0.7 data/in21k 0.3 data/slimpajama"
    --split 99,1,0
    --tokenizer-model "$TOKENIZER_MODEL"
    --loss-role assistant                      # documents: every text token
)
EVAL_AND_LOGGING_ARGS=(
    --save-interval 500 --eval-interval 500 --eval-iters 10 --log-interval 1
    --exit-signal-handler                      # SIGTERM (preemption): save, then exit 0
)
SAVE_VAR=STAGE1_CKPT INIT_VAR=INIT_CKPT USE_BASE=1  # named in error lines; BASE_HF starts this phase
init_ckpt=${INIT_CKPT:-}
if [[ "${FROM_STAGE0:-0}" == 1 ]]; then init_ckpt=${STAGE0_CKPT:-checkpoints/stage0}; INIT_VAR=STAGE0_CKPT USE_BASE=0; fi
run_phase "stage 1 pre-training" "${STAGE1_CKPT:-checkpoints/stage1}" "$init_ckpt" "$@"
