#!/usr/bin/env bash
# SOLO stage 1: build visual features from scratch on ImageNet-21k ("image, then class name")
# plus ~30% text. Starts from INIT_CKPT (a Mistral converted with
# `tools/convert_checkpoint.py hf-to-megatron`), or from scratch when INIT_CKPT is empty.
# Checkpoints:
#   STAGE1_CKPT (default checkpoints/stage1)  --save; resumed when it already holds a checkpoint
#   INIT_CKPT (default: none)                 --load --finetune: the converted Mistral to start from
# Example (full scale; PRESET=tiny and a small DATA_PATH make it a CPU run of minutes):
#   DATA_PATH="0.7 data/in21k 0.3 data/slimpajama" TOKENIZER_MODEL=tok/tokenizer.model \
#   INIT_CKPT=checkpoints/mistral-init TRAIN_ITERS=... bash examples/stage1_pretrain.sh
# FROM_STAGE0=1 starts instead from the optional alignment stage's checkpoint (STAGE0_CKPT, default
# checkpoints/stage0, made by examples/stage0_align.sh), weights only.
set -euo pipefail
source "$(dirname "$0")/common.sh"
SAVE_VAR=STAGE1_CKPT INIT_VAR=INIT_CKPT  # named in error lines
init_ckpt=${INIT_CKPT:-}
if [[ "${FROM_STAGE0:-0}" == 1 ]]; then init_ckpt=${STAGE0_CKPT:-checkpoints/stage0}; INIT_VAR=STAGE0_CKPT; fi
run_phase "stage 1 pre-training" "${STAGE1_CKPT:-checkpoints/stage1}" "$init_ckpt" "$@"
