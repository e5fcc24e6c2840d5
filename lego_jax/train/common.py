"""Pieces every trainer shares: the train state's layout, optimizer from config, freezing by
regex, EMA, logging.

Trainers keep parameters as a plain pytree (from `nnx.split`) so that the step function is a pure
function of (state, batch, rng) that jits once with explicit shardings and donation. Every
trainer's state is laid out by `make_state` (the checkpoints hold it as it is; the data
iterator's state and the config are saved beside it, lego_jax/train/checkpoint.py).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lego_jax.config import ConfigError
from lego_jax.parallel import sharding


def check_schedule(section: str, t, mesh, *, pairs: bool = False, epochs_allowed: bool = False) -> None:
  """Refuses, before anything is built, a `<section>` whose steps or batch the run cannot honour:
  negative steps (-1 = epochs where `epochs_allowed`), or a batch that does not split evenly into
  grad_accum micro-batches over the mesh's batch devices (data x fsdp) and the hosts (`pairs`:
  the batch counts images, half input and half target frames, so it must also be even)."""
  low = -1 if epochs_allowed else 0
  if int(t.num_steps) < low:
    raise ConfigError(f"{section}.num_steps={t.num_steps} is negative: give the number of steps "
                      + ("(or -1 for vllm_train.epochs passes)" if epochs_allowed else "(>= 0)"))
  batch = int(t.batch_size)
  accum = max(int(t.get("grad_accum", 1)), 1)
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  hosts = jax.process_count()
  # Each host reads batch / hosts rows (for pairs: an even number, its input and target frames).
  unit = math.lcm(accum * devices, accum * hosts * (2 if pairs else 1))
  if batch <= 0 or batch % unit:
    what = " (half input, half target frames, per host)" if pairs else ""
    raise ConfigError(
        f"{section}.batch_size={batch}{what} must be a positive multiple of {unit}: it splits "
        f"into grad_accum={accum} micro-batches over the {devices} device(s) of the mesh's batch "
        f"axes (data x fsdp) and {hosts} host(s); e.g. --config.{section}.batch_size="
        f"{max(unit, batch // unit * unit)}")


def make_state(mesh, tx: optax.GradientTransformation, trained: Any, frozen: Any, *,
               ema: bool = False, extra: dict[str, jax.Array] | None = None,
               abstract: bool = False) -> tuple[dict, dict]:
  """(state, shardings): the one train-state layout of every trainer, placed on `mesh`:

    step       int32, updates applied (the loop's step count; non-finite steps are not counted)
    nonfinite  int32, steps whose loss or gradients were not finite (left unapplied)
    trained    the parameters the optimizer updates
    frozen     every other variable of the models (frozen parameters, non-parameter state)
    opt_state  `tx`'s state of `trained`
    ema        (with `ema`) the exponential moving average of `trained`, starting as a copy
    **extra    stage-specific arrays saved with the checkpoint (the LDM's latent scale),
               replicated

  Parameters and Adam's moments (which carry the parameters' logical names) shard by the one
  rule table; the rest is replicated. `abstract`: ShapeDtypeStructs with those shardings
  instead of arrays (restore and compile targets; nothing is allocated), from abstract or
  concrete `trained` / `frozen` alike."""
  replicated = NamedSharding(mesh, P())
  opt_shapes = jax.eval_shape(tx.init, trained)
  shardings = {"trained": sharding.state_shardings(mesh, trained),
               "frozen": sharding.state_shardings(mesh, frozen),
               "opt_state": sharding.state_shardings(mesh, opt_shapes)}
  if ema:
    shardings["ema"] = shardings["trained"]
  scalars = {"step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
             **(extra or {})}
  shardings.update({k: replicated for k in scalars})
  if abstract:
    shapes = {"trained": trained, "frozen": frozen, "opt_state": opt_shapes, **scalars}
    if ema:
      shapes["ema"] = trained
    state = {k: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), v, shardings[k])
        for k, v in shapes.items()}
    return state, shardings
  state = jax.device_put({"trained": trained, "frozen": frozen},
                         {"trained": shardings["trained"], "frozen": shardings["frozen"]})
  # Explicit output shardings: left to jit, the step counts (which depend on no input) land on
  # one device, off the mesh.
  state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["trained"])
  if ema:
    state["ema"] = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(state["trained"])
  state.update(jax.device_put(scalars, replicated))
  return state, jax.tree.map(lambda x: x.sharding, state)


class NonFiniteError(RuntimeError):
  """Loss or gradient went NaN/Inf; the last good checkpoint is kept."""


def path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def label_params(params: Any, frozen: str | None) -> Any:
  """'frozen' for parameters whose path (a/b/c) matches the regex, else 'trained'."""
  rx = re.compile(frozen) if frozen else None
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if rx is not None and rx.search(path_str(p)) else "trained", params)


def log_warmup(base: float, warmup: int) -> optax.Schedule:
  """DeepSpeed's WarmupLR with its default warmup_type "log" (min lr 0), in optimizer steps k:
  the scheduler starts at iteration -1 (lr 0) and steps after each update, so update k uses
  base * log(k) / log(W), W = max(2, warmup), for 1 <= k <= W (0 at k = 0 and 1), then base."""
  w = max(2, warmup)

  def schedule(k):
    k = jnp.maximum(jnp.asarray(k, jnp.float32), 1.0)
    return base * jnp.minimum(1.0, jnp.log(k) / math.log(w))
  return schedule


WARMUPS = ("linear", "log")


def learning_rate(base: float, total_steps: int, warmup_ratio: float = 0.0,
                  schedule: str = "constant", warmup_shape: str = "linear") -> optax.Schedule:
  """Warm-up over `warmup_ratio` of the steps (linear from 0, or DeepSpeed WarmupLR's "log"),
  then constant or cosine to 0."""
  warmup = int(math.ceil(warmup_ratio * max(total_steps, 1)))
  if warmup_shape not in WARMUPS:
    raise ValueError(f"unknown warm-up shape {warmup_shape!r} (one of {WARMUPS})")
  if warmup_shape == "log" and warmup > 0:
    if schedule != "constant":  # WarmupLR holds the peak: it has no decay to join
      raise ValueError("the log warm-up is DeepSpeed's WarmupLR, which stays constant after it: "
                       f"schedule={schedule!r} needs warmup_shape='linear'")
    return log_warmup(base, warmup)
  if schedule == "constant":
    after = optax.constant_schedule(base)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"unknown lr schedule {schedule!r} (constant or cosine)")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), after], [warmup])


def adamw(params: Any, lr: optax.Schedule | float, *, weight_decay: float = 0.0, b1=0.9, b2=0.999,
          eps=1e-8, frozen: str | None = None, grad_clip: float | None = None) -> optax.GradientTransformation:
  """AdamW (PyTorch defaults) on trained params only; frozen ones get zero updates and no state."""
  chain = []
  if grad_clip:
    chain.append(optax.clip_by_global_norm(grad_clip))
  chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  tx = optax.chain(*chain)
  if frozen is None:
    return tx
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               label_params(params, frozen))


def ema_decay(num_updates: jax.Array, max_decay: float) -> jax.Array:
  """LitEma's warm-up: decay = min(max_decay, (1 + n) / (10 + n))."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, num_updates: jax.Array, max_decay: float) -> Any:
  d = ema_decay(num_updates, max_decay)
  return jax.tree.map(lambda e, p: e - (1.0 - d) * (e - p.astype(e.dtype)), ema, params)


def accumulate_gradients(grad_fn, params: Any, batch: Any, per_example: Any, accum: int):
  """Mean loss/aux and gradients over `accum` micro-batches, run as a scan so any global batch
  fits memory. grad_fn(params, micro_batch, micro_per_example) -> ((loss, aux), grads); every leaf
  of `batch` and `per_example` has the global batch as its leading axis. The micro-batch index is
  added to the last per-example leaf (an int) so callers can fold it into a key."""
  if accum <= 1:
    return grad_fn(params, batch, per_example)
  split = lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
  micro, micro_extra = jax.tree.map(split, batch), jax.tree.map(split, per_example)
  *rest, last = jax.tree.leaves(micro_extra)
  last = last + jnp.arange(accum, dtype=last.dtype)[:, None]
  micro_extra = jax.tree.unflatten(jax.tree.structure(micro_extra), rest + [last])

  first = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                         jax.tree.map(lambda x: x[0], micro_extra)))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

  def body(carry, xs):
    out = grad_fn(params, *xs)
    return jax.tree.map(jnp.add, carry, out), None

  total, _ = jax.lax.scan(body, zeros, (micro, micro_extra))
  return jax.tree.map(lambda x: x / accum, total)


