#!/usr/bin/env bash
# SOLO stage 3 (annealing): curated LLaVAR, DVQA, FigureQA, ALLaVA (LAION-4V, VFLAN-4V) plus text.
# Checkpoints:
#   STAGE3_CKPT (default checkpoints/stage3)  --save; resumed when it already holds a checkpoint
#   STAGE2_CKPT (default checkpoints/stage2)  --load --finetune: stage 2's final weights
# Example (CPU, minutes):
#   PRESET=tiny DATA_PATH=demo_out/data/pretrain TOKENIZER_MODEL=demo_out/tokenizer/tokenizer.model \
#     STAGE2_CKPT=/tmp/s2 STAGE3_CKPT=/tmp/s3 TRAIN_ITERS=10 bash examples/stage3_anneal.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
SAVE_VAR=STAGE3_CKPT INIT_VAR=STAGE2_CKPT  # named in error lines
run_phase "stage 3 annealing" "${STAGE3_CKPT:-checkpoints/stage3}" "${STAGE2_CKPT:-checkpoints/stage2}" "$@"
