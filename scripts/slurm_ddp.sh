#!/bin/bash
# Multi-node DDP with kd-lightning on SLURM: one task per GPU, Lightning reads the rank,
# world size and master address from SLURM's environment (SLURMEnvironment).
#
#   sbatch scripts/slurm_ddp.sh -c configs/quickstart/kd.yaml -c configs/data/cifar10.yaml ...
#
# Everything after the script name is passed to `kd-lightning fit`, *before*
# configs/trainer/ddp.yaml and the node/GPU counts, so those win (the quickstart configs say
# accelerator: cpu). --trainer.num_nodes / --trainer.devices are derived from the #SBATCH
# lines below: change the allocation there.
#SBATCH --job-name=kd-lightning
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # = GPUs per node: one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8            # DataLoader workers per process
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=SIGUSR1@90          # Lightning checkpoints and requeues on this signal
#SBATCH --requeue
#SBATCH --output=slurm-%j.out

set -euo pipefail

NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}

# NCCL over InfiniBand where present; uncomment to debug hangs.
# export NCCL_DEBUG=INFO
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# srun starts NODES × GPUS_PER_NODE processes; Lightning must not launch its own.
srun kd-lightning fit \
    "$@" \
    -c configs/trainer/ddp.yaml \
    --trainer.num_nodes="${NODES}" \
    --trainer.devices="${GPUS_PER_NODE}"
