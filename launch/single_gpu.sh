#!/usr/bin/env bash
# LEGO on one GPU machine (one process, all of its GPUs as one mesh): a virtual env with CUDA
# JAX, then the given command.
#
#   launch/single_gpu.sh prepare-data --config=configs/lego_ego4d.py --workdir=runs/ego4d ...
#   launch/single_gpu.sh train-vllm --config=configs/lego_ego4d.py --workdir=runs/ego4d \
#       --config.mesh.shape='(1,-1,1)'
#   launch/single_gpu.sh plan --config=configs/lego_ego4d.py     # what fits, before training
#
# `lego-jax plan` says whether a stage fits the GPU memory (LLaVA-13B fine-tuning needs FSDP over
# 8 x 80 GB); the embedded tiny default runs anywhere: launch/single_gpu.sh demo.
set -euo pipefail
if [ $# -lt 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if ! python -c "import jax; assert jax.default_backend() == 'gpu'" >/dev/null 2>&1; then
  python -m pip install -q -e ".[cuda]"
fi
# JAX preallocates 75% of GPU memory by default; `lego-jax plan` budgets 90%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec lego-jax "$@"
