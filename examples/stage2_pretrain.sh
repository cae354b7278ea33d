#!/usr/bin/env bash
# SOLO stage 2: web-scale captions and OCR (CapFusion, CC3M, detailed captions, WebSight, LLaVAR, DVQA,
# OCR-VQA, FigureQA) plus text. This file holds the recipe as arrays of the trainer's flags; the launcher
# variables (listed by --help) replace its values.
# Checkpoints:
#   STAGE2_CKPT (default checkpoints/stage2)  --save; resumed when it already holds a checkpoint
#   STAGE1_CKPT (default checkpoints/stage1)  --load --finetune: stage 1's final weights
# Example (CPU, minutes):
#   PRESET=tiny DATA_PATH=demo_out/data/pretrain TOKENIZER_MODEL=demo_out/tokenizer/tokenizer.model \
#     STAGE1_CKPT=/tmp/s1 STAGE2_CKPT=/tmp/s2 TRAIN_ITERS=10 bash examples/stage2_pretrain.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"

# SOLO-7B on 8 GPUs (TP=2 x DP=4), as in the paper's stage 2.
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
    --data-path "$DATA_PATH"                   # a blend "W1 PREFIX1 W2 PREFIX2 ..." of the sources above
    --split 99,1,0
    --tokenizer-model "$TOKENIZER_MODEL"
    --loss-role assistant                      # documents: every text token
)
EVAL_AND_LOGGING_ARGS=(
    --save-interval 500 --eval-interval 500 --eval-iters 10 --log-interval 1
    --exit-signal-handler                      # SIGTERM (preemption): save, then exit 0
)
SAVE_VAR=STAGE2_CKPT INIT_VAR=STAGE1_CKPT  # named in error lines
run_phase "stage 2 pre-training" "${STAGE2_CKPT:-checkpoints/stage2}" "${STAGE1_CKPT:-checkpoints/stage1}" "$@"
