"""The one training loop every stage runs: resume, step, log, checkpoint, stop cleanly.

The step function is pure and jitted by the trainer (explicit shardings, donated state); this loop
only orchestrates. Guarantees the trainers rely on:
- Resume: the latest finished checkpoint (train state + Grain iterator state) is restored, and the
  per-step RNG is derived from (seed, step), so a run killed at any step and restarted with the same
  command ends bitwise equal (CPU) to an uninterrupted run, having seen the same batches.
- Non-finite loss/gradients: the step function leaves the state unchanged on such a step and counts
  it in `state["nonfinite"]`; unless `skip_nonfinite`, the loop then stops with a clear message and
  the last good checkpoint stays the latest.
- SIGTERM (preemption): a checkpoint of the current step is written, then `Preempted` is raised
  (the CLI turns it into exit status 143 with a one-line message), so nothing after training
  runs on a half-trained model.
- Multi-host: every process calls save; the data-iterator states of all processes are gathered
  into the one checkpoint (lego_jax.parallel.distributed), so each host resumes its own shards.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from lego_jax.data import pipeline
from lego_jax.parallel import distributed
from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train.checkpoint import Preempted
from lego_jax.train.common import MetricWriter, NonFiniteError, step_rng


def run(*, name: str, workdir: str | Path, config: dict, state: Any, state_shardings: Any,
        step_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]],
        loader, batch_fn: Callable[[dict], dict], num_steps: int, seed: int,
        log_every: int = 50, ckpt_every: int = 1000, keep: int = 3, async_save: bool = True,
        skip_nonfinite: bool = False, items_per_step: int | None = None, item_name: str = "samples",
        on_log: Callable[[int, dict], None] | None = None,
        every: dict[int, Callable[[int, Any], None]] | None = None,
        stop_after: int | None = None) -> Any:
  """Trains `state` for `num_steps` steps and returns it. See module doc for the guarantees.

  Args:
    state: the initial train state (a pytree with at least "step" and "nonfinite" scalars);
      replaced by the checkpoint's when one exists.
    state_shardings: the shardings of `state` on the current mesh (restore targets).
    loader: a Grain DataLoader or a distributed.ShardedLoader (iterable with
      get_state/set_state iterators).
    batch_fn: host batch -> the step's global arrays.
    every: {period: callback(step, state)} for samples/evaluation every N steps.
    stop_after: return after this many steps of THIS process (tests of interruption).
  """
  workdir = Path(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints" / name, keep=keep, async_save=async_save)
  start = 0
  data_state = None
  iterator = None
  try:
    if ckpt.latest_step() is not None:
      abstract = ckpt_lib.abstract_like(state, state_shardings)
      start, state, data_state = ckpt.restore(abstract)
      if ckpt.damaged:
        # Out of the manager's way (kept, not deleted) so this run can save those steps again.
        ckpt.set_aside([s for s, _ in ckpt.damaged])
    iterator: Iterator = iter(loader)
    if data_state is not None:
      try:
        iterator.set_state(distributed.this_process_data_state(data_state))
      except ValueError as e:
        raise ckpt_lib.CheckpointMismatchError(_data_state_mismatch(e, name, start, ckpt)) from None
  except BaseException:
    if iterator is not None:
      pipeline.close_iterator(iterator)
    ckpt.close()
    raise
  # One history: the metrics of steps after the restored one (written by the run that was cut
  # short) are dropped, so a resumed run's curves continue from its checkpoint.
  writer = MetricWriter(workdir / "logs" / name, resume_step=start)
  seen_nonfinite = int(jax.device_get(state["nonfinite"]))

  def check_finite(step: int) -> int:
    nonfinite = int(jax.device_get(state["nonfinite"]))
    if nonfinite > seen_nonfinite and not skip_nonfinite:
      raise NonFiniteError(
          f"{name}: non-finite loss or gradient at or before step {step} "
          f"({nonfinite - seen_nonfinite} step(s) skipped); the last good checkpoint "
          f"({ckpt.latest_step()}) is kept. Lower the learning rate or pass "
          f"--config.{name}_train.skip_nonfinite=true to skip such steps.")
    return nonfinite

  bar = tqdm(total=num_steps, initial=start, desc=name, dynamic_ncols=True,
             disable=jax.process_index() != 0)
  last_t, last_step = time.perf_counter(), start
  step = start
  done_here = 0
  preempted = False
  with ckpt_lib.Preemption() as preempt:
    try:
      while step < num_steps:
        batch = batch_fn(next(iterator))
        state, metrics = step_fn(state, batch, step_rng(seed, step))
        step += 1
        done_here += 1
        at_log = step % log_every == 0 or step == num_steps
        if at_log:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          nonfinite = check_finite(step)
          now = time.perf_counter()
          rate = (step - last_step) / max(now - last_t, 1e-9)
          m["steps_per_s"] = rate
          if items_per_step:
            m[f"{item_name}_per_s"] = rate * items_per_step
          m["nonfinite_steps"] = nonfinite
          writer.scalars(step, m)
          bar.set_postfix({k: f"{v:.4g}" for k, v in m.items() if k in ("loss", f"{item_name}_per_s")})
          last_t, last_step = now, step
          if on_log:
            on_log(step, m)
        bar.update(1)
        for period, callback in (every or {}).items():
          if period and step % period == 0:
            callback(step, state)
        preempted = preempt.requested
        stop = preempted or (stop_after is not None and done_here >= stop_after)
        if step % ckpt_every == 0 or step == num_steps or stop:
          # A checkpoint is never written past a rejected step: the latest stays the last good.
          check_finite(step)
          ckpt.save(step, state, distributed.gather_data_states(iterator.get_state()), config,
                    force=True)
        if stop:
          break
    finally:
      bar.close()
      # The data workers stop and their queued batches are unlinked before anything else ends
      # (pipeline's module doc); the checkpoint manager's threads are joined.
      pipeline.close_iterator(iterator)
      ckpt.close()
      writer.close()
  if preempted and step < num_steps:
    raise Preempted(f"{name}: stopped by SIGTERM after step {step}; checkpoint {step} is saved "
                    f"in {ckpt.directory}. Run the same command again to resume.")
  return state


def _data_state_mismatch(e: ValueError, name: str, step: int, ckpt) -> str:
  msg = str(e)
  counts = re.findall(r"worker count in (?:checkpoint|dataloader): (\d+)", msg)
  if len(counts) == 2:
    return (f"checkpoint {step} of {name} was written with data.num_workers={counts[0]}, this run "
            f"has {counts[1]}: Grain cannot move a data position between worker counts; resume "
            f"with --config.data.num_workers={counts[0]} (or a fresh --workdir)")
  return (f"checkpoint {step} of {name} ({ckpt.directory}) holds a data-iterator state this run's "
          f"data pipeline does not accept ({msg.splitlines()[0][:160]}); resume with the data "
          "settings it was written with (its config item) or use a fresh --workdir")


def host_numeric(batch: dict, keys: tuple[str, ...]) -> dict:
  return {k: np.asarray(batch[k]) for k in keys}