def all_finite(*trees) -> jax.Array:
  leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def cast_tree(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def step_rng(seed: int, step: int | jax.Array) -> jax.Array:
  # Derived from (seed, step) alone so a resumed run draws exactly what an uninterrupted one did.
  return jax.random.fold_in(jax.random.key(seed), step)


def _summary_writer_class():
  """tensorboardX's SummaryWriter without torch: its writer module imports torch, when it can,
  only to accept torch tensors (we log numpy), and that import costs 1.4-2.4 s of every training
  process on the 2-core build machine. A process that has torch already keeps it."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """TensorBoard scalars/images (tensorboardX) plus a metrics.jsonl anyone can plot."""

  def __init__(self, logdir: str | Path, enabled: bool = True, resume_step: int | None = None):
    """`resume_step`: the step a run resumes from (0 for a fresh one); logged steps after it,
    left by a run that was cut short, are dropped from metrics.jsonl (an atomic rewrite) and
    hidden in TensorBoard (tensorboardX's purge_step), so the history is the resumed run's."""
    self.logdir = Path(logdir)
    self.enabled = enabled and jax.process_index() == 0
    self._tb = None
    if self.enabled:
      self.logdir.mkdir(parents=True, exist_ok=True)
      path = self.logdir / "metrics.jsonl"
      purge = None
      if resume_step is not None and path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if _logged_step(line) is not None and _logged_step(line) <= resume_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept))
        tmp.replace(path)
        purge = resume_step + 1
      self._tb = _summary_writer_class()(str(self.logdir), purge_step=purge)
      self._jsonl = open(path, "a")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in values.items():
      self._tb.add_scalar(k, float(v), step)
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(),
                                  **{k: float(v) for k, v in values.items()}}) + "\n")
    self._jsonl.flush()

  def image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _logged_step(line: str) -> int | None:
  # A line cut by a kill mid-write is not JSON: it is dropped with the steps after the resume.
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(logdir: str | Path) -> list[dict]:
  p = Path(logdir) / "metrics.jsonl"
  if not p.exists():
    return []
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def split_params(model: nnx.Module):
  """(graphdef, params, rest): params are what the optimizer sees."""
  return nnx.split(model, nnx.Param, ...)


def param_count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
