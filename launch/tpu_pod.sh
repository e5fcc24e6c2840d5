#!/usr/bin/env bash
# LEGO on a Cloud TPU VM pod slice: one `lego-jax` process per TPU VM worker; JAX finds the other
# workers itself (jax.distributed auto-detection), no coordinator flags needed.
#
#   launch/tpu_pod.sh create                      # the slice (ACCELERATOR, ZONE, TPU_NAME, SPOT=1)
#   launch/tpu_pod.sh setup                       # code + venv + shared bucket on every worker
#   launch/tpu_pod.sh run prepare-data --config=configs/lego_ego4d.py ...
#   launch/tpu_pod.sh run train-vllm --config=configs/lego_ego4d.py --config.mesh.shape='(1,-1,1)'
#   launch/tpu_pod.sh run train-ldm  --config=configs/lego_ego4d.py --config.mesh.shape='(1,-1,1)'
#   launch/tpu_pod.sh logs | ssh | delete
#
# Every worker must see the same WORKDIR (records, checkpoints): `setup` mounts a Filestore NFS
# share (FILESTORE=10.0.0.2:/lego, atomic renames: the best home for checkpoints) or else the GCS
# bucket BUCKET through gcsfuse at MOUNT on all workers, and `run` passes --workdir=$MOUNT/$RUN
# unless the arguments give one. Checkpoints are written by all workers together (Orbax); on
# preemption (SIGTERM) the run saves and exits 143, and `run` with the same arguments resumes.
#
# Environment (defaults): TPU_NAME (lego), ZONE (us-east5-a), ACCELERATOR (v5p-8), VERSION
# (v2-alpha-tpuv5; v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e), REPO_URL (the origin of this
# checkout), BRANCH (main), FILESTORE (unset), BUCKET (gs://$USER-lego), MOUNT (/mnt/lego),
# RUN (the command name).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-lego}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
VERSION="${VERSION:-v2-alpha-tpuv5}"
REPO_URL="${REPO_URL:-$(git -C "$ROOT" remote get-url origin 2>/dev/null || echo "")}"
BRANCH="${BRANCH:-main}"
BUCKET="${BUCKET:-gs://${USER:-lego}-lego}"
MOUNT="${MOUNT:-/mnt/lego}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 2; }
on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

[ $# -ge 1 ] || usage
action="$1"
shift
case "$action" in
  create)
    extra=()
    if [ "${SPOT:-0}" = 1 ]; then extra+=(--spot); fi
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" "${extra[@]}"
    ;;
  setup)
    if [ -z "$REPO_URL" ]; then
      echo "tpu_pod.sh: set REPO_URL (this checkout has no origin remote)" >&2
      exit 2
    fi
    if [ -n "${FILESTORE:-}" ]; then
      mount_cmd="mountpoint -q '$MOUNT' || { sudo apt-get -q install -y nfs-common &&
        sudo mount -t nfs -o hard,timeo=600 '$FILESTORE' '$MOUNT'; }"
    else
      gcloud storage buckets describe "$BUCKET" >/dev/null 2>&1 || gcloud storage buckets create "$BUCKET"
      # gcsfuse renames directories by copying: allow it for Orbax's finalising rename.
      mount_cmd="if ! command -v gcsfuse >/dev/null; then
          curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
          echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
          sudo apt-get -q update && sudo apt-get -q install -y gcsfuse
        fi
        mountpoint -q '$MOUNT' || gcsfuse --implicit-dirs --rename-dir-limit=1000000 '${BUCKET#gs://}' '$MOUNT'"
    fi
    on_all "set -e
      if [ ! -d lego_jax ]; then git clone --branch '$BRANCH' '$REPO_URL' lego_jax; fi
      cd lego_jax && git fetch -q origin && git checkout -q '$BRANCH' && git pull -q --ff-only
      python3 -m venv .venv && . .venv/bin/activate
      pip install -q --upgrade pip && pip install -q -e '.[tpu]'
      sudo mkdir -p '$MOUNT' && sudo chown \$USER '$MOUNT'
      $mount_cmd"
    ;;
  run)
    [ $# -ge 1 ] || usage
    command="$1"
    shift
    args=""
    for a in "$@"; do args+=" $(printf '%q' "$a")"; done
    case " $* " in
      *" --workdir="*) ;;
      *) args+=" --workdir=$MOUNT/${RUN:-$command}" ;;
    esac
    # nohup + a log per worker: the run survives a dropped ssh session.
    on_all "cd lego_jax && . .venv/bin/activate && mkdir -p ~/logs &&
      nohup lego-jax $command$args > ~/logs/$command.log 2>&1 < /dev/null &
      echo \"worker \$(hostname): lego-jax $command started, log ~/logs/$command.log\""
    ;;
  logs)
    on_all "tail -n 5 ~/logs/*.log"
    ;;
  ssh)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="${WORKER:-0}"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    usage
    ;;
esac
