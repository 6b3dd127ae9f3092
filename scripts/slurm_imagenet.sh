#!/bin/bash
# ImageNet KD on 2 nodes x 8 GPUs with SLURM: one task per GPU; Lightning reads rank, world size and
# master address from SLURM's environment.
#
#   sbatch scripts/slurm_imagenet.sh -c configs/repro/imagenet/resnet34_resnet18/kd.yaml
#
# The repro configs are written for 8 GPUs at 64 images per GPU (global batch 512, lr 0.2). On 16 GPUs
# this script halves the per-GPU batch so that the global batch and the lr stay mdistiller's; to train
# with a larger global batch instead, scale the lr with it (lr = 0.2 x global / 512), e.g.
# --data.init_args.batch_size=64 --model.init_args.optimizer.init_args.lr=0.4.
# CRD configs use 32 per GPU x 8 (256, lr 0.1): pass PER_GPU_BATCH=16 for them.
# Without internet on the nodes: copy the torchvision teacher weights into $TORCH_HOME/hub/checkpoints first (see the config).
# The same run without SLURM, on each node (NODE_RANK 0 and 1, MASTER_ADDR = node 0):
#   torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr $MASTER_ADDR \
#     --master_port 29500 -m kd_lightning fit -c <config> --trainer.num_nodes=2 --data.init_args.batch_size=32
#SBATCH --job-name=kd-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8          # = GPUs per node: one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10           # DataLoader workers (JPEG decoding) per process
#SBATCH --mem=0
#SBATCH --time=72:00:00
#SBATCH --signal=SIGUSR1@90          # Lightning checkpoints and requeues on this signal
#SBATCH --requeue
#SBATCH --output=slurm-%j.out

set -euo pipefail

NODES=${SLURM_JOB_NUM_NODES:-2}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-10} - 2 ))
PER_GPU_BATCH=${PER_GPU_BATCH:-$(( 512 / (NODES * GPUS_PER_NODE) ))}
export OMP_NUM_THREADS=1

srun kd-lightning fit \
    "$@" \
    --trainer.accelerator=gpu \
    --trainer.strategy=ddp \
    --trainer.num_nodes="${NODES}" \
    --trainer.devices="${GPUS_PER_NODE}" \
    --data.init_args.batch_size="${PER_GPU_BATCH}" \
    --data.init_args.num_workers="${WORKERS}"
