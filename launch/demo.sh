#!/usr/bin/env bash
# Quickstart command 1: a virtual env, the install, and `lego-jax demo` on the embedded default.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python -m pip install -q -e .
WORKDIR="${WORKDIR:-$ROOT/workdir/demo}"
lego-jax demo --config=configs/tiny.py --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR (open $WORKDIR/report.html)"
