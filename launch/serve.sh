#!/usr/bin/env bash
# The page over the models `bash launch/demo.sh` trained: the serve extra, then `lego-jax serve`.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python -m pip install -q -e ".[serve]"
WORKDIR="${WORKDIR:-$ROOT/workdir/demo}"
exec lego-jax serve --config=configs/tiny.py --workdir="$WORKDIR" "$@"
