#!/usr/bin/env bash
# SLURM batch script: llasm-jax on N GPU nodes, one process per node driving all its GPUs.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh --config configs/llasm_cllama2_7b.py:stage1 --workdir gs://BUCKET/stage1
#
# Submit from the repository root, which must be on a filesystem shared by the nodes and hold
# a .venv with the package and jax[cuda12]. `--distributed` calls jax.distributed.initialize(),
# which reads the coordinator address, process count and rank from SLURM's environment.
#SBATCH --job-name=llasm-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

COMMAND="${COMMAND:-train}"  # the llasm-jax subcommand: train (default), forward, generate, ...

cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
# shellcheck source=/dev/null  # the venv made at install time
. .venv/bin/activate

# The whole GPU for the XLA allocator, since one process owns each node's GPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# Latency-hiding scheduling overlaps the FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

srun --ntasks-per-node=1 --kill-on-bad-exit=1 llasm-jax --distributed "$COMMAND" "$@"
