#!/usr/bin/env bash
# Optional stage 0 (EVE-style alignment, before SOLO's stage 1): the LLM is frozen (--freeze-lm) and only
# the freshly initialised patch embedding trains, on image-caption data, so that the first updates of the
# new layer do not have to pass through (and disturb) the pretrained LLM. Starts from INIT_CKPT (a Mistral
# converted with `tools/convert_checkpoint.py hf-to-megatron`), or from scratch when INIT_CKPT is empty.
# Stage 1 then continues from it with FROM_STAGE0=1 (see examples/stage1_pretrain.sh, docs/TRAINING.md).
# Checkpoints:
#   STAGE0_CKPT (default checkpoints/stage0)  --save; resumed when it already holds a checkpoint
#   INIT_CKPT (default: none)                 --load --finetune: the converted Mistral to start from
# Example (full scale; PRESET=tiny and a small DATA_PATH make it a CPU run of minutes):
#   DATA_PATH=data/captions TOKENIZER_MODEL=tok/tokenizer.model INIT_CKPT=checkpoints/mistral-init \
#   TRAIN_ITERS=... bash examples/stage0_align.sh
# Only the patch embedding (3072 x hidden) has gradients and Adam state, so a step costs the forward and
# the backward through the activations, not the weight gradients of the LLM. LR/MIN_LR apply to it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
SAVE_VAR=STAGE0_CKPT INIT_VAR=INIT_CKPT  # named in error lines
run_phase "stage 0 alignment (LLM frozen)" "${STAGE0_CKPT:-checkpoints/stage0}" "${INIT_CKPT:-}" --freeze-lm "$@"
