#!/usr/bin/env bash
# A multi-host run on one machine: NUM_PROCESSES processes x DEVICES_PER_PROCESS fake CPU devices
# form one JAX distributed job (coordinator 127.0.0.1 on a free port, gloo collectives), the same
# code path as a TPU pod or a SLURM job. The tests use it; it needs no network and no install
# beyond the project's virtual environment.
#
#   launch/cpu_multiprocess.sh train-vae --workdir=/tmp/mp --config.vae_train.num_steps=20
#
# Environment: NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), LOG_DIR (per-process logs; default a
# temporary directory), PYTHON (default: .venv/bin/python when present, else python3).
# Process 0 writes to this terminal, the others to LOG_DIR/process_<i>.log. If one process
# fails, the others are stopped (they would wait in a collective) and the first failing exit
# status is returned; SIGTERM/SIGINT are forwarded to every process (preemption drills).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 2
fi
N="${NUM_PROCESSES:-2}"
D="${DEVICES_PER_PROCESS:-4}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
LOG_DIR="${LOG_DIR:-$(mktemp -d -t lego_mp.XXXXXX)}"
mkdir -p "$LOG_DIR"
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

# Whatever device count the caller's XLA_FLAGS asked for, each process gets D.
FLAGS="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="$FLAGS --xla_force_host_platform_device_count=$D"
export JAX_PLATFORMS=cpu

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM' TERM
trap 'stop_all INT' INT

cd "$ROOT"
for ((i = 0; i < N; i++)); do
  args=("$@" "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$N" "--process_id=$i")
  if [ "$i" -eq 0 ]; then
    "$PYTHON" -m lego_jax "${args[@]}" &
  else
    "$PYTHON" -m lego_jax "${args[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
remaining=$N
while [ "$remaining" -gt 0 ]; do
  # `wait -n` returns early when a trapped signal arrives; only a child's exit counts.
  if wait -n; then
    rc=0
  else
    rc=$?
  fi
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
  if [ "$alive" -lt "$remaining" ]; then
    remaining=$alive
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
    fi
    # 143: preempted after a complete checkpoint; the others are finishing theirs. Any other
    # failure leaves the rest waiting in a collective for a peer that is gone.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 143 ] && [ "$remaining" -gt 0 ]; then
      echo "cpu_multiprocess: a process exited with status $rc; stopping the others" >&2
      stop_all KILL
      for ((i = 1; i < N; i++)); do
        echo "--- $LOG_DIR/process_$i.log (last lines)" >&2
        tail -n 40 "$LOG_DIR/process_$i.log" >&2 || true
      done
    fi
  fi
done
exit "$status"
