#!/usr/bin/env bash
# SOLO stage 2: web-scale captions and OCR (CapFusion, CC3M, detailed captions, WebSight, LLaVAR, DVQA,
# OCR-VQA, FigureQA) plus text. Starts from stage 1's final checkpoint (weights only).
set -euo pipefail
source "$(dirname "$0")/common.sh"
run_phase "stage 2 pre-training" "${STAGE2_CKPT:-checkpoints/stage2}" "${STAGE1_CKPT:-checkpoints/stage1}" "$@"
