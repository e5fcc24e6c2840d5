"""Orbax checkpoints for every trainer: one checkpoint = train state + data-iterator state + config.

- Asynchronous saves with a keep-N policy (CheckpointManager). Orbax writes each step to a
  temporary directory and renames it when complete, so a save interrupted mid-write never
  replaces the last good checkpoint; `latest_step()` only ever sees finished ones.
- Restore is onto an abstract target (shapes, dtypes and shardings of the CURRENT mesh), so a
  checkpoint saved on 8 devices restores on 1 or 4.
- SIGTERM (preemption) sets a flag the loops poll; they then save, wait for the save to finish and
  raise `Preempted`, well within the usual grace periods (30 s on GCE/TPU VMs, SLURM's
  `--signal` lead time).
- Multi-host: every process calls `save` (Orbax writes each process's shards of the arrays; the
  JSON items come from the primary process, so the loop gathers the data states first).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lego_jax.parallel.distributed import from_jsonable, to_jsonable


class CheckpointMismatchError(ValueError):
  """A checkpoint written for other model shapes than the current config's."""


class Checkpointer:
  """CheckpointManager over WORKDIR/checkpoints/<name> with items: state, data, config."""

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None, config: dict | None = None,
           force: bool = False) -> bool:
    data_json = {"state": to_jsonable(data_state)}
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_json),
            config=ocp.args.JsonSave(config or {})),
        force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, Any]:
    """Restores (step, state, data_state); `abstract_state` carries the target shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
    try:
      restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=ocp.args.JsonRestore()))
    except ValueError as e:
      if "shape" not in str(e) and "structure" not in str(e).lower():
        raise
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not fit the model of the current config "
          f"({str(e).splitlines()[0][:160]}); it was written with other settings: use the config "
          "it was trained with (saved in its config item) or a fresh --workdir") from None
    return step, restored["state"], from_jsonable(restored["data"]["state"])

  def read_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # `with Checkpointer(...) as ckpt:` closes it on every exit, errors included: a manager left
  # open keeps background threads that can print a traceback at interpreter exit.
  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs (with shardings when given) for restoring onto the current mesh."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint; rerunning the command resumes."""

  exit_code = 143  # what a shell reports for a process ended by SIGTERM (128 + 15)


class Preemption:
  """Turns SIGTERM into a flag the training loop polls, so it can save before exiting."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  @property
  def requested(self) -> bool:
    # Every host must agree, or one host would stop inside a collective the others still run.
    flag = self._event.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      # A host numpy value: a jax array made inside the trainer's mesh would span processes.
      flag = bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag]))).any())
    return flag


def dump_json(obj: Any, path: str | Path) -> None:
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path)
