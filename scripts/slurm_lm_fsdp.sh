#!/bin/bash
# Multi-node FSDP2 LM distillation with kd-lightning on SLURM: one task per GPU; the student
# and the frozen teacher are both sharded over every GPU of the job (docs/guide/llm.md, "Scale").
# Lightning reads the rank, world size and master address from SLURM's environment
# (SLURMEnvironment), so srun starts the processes and Lightning launches none.
#
#   sbatch scripts/slurm_lm_fsdp.sh -c configs/llm/recipes/qwen2.5-1.5b_0.5b_dolly_jsd_fsdp.yaml
#
# Everything after the script name is passed to `kd-lightning fit` *before*
# configs/trainer/fsdp.yaml (bf16-true, ModelParallelStrategy), --model.chunk_size=0 (the
# chunked loss is refused under sharding) and the node/GPU counts, so those win; any LM
# recipe works (configs/llm/recipes/*_fsdp.yaml also sets a per-GPU batch for it). --trainer.num_nodes, --trainer.devices and the FSDP mesh size
# (data_parallel_size = nodes × GPUs per node) come from the #SBATCH lines: change the
# allocation there.
#SBATCH --job-name=kd-lm-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8          # = GPUs per node: one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8            # DataLoader workers per process
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90          # Lightning checkpoints and requeues on this signal
#SBATCH --requeue
#SBATCH --output=slurm-%j.out

set -euo pipefail

NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
WORLD=$((NODES * GPUS_PER_NODE))

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# export NCCL_DEBUG=INFO             # uncomment to debug hangs

srun kd-lightning fit \
    "$@" \
    -c configs/trainer/fsdp.yaml \
    --model.chunk_size=0 \
    --trainer.num_nodes="${NODES}" \
    --trainer.devices="${GPUS_PER_NODE}" \
    --trainer.strategy.init_args.data_parallel_size="${WORLD}" \
    --trainer.strategy.init_args.tensor_parallel_size=1
