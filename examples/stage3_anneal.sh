#!/usr/bin/env bash
# SOLO stage 3 (annealing): curated LLaVAR, DVQA, FigureQA, ALLaVA (LAION-4V, VFLAN-4V) plus text.
# Starts from stage 2's final checkpoint (weights only).
set -euo pipefail
source "$(dirname "$0")/common.sh"
run_phase "stage 3 annealing" "${STAGE3_CKPT:-checkpoints/stage3}" "${STAGE2_CKPT:-checkpoints/stage2}" "$@"
