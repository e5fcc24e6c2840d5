# Shared set-up for the launch scripts: one virtual environment in .venv, the project installed
# editable. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first: an unpinned torch (asked for by diffusers' extras) would pull a
# multi-GB CUDA build. 2.13.0 is the build at hand for the CI machines.
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==${LEGO_TORCH_VERSION:-2.13.0}"
fi
