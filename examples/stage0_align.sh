#!/usr/bin/env bash
# Optional stage 0 (EVE-style alignment, before SOLO's stage 1): the LLM is frozen (--freeze-lm) and only
# the freshly initialised patch embedding trains, on image-caption data, so that the first updates of the
# new layer do not have to pass through (and disturb) the pretrained LLM. Starts from INIT_CKPT (a Mistral
# converted with `tools/convert_checkpoint.py hf-to-megatron`), or from scratch when INIT_CKPT is empty.
# Stage 1 then continues from it with FROM_STAGE0=1 (see examples/stage1_pretrain.sh, docs/TRAINING.md).
# This file holds the recipe as arrays of the trainer's flags; the launcher variables (listed by --help)
# replace its values.
# Checkpoints:
#   STAGE0_CKPT (default checkpoints/stage0)  --save; resumed when it already holds a checkpoint
#   INIT_CKPT (default: none)                 --load --finetune: the converted Mistral to start from
#   BASE_HF (default: none)                   instead: a Hugging Face base of any family, converted once
#                                             into BASE_CKPT; its architecture and SOLO tokenizer are used
# Example (full scale; PRESET=tiny and a small DATA_PATH make it a CPU run of minutes):
#   DATA_PATH=data/captions TOKENIZER_MODEL=tok/tokenizer.model INIT_CKPT=checkpoints/mistral-init \
#   TRAIN_ITERS=... bash examples/stage0_align.sh
# Only the patch embedding (3072 x hidden) has gradients and Adam state, so a step costs the forward and
# the backward through the activations, not the weight gradients of the LLM. LR/MIN_LR apply to it.
set -euo pipefail
source "$(dirname "$0")/common.sh"

# SOLO-7B on 8 GPUs (TP=2 x DP=4), the pre-training recipe with the LLM frozen.
MODEL_ARGS=(
    --model solo-7b                            # Mistral-7B-v0.1 + the patch embedding (model/config.py)
    --freeze-lm                                # only the patch embedding trains
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
    --data-path "$DATA_PATH"                   # image-caption pairs
    --split 99,1,0
    --tokenizer-model "$TOKENIZER_MODEL"
    --loss-role assistant                      # documents: every text token
)
EVAL_AND_LOGGING_ARGS=(
    --save-interval 500 --eval-interval 500 --eval-iters 10 --log-interval 1
    --exit-signal-handler                      # SIGTERM (preemption): save, then exit 0
)
SAVE_VAR=STAGE0_CKPT INIT_VAR=INIT_CKPT USE_BASE=1  # named in error lines; BASE_HF starts this phase
run_phase "stage 0 alignment (LLM frozen)" "${STAGE0_CKPT:-checkpoints/stage0}" "${INIT_CKPT:-}" "$@"
