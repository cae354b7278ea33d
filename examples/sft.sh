#!/usr/bin/env bash
# Instruction tuning: chat data (preprocessed with --format chat), loss on assistant turns only.
# Checkpoints:
#   SFT_CKPT (default checkpoints/sft)      --save; resumed when it already holds a checkpoint
#   INIT_CKPT (default: STAGE3_CKPT, else checkpoints/stage3)
#                                           --load --finetune: the weights to start from (any stage)
# Example (CPU, minutes; from a stage-1 checkpoint):
#   PRESET=tiny DATA_PATH=demo_out/data/sft TOKENIZER_MODEL=demo_out/tokenizer/tokenizer.model \
#     INIT_CKPT=checkpoints/stage1 SFT_CKPT=/tmp/sft SPLIT=100,0,0 TRAIN_ITERS=20 bash examples/sft.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
LOSS_ROLE=${LOSS_ROLE:-assistant}
SAVE_VAR=SFT_CKPT INIT_VAR=INIT_CKPT  # named in error lines
run_phase "instruction tuning" "${SFT_CKPT:-checkpoints/sft}" "${INIT_CKPT:-${STAGE3_CKPT:-checkpoints/stage3}}" "$@"
