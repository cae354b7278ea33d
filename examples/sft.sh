#!/usr/bin/env bash
# Instruction tuning: chat data (preprocessed with --format chat), loss on assistant turns only. This file
# holds the recipe as arrays of the trainer's flags; the launcher variables (listed by --help) replace its
# values.
# Checkpoints:
#   SFT_CKPT (default checkpoints/sft)      --save; resumed when it already holds a checkpoint
#   INIT_CKPT (default: STAGE3_CKPT, else checkpoints/stage3)
#                                           --load --finetune: the weights to start from (any stage)
# Example (CPU, minutes; from a stage-1 checkpoint):
#   PRESET=tiny DATA_PATH=demo_out/data/sft TOKENIZER_MODEL=demo_out/tokenizer/tokenizer.model \
#     INIT_CKPT=checkpoints/stage1 SFT_CKPT=/tmp/sft SPLIT=100,0,0 TRAIN_ITERS=20 bash examples/sft.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"

# SOLO-7B on 8 GPUs (TP=2 x DP=4), the pre-training recipe on chat data.
MODEL_ARGS=(
    --model solo-7b                            # Mistral-7B-v0.1 + the patch embedding (model/config.py)
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --use-distributed-optimizer
)
TRAINING_ARGS=(
    --seq-length 32768                         # conversations packed to 32768 tokens
    --micro-batch-size 1
    --global-batch-size 128
    --train-iters "$TRAIN_ITERS"
    --lr 5e-5 --min-lr 5e-6 --lr-decay-style cosine --lr-warmup-iters 200
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
    --bf16
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --seed 1234
)
DATA_ARGS=(
    --data-path "$DATA_PATH"                   # chat data, or a blend "W1 PREFIX1 W2 PREFIX2 ..."
    --split 99,1,0
    --tokenizer-model "$TOKENIZER_MODEL"
    --loss-role assistant                      # the loss on assistant turns only
)
EVAL_AND_LOGGING_ARGS=(
    --save-interval 500 --eval-interval 500 --eval-iters 10 --log-interval 1
    --exit-signal-handler                      # SIGTERM (preemption): save, then exit 0
)
SAVE_VAR=SFT_CKPT INIT_VAR=INIT_CKPT  # named in error lines
run_phase "instruction tuning" "${SFT_CKPT:-checkpoints/sft}" "${INIT_CKPT:-${STAGE3_CKPT:-checkpoints/stage3}}" "$@"
