#!/usr/bin/env bash
# Does the VLLM learn to look? On the embedded synthetic scenes the object's location and the
# acting hand can only be read from the frame, so a VLLM that uses its image features names them
# on held-out frames far more often than the same model untrained or trained without images.
#
#   launch/vllm_looks.sh [WORKDIR] [--config.section.key=value ...]
#
# prepare-data once (WORKDIR/data), then three runs sharing those records and tokenizer:
#   WORKDIR/untrained  train-vllm with num_steps=0: the random initialisation, saved as step 0
#   WORKDIR/trained    train-vllm on the config as it is
#   WORKDIR/text_only  train-vllm with zero_image=true (image features zeroed, also at inference)
# and `lego-jax extract` for each; WORKDIR/looks.md and looks.json compare the held-out (test)
# rates of descriptions naming the right location, hand and object, with chance levels
# (WORKDIR/train_split/: the same on the training split).
# Extra flags go to every command (e.g. --config.vllm_train.num_steps=1500 or
# --config.data.synthetic.num_train=8192; a run's own setting wins). Every step resumes or is
# kept when rerun with the same WORKDIR.
# Runs in the plain synthetic world (below). Environment: CONFIG (configs/tiny.py), PYTHON (default .venv/bin/python when present, else
# python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 0
fi
WORKDIR="$ROOT/workdir/vllm_looks"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  WORKDIR="$1"
  shift
fi
CONFIG="${CONFIG:-configs/tiny.py}"
# The plain world: the acting hand follows where the object stands, so only the frame tells it.
# configs/tiny.py's held-out-combinations world gives each combination its own hand (stated by the
# text), which would let a blind model name the hand. Extra flags after these win.
PLAIN=(--config.data.synthetic.combination_rules=false "--config.data.synthetic.holdout=()"
       --config.data.synthetic.hand_swap=0 --config.data.synthetic.num_instruction=0)
EXTRA=("${PLAIN[@]}" "$@")
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
DATA=(--config="$CONFIG" "--config.data.records_dir=$WORKDIR/data/records"
      "--config.data.tokenizer_dir=$WORKDIR/data/tokenizer")
started=$SECONDS

lego() {
  local t0=$SECONDS
  echo "== lego-jax $*" >&2
  "$PYTHON" -m lego_jax "$@"
  echo "== $1: $((SECONDS - t0)) s" >&2
}

# Without the shared-directory flags: given a tokenizer_dir, prepare-data would load a tokenizer
# instead of training one. Kept as it is when already complete.
lego prepare-data --config="$CONFIG" --workdir="$WORKDIR/data" "${EXTRA[@]}"

declare -A OWN=(
  [untrained]="--config.vllm_train.num_steps=0"
  [trained]=""
  [text_only]="--config.vllm_train.zero_image=true"
)
for run in untrained trained text_only; do
  own=()
  if [ -n "${OWN[$run]}" ]; then own=("${OWN[$run]}"); fi
  # extract reads zero_image too: the text-only model never sees the frame.
  lego train-vllm --workdir="$WORKDIR/$run" "${DATA[@]}" "${EXTRA[@]}" "${own[@]}"
  lego extract --workdir="$WORKDIR/$run" "${DATA[@]}" "${EXTRA[@]}" "${own[@]}"
done

# The training split too: a model that memorised its scenes scores there, not on held-out ones.
"$PYTHON" -m lego_jax.eval.looks "$WORKDIR" --split=train --out="$WORKDIR/train_split"
echo
"$PYTHON" -m lego_jax.eval.looks "$WORKDIR" --split=test --wall_s=$((SECONDS - started))
