#!/usr/bin/env bash
# SOLO stage 2: web-scale captions and OCR (CapFusion, CC3M, detailed captions, WebSight, LLaVAR, DVQA,
# OCR-VQA, FigureQA) plus text.
# Checkpoints:
#   STAGE2_CKPT (default checkpoints/stage2)  --save; resumed when it already holds a checkpoint
#   STAGE1_CKPT (default checkpoints/stage1)  --load --finetune: stage 1's final weights
# Example (CPU, minutes):
#   PRESET=tiny DATA_PATH=demo_out/data/pretrain TOKENIZER_MODEL=demo_out/tokenizer/tokenizer.model \
#     STAGE1_CKPT=/tmp/s1 STAGE2_CKPT=/tmp/s2 TRAIN_ITERS=10 bash examples/stage2_pretrain.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
SAVE_VAR=STAGE2_CKPT INIT_VAR=STAGE1_CKPT  # named in error lines
run_phase "stage 2 pre-training" "${STAGE2_CKPT:-checkpoints/stage2}" "${STAGE1_CKPT:-checkpoints/stage1}" "$@"
