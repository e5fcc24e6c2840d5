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

import asyncio
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lego_jax.parallel.distributed import from_jsonable, to_jsonable


class CheckpointMismatchError(ValueError):
  """A checkpoint written for other model shapes than the current config's."""


class CheckpointDamagedError(RuntimeError):
  """No checkpoint of a run could be read (files missing, truncated or corrupt)."""


def _one_line(e: BaseException) -> str:
  # Orbax wraps TensorStore's error (the one that names the file) in a generic one: report the
  # innermost cause.
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  return (text[0][:200] if text else type(e).__name__)


def _quiet_abandoned_reads() -> None:
  """After a failed restore, Orbax's reads of the other arrays are abandoned: when collected,
  Python prints each as "Exception ignored in: <coroutine ...>" with a TensorStore traceback,
  pages of noise after our one-line message. Those (and only those) are silenced."""
  previous = sys.unraisablehook
  if getattr(previous, "_lego_jax", False):
    return

  def hook(unraisable):
    obj = unraisable.object
    code = getattr(obj, "cr_code", None)
    if code is not None and "/orbax/" in code.co_filename.replace("\\", "/"):
      return
    previous(unraisable)

  hook._lego_jax = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _reads_settle_on_failure():
  """Within it, an Orbax operation that fails waits for its other reads before its event loop
  closes.

  Orbax runs each restore on a fresh event loop that it closes as soon as the first array read
  fails, with the reads of the other arrays still in flight in TensorStore's threads. Each of
  those then completes onto the closed loop: "RuntimeError: Event loop is closed" printed from
  TensorStore's thread, or, collected later (often at exit), a page of "Exception ignored" per
  abandoned coroutine, after our one-line message. Here the loop first lets every task it
  started finish (a damaged checkpoint's reads end, in error or not), then closes. Only the
  failure path changes; Orbax versions without this private function are left as they are."""
  from orbax.checkpoint._src import asyncio_utils

  original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
  if original is None:
    yield
    return

  def run_settled(coro):
    loop = asyncio.new_event_loop()
    try:
      asyncio.set_event_loop(loop)
      try:
        return loop.run_until_complete(coro)
      except BaseException:
        pending = asyncio.all_tasks(loop)
        if pending:
          loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        raise
    finally:
      asyncio.set_event_loop(None)
      loop.close()

  asyncio_utils._run_sync_via_new_loop = run_settled  # noqa: SLF001
  try:
    yield
  finally:
    asyncio_utils._run_sync_via_new_loop = original  # noqa: SLF001


def _shapes(tree: Any) -> dict[str, tuple]:
  """{'a/b/0': shape} of the leaves that have a shape (arrays, ShapeDtypeStructs, metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
      out[name] = tuple(shape)
  return out


class Checkpointer:
  """CheckpointManager over WORKDIR/checkpoints/<name> with items: state, data, config."""

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
               reader: bool = False):
    """`reader`: only reads (generate, serve, export, a trainer's init from another run). A
    writer removes unfinished `*.orbax-checkpoint-tmp` directories when it opens, its own
    leftovers from a killed run; a reader must not: the run may still be training and writing
    one (a reader opened mid-save once removed it and crashed the training)."""
    self.directory = Path(directory).absolute()
    self.damaged: list[tuple[int, str]] = []  # (step, why) skipped by the last restore
    # Not Orbax's read_only: it logs three absl warnings on every open.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save and not reader,
        create=not reader, cleanup_tmp_directories=not reader)
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

  def restore(self, abstract_state: Any, step: int | None = None,
              partial: bool = False) -> tuple[int, Any, Any]:
    """Restores (step, state, data_state); `abstract_state` carries the target shardings.
    `partial`: `abstract_state` names a part of the saved state (e.g. the parameters without
    the optimizer's moments), and only that part is read.

    Without `step`, the newest checkpoint that restores is used: a damaged one (a file missing,
    truncated or unreadable) is skipped with a one-line warning naming it and why, and listed in
    `self.damaged` (nothing is deleted). A checkpoint whose arrays do not fit `abstract_state`
    raises CheckpointMismatchError at once: that is a config change, not damage, and an older
    checkpoint of the same run would not fit either."""
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps or steps[0] is None:
      raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
    self.damaged = []
    for s in steps:
      try:
        with _reads_settle_on_failure():
          restored = self.manager.restore(
              s,
              args=ocp.args.Composite(
                  state=_restore_args(abstract_state, partial),
                  data=ocp.args.JsonRestore()))
        data = from_jsonable(restored["data"]["state"])
      except Exception as e:  # noqa: BLE001  (any failure is classified below)
        misfit = self._misfit(s, abstract_state, partial)
        if misfit is not None:
          raise CheckpointMismatchError(
              f"checkpoint {self.directory}/{s} does not fit the model of the current config "
              f"({misfit}); it was written with other settings: use the config it was trained "
              "with (saved in its config item) or a fresh --workdir") from None
        reason = _one_line(e)
        self.damaged.append((s, reason))
        _quiet_abandoned_reads()
        if jax.process_index() == 0:
          print(f"lego-jax: checkpoint {self.directory}/{s} is damaged ({reason}); "
                + ("trying the one before" if s != steps[-1] else "no older one"),
                file=sys.stderr, flush=True)
        continue
      if self.damaged and jax.process_index() == 0:
        print(f"lego-jax: restored checkpoint {s} in {self.directory}, the newest intact one "
              f"(damaged, kept: {', '.join(str(d) for d, _ in self.damaged)})",
              file=sys.stderr, flush=True)
      return s, restored["state"], data
    raise CheckpointDamagedError(
        f"every checkpoint in {self.directory} is damaged ("
        + "; ".join(f"{d}: {r}" for d, r in self.damaged)
        + "): move the directory aside to start afresh, or restore it from a copy")

  def _misfit(self, step: int, abstract_state: Any, partial: bool = False) -> str | None:
    """How the checkpoint's recorded arrays differ from `abstract_state`, or None when they fit
    (or the record itself is unreadable, which is damage)."""
    try:
      meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
      saved = _shapes(getattr(meta, "tree", meta))
    except Exception:  # noqa: BLE001
      return None
    if not saved:
      return None
    wanted = _shapes(abstract_state)
    missing = sorted(set(wanted) - set(saved))
    extra = [] if partial else sorted(set(saved) - set(wanted))
    if missing or extra:
      return ("arrays " + ", ".join(missing[:3]) + " not in it" if missing else
              "it holds arrays " + ", ".join(extra[:3]) + " the model lacks")
    for k in wanted:
      if tuple(wanted[k]) != tuple(saved[k]):
        return f"{k}: shape {tuple(saved[k])} in it, {tuple(wanted[k])} in the model"
    return None

  def set_aside(self, steps: list[int]) -> list[Path]:
    """Moves damaged checkpoints to <directory>.damaged/<step> (kept for inspection, out of the
    manager's way so training can save those steps again). Process 0 moves; all then reload."""
    moved = []
    if jax.process_index() == 0:
      for s in steps:
        dest = self.directory.with_name(self.directory.name + ".damaged") / str(s)
        n = 1
        while dest.exists():
          dest = dest.with_name(f"{s}.{n}")
          n += 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(s)).rename(dest)
        moved.append(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("lego_jax_checkpoint_set_aside")
    self.manager.reload()
    return moved

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


def _restore_args(abstract_state: Any, partial: bool):
  if not partial:
    return ocp.args.StandardRestore(abstract_state)
  return ocp.args.PyTreeRestore(
      item=abstract_state, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


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
