#!/usr/bin/env bash
# LEGO on multi-node GPUs under SLURM: `srun` starts one `lego-jax` process per GPU (default) or
# per node; JAX reads the SLURM environment to find its peers (no coordinator flags).
#
#   sbatch launch/slurm_gpu.sh train-vllm --config=configs/lego_ego4d.py \
#       --config.mesh.shape='(1,-1,1)' --workdir=/shared/lego
#   sbatch --nodes=4 launch/slurm_gpu.sh train-ldm --config=configs/lego_ego4d.py --workdir=/shared/lego
#   sbatch --ntasks-per-node=1 launch/slurm_gpu.sh ...     # one process per node, all its GPUs
#
# Before: the project installed in .venv of the submit directory (a shared file system), with
# `pip install -e ".[cuda]"` (launch/single_gpu.sh does it), and a WORKDIR every node sees.
# Preemption and time limits: SLURM sends SIGTERM 120 s before the end (--signal), the run saves
# a checkpoint and exits 143; the job then requeues itself (LEGO_REQUEUE=0: not) and resumes.
#SBATCH --job-name=lego
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
if [ $# -lt 1 ]; then
  awk 'NR > 1 && /^#( |$)/ { sub(/^# ?/, ""); print; next } NR > 1 && !/^#SBATCH/ { exit }' "$0"
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck disable=SC1091
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
if [ "${SLURM_NTASKS_PER_NODE:-8}" = 1 ]; then
  # One process per node drives every GPU of its node (JAX would otherwise give each SLURM task
  # the one GPU of its local rank).
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((${SLURM_GPUS_ON_NODE:-8} - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
# SIGTERM reaches every task (--signal without B:), each writes its share of the checkpoint.
# No --kill-on-bad-exit: the first task to exit 143 would kill the others mid-save; a crashed
# task is noticed by JAX's coordination service, which stops the rest.
set +e
srun python -m lego_jax "$@"
rc=$?
set -e
if [ "$rc" -eq 143 ] && [ "${LEGO_REQUEUE:-1}" = 1 ]; then
  # Out of time or preempted, with a checkpoint saved: queue again, it resumes from there.
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
