#!/usr/bin/env bash
# Submit a phase on SLURM: one srun task per node, each starts torchrun for its node's GPUs.
#   sbatch --nodes=4 examples/slurm_submit.sh examples/stage2_pretrain.sh
#SBATCH --job-name=solo
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo pipefail/p' "$0" | grep '^# ' | sed 's/^# //'
  echo "The phase's own variables: bash examples/<phase>.sh --help"
  exit 0
fi
PHASE=${1:?usage: sbatch [--nodes N] examples/slurm_submit.sh examples/<phase>.sh}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-29500}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# Each task reads SLURM_NODEID / SLURM_JOB_NUM_NODES (common.sh) for its node rank and the node count.
srun --kill-on-bad-exit=1 bash -c "NODE_RANK=\$SLURM_NODEID bash $PHASE"
