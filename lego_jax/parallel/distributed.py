"""Multi-host start-up and the per-host share of the data.

One JAX process runs per host (a TPU VM worker, a SLURM task, or a process started with explicit
coordinator flags); together they see one global device list and one mesh. `initialize` must run
before any JAX computation, which is why the CLI calls it first thing:

  - explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`): used as given;
  - a TPU VM (pod slice or single host), a SLURM step with more than one task, Open MPI, or
    JAX_COORDINATOR_ADDRESS in the environment: `jax.distributed.initialize()` detects the rest;
  - otherwise: a single process, nothing to do.
On CPU the cross-process collectives go through gloo (`jax_cpu_collectives_implementation`).

Data: the dataset is cut into `num_shards` Grain shards (ShardOptions), by default one per process.
Each process reads only its own shards and concatenates their batches, in shard order, into its
block of the global batch. Since the global batch is then a function of the shard count alone, a
run with the same shard count sees the same global batches on 1 process x 8 devices as on
2 processes x 4 devices, and a run can resume on a different number of hosts (the checkpoint keeps
every shard's iterator state, gathered from all processes).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Any, Callable, Mapping

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """Which cluster manager started this process ("tpu", "slurm", "ompi", "env"), or None.

  Decided from the environment alone, without initialising any JAX backend. A SLURM allocation
  running a single task is not a multi-process run (jax's own detection would still try)."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
    return "ompi"
  if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or (
      environ is None and _on_tpu_vm()):
    return "tpu"
  return None


def _on_tpu_vm() -> bool:
  # Cloud TPU VMs expose their chips as /dev/accel* (v2-v5e) or /dev/vfio/* (v5p, v6e) and
  # have libtpu installed; jax then reads the pod's workers from the metadata server.
  if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    return False

  return importlib.util.find_spec("libtpu") is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
  """Starts the JAX distributed runtime when this is a multi-process run; returns what was done.

  Call before any JAX computation. Explicit arguments must come together (all three)."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                     f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
  if jax.distributed.is_initialized():
    return f"already initialised: process {jax.process_index()} of {jax.process_count()}"
  cluster = "flags" if coordinator_address else detect_cluster()
  if cluster is None or (cluster == "flags" and num_processes == 1):
    return "single process"
  # Only the CPU client uses it; without it, CPU arrays spanning processes cannot reduce.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cluster == "flags":
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return (f"{cluster}: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices")


# ---------------------------------------------------------------------------------------------
# Exchanging small host values (iterator states) between processes.

def allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload`, in process order (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return [payload]

  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(payload)], np.int64)))
  sizes = sizes.reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(payload)] = np.frombuffer(payload, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [rows[i, :int(n)].tobytes() for i, n in enumerate(sizes)]


def gather_data_states(state: Any) -> Any:
  """One checkpointable data state for the whole run from each process's own.

  ShardedLoader states merge into one dict holding every shard; anything else is kept per
  process as {"per_process": [...]} (restorable only on the same number of processes)."""
  if jax.process_count() == 1:
    return state
  states = [json.loads(b) for b in allgather_bytes(json.dumps(to_jsonable(state)).encode())]
  if all(isinstance(s, dict) and "shards" in s for s in states):
    merged = {"num_shards": states[0]["num_shards"], "shards": {}}
    for s in states:
      merged["shards"].update(s["shards"])
    return merged
  return {"per_process": states}


def this_process_data_state(state: Any) -> Any:
  """The part of a gathered data state this process restores (see `gather_data_states`)."""
  if isinstance(state, dict) and "per_process" in state:
    states = state["per_process"]
    if len(states) != jax.process_count():
      raise ValueError(f"the checkpoint's data iterators come from {len(states)} processes, this "
                       f"run has {jax.process_count()}: resume on as many processes")
    return from_jsonable(states[jax.process_index()])
  return state


def to_jsonable(x):
  """A data-iterator state JSON can hold: bytes (DataLoader iterator states) tagged as text."""
  if isinstance(x, bytes):
    return {"__bytes__": x.decode("utf-8")}
  return x


def from_jsonable(x):
  if isinstance(x, dict) and set(x) == {"__bytes__"}:
    return x["__bytes__"].encode("utf-8")
  return x


# ---------------------------------------------------------------------------------------------
# The per-host share of the data.

_DATA_SHARDS: list[int | None] = [None]


def set_data_shards(num_shards: int | None) -> None:
  """The shard count new runs use (the CLI's --data_shards); None: one per process."""
  if num_shards is not None and num_shards < 1:
    raise ValueError(f"--data_shards={num_shards} must be at least 1")
  _DATA_SHARDS[0] = num_shards


def data_shards() -> int:
  return _DATA_SHARDS[0] or jax.process_count()


def concat_batches(batches: list[dict]) -> dict:
  """Row-wise concatenation of equally keyed host batches (numeric and string arrays alike)."""
  if len(batches) == 1:
    return batches[0]
  return {k: np.concatenate([np.asarray(b[k]) for b in batches], axis=0) for k in batches[0]}


class ShardedLoader:
  """The data this process feeds: its shards of `num_shards`, read in lockstep and concatenated.

  Args:
    make: (grain ShardOptions, per-shard batch size) -> a Grain DataLoader over that shard.
    global_batch: rows of the global batch (after `prepare`); divisible by the shard count.
    prepare: per-shard host transform, applied BEFORE concatenation so that the rows a shard
      contributes sit together in the global batch whatever the process count.
    num_shards: default `data_shards()`; a restored state's count wins (the data order of a run
      is fixed when it starts).
  """

  def __init__(self, make: Callable[[Any, int], Any], global_batch: int,
               prepare: Callable[[dict], dict] | None = None, num_shards: int | None = None):
    self.make = make
    self.global_batch = int(global_batch)
    self.prepare = prepare or (lambda b: b)
    self.num_shards = num_shards or data_shards()

  def __iter__(self) -> "ShardedIterator":
    return ShardedIterator(self, self.num_shards)


class ShardedIterator:
  def __init__(self, loader: ShardedLoader, num_shards: int):
    count, index = jax.process_count(), jax.process_index()
    if num_shards % count:
      raise ValueError(f"{num_shards} data shards cannot be split over {count} processes "
                       "(use a multiple of the process count, --data_shards)")
    if loader.global_batch % num_shards:
      raise ValueError(f"global batch {loader.global_batch} is not divisible by {num_shards} "
                       "data shards")
    self.loader = loader
    self.num_shards = num_shards
    per_process = num_shards // count
    self.shard_ids = list(range(index * per_process, (index + 1) * per_process))
    self.per_shard = loader.global_batch // num_shards
    self.loaders = [
        loader.make(grain.sharding.ShardOptions(shard_index=i, shard_count=num_shards,
                                                drop_remainder=True), self.per_shard)
        for i in self.shard_ids]
    self.iterators = [iter(dl) for dl in self.loaders]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return concat_batches([self.loader.prepare(next(it)) for it in self.iterators])

  def get_state(self) -> dict:
    return {"num_shards": self.num_shards,
            "shards": {str(i): _decode_state(it.get_state())
                       for i, it in zip(self.shard_ids, self.iterators)}}

  def set_state(self, state: dict) -> None:
    if not (isinstance(state, dict) and "shards" in state):
      # A checkpoint of a loader that read one shard per host (train-vllm and train-ldm before
      # they had data shards): it is this process's shard of process_count.
      state = {"num_shards": jax.process_count(), "shards": {str(jax.process_index()): state}}
    if state.get("num_shards") != self.num_shards:
      # The run started with another shard count: rebuild so the data order stays the run's.
      self.__init__(self.loader, int(state["num_shards"]))
    for i, it in zip(self.shard_ids, self.iterators):
      it.set_state(_encode_state(state["shards"][str(i)]))


def _decode_state(s):
  # Grain DataLoader iterators give JSON bytes; keep them readable inside the checkpoint.
  return json.loads(s) if isinstance(s, (bytes, str)) else s


def _encode_state(s):
  return json.dumps(s, indent=4).encode() if isinstance(s, dict) else s
