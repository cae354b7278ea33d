#!/usr/bin/env bash
# Instruction tuning: chat data (preprocessed with --format chat), loss on assistant turns only.
# Starts from stage 3's final checkpoint (weights only).
set -euo pipefail
source "$(dirname "$0")/common.sh"
LOSS_ROLE=${LOSS_ROLE:-assistant}
run_phase "instruction tuning" "${SFT_CKPT:-checkpoints/sft}" "${STAGE3_CKPT:-checkpoints/stage3}" "$@"
