"""The bench harness: the device's facts, timing implementations against each other, and the
compiled JAX program with its counted FLOPs. Flag-free: lego_jax/bench/bench.py (the command)
decides what to run, lego_jax/bench/workloads.py builds it.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.bench import flops as flops_lib
from lego_jax.parallel import sharding

# Dense bf16 peak TFLOP/s per chip, matched in order against `device_kind` (lower case).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0), ("h100", 989.0), ("gh200", 989.0), ("a100", 312.0),
    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v5", 459.0),
    ("v6 lite", 918.0), ("v6e", 918.0),
)


# --- the device -------------------------------------------------------------------------------


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, peak in PEAK_TFLOPS:
    if key in kind:
      return peak
  return None


def device_info(devices) -> dict:
  d = devices[0]
  return {"backend": d.platform, "device_kind": d.device_kind, "num_devices": len(devices),
          "peak_tflops_per_device": None if d.platform == "cpu" else peak_tflops(d.device_kind)}


def peak_memory_bytes(devices) -> int | None:
  """Highest bytes in use on any of `devices` since the process started (None on CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # backends without allocator statistics
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def compiled_memory(compiled) -> dict | None:
  """XLA's memory analysis of a compiled program: arguments, outputs, temporaries (bytes)."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f, 0)) for f in fields}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"])
  return out


# --- implementations and timing ---------------------------------------------------------------


@dataclasses.dataclass
class Impl:
  """One implementation of a bench: `step()` runs one step and returns when the device is done.

  compile_s: lower + compile (JAX AOT) or None (torch eager; torch.compile's is measured as its
  first call minus a steady step). info: anything worth reporting (dtype, memory, ...).
  """
  name: str
  step: Callable[[], Any]
  compile_s: float | None = None
  info: dict = dataclasses.field(default_factory=dict)
  close: Callable[[], None] = lambda: None
  compiles_on_first_call: bool = False


_T0 = time.perf_counter()


def phase(words: str) -> None:
  """One line on stderr per phase (seconds since import): a bench killed by its timeout still
  says where its time went (on an H200 the full-size UNet train step outlasted 140 s without a
  word, 2026-12-04)."""
  print(f"bench [{time.perf_counter() - _T0:7.1f} s] {words}", file=sys.stderr, flush=True)


def _timed(step: Callable[[], Any], cpu_s: list[float] | None = None) -> float:
  """Wall seconds of one step; with `cpu_s`, also appends the process's CPU seconds (every
  thread: XLA:CPU runs independent ops on a pool of one thread per core)."""
  start, start_cpu = time.perf_counter(), time.process_time()
  step()
  if cpu_s is not None:
    cpu_s.append(time.process_time() - start_cpu)
  return time.perf_counter() - start


def _warm(impl: Impl, warmup: int) -> None:
  first = [_timed(impl.step) for _ in range(max(warmup, 1))]
  if impl.compiles_on_first_call:
    # torch.compile compiles inside its first call; a later call is a fair stand-in for a step.
    impl.compile_s = max(first[0] - min(first[1:] or [0.0]), 0.0)


def measure(factories: list[tuple[str, Callable[[], Impl]]], *, steps: int, warmup: int,
            repeats: int, interleave: bool) -> dict[str, dict]:
  """Times every implementation; returns name -> {times_s, compile_s, info}.

  interleave: all implementations live at once and take turns, round by round, in ABBA order
  (so a slow stretch of the machine lands on each alike); otherwise each runs alone, in order,
  and is closed before the next is built.
  """
  results: dict[str, dict] = {}

  def record(impl: Impl, n: int) -> None:
    entry = results.setdefault(impl.name, {"times_s": [], "cpu_s": [], "info": impl.info})
    entry["times_s"] += [_timed(impl.step, entry["cpu_s"]) for _ in range(n)]
    entry["compile_s"] = impl.compile_s

  if interleave:
    impls = []
    for name, make in factories:
      phase(f"{name}: building")
      impls.append(make())
      phase(f"{name}: built; warm-up")
      _warm(impls[-1], warmup)
    for r in range(repeats):
      for impl in (impls if r % 2 == 0 else impls[::-1]):
        record(impl, steps)
    for impl in impls:
      impl.close()
  else:
    for name, make in factories:
      phase(f"{name}: building")
      impl = make()
      phase(f"{name}: built; warm-up")
      _warm(impl, warmup)
      phase(f"{name}: timing {steps * repeats} steps")
      record(impl, steps * repeats)
      phase(f"{name}: done")
      impl.close()
      del impl
      gc.collect()
  return results


def summarise(times_s: list[float]) -> dict:
  ms = sorted(1000.0 * t for t in times_s)
  q = lambda p: ms[min(len(ms) - 1, int(round(p * (len(ms) - 1))))]  # noqa: E731
  return {"ms_per_step": statistics.median(ms), "ms_min": ms[0], "ms_p10": q(0.1),
          "ms_p90": q(0.9), "timed_steps": len(ms)}


# --- JAX programs -----------------------------------------------------------------------------


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


def random_model(build: Callable[[], Any], mesh, seed: int = 0):
  """`build()`'s module(s) with random weights of a sensible scale, made directly on the mesh.

  The models' own initialisers are not run: compiling them takes minutes on a CPU (and a 13B
  model's would allocate twice). Speed does not depend on the values, but they are never zeros
  (see METHOD: zeros can run faster than data): kernels N(0, 1/fan_in), norm scales
  1 + N(0, 0.01^2), biases and embeddings N(0, 0.01^2). Small arrays are drawn on the host, large
  ones on the device.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  shardings = sharding.state_shardings(mesh, state)
  rng = np.random.default_rng(seed)
  counter = iter(range(1 << 30))

  def fill(path, leaf, target):
    shape, dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      keys = jax.random.split(jax.random.key(seed), max(math.prod(shape), 1))
      return jax.device_put(keys.reshape(shape) if shape else keys[0], target)
    if not jnp.issubdtype(dtype, jnp.floating):
      return jax.device_put(np.zeros(shape, dtype), target)
    keys = {getattr(p, "key", getattr(p, "name", None)) for p in path}
    vector = len(shape) < 2 or keys & {"scale", "bias", "embedding"}
    std = 0.01 if vector else 1.0 / math.sqrt(math.prod(shape[:-1]))
    offset = 1.0 if "scale" in keys else 0.0
    if math.prod(shape) <= 1 << 20:
      values = offset + std * rng.standard_normal(shape, np.float32)
      return jax.device_put(values.astype(dtype), target)
    key = jax.random.key(seed + next(counter))
    return _device_normal(shape, dtype, std, offset, target)(key)

  filled = jax.tree.map_with_path(fill, state, shardings)
  return nnx.merge(graphdef, filled)


@functools.lru_cache(maxsize=None)
def _device_normal(shape, dtype, std, offset, target):
  return jax.jit(lambda key: (offset + std * jax.random.normal(key, shape, jnp.float32)
                              ).astype(dtype), out_shardings=target)


@dataclasses.dataclass
class Program:
  """A jitted function with the arguments it is timed on.

  fn(*args) -> outputs. With `carry` the first output replaces args[0] for the next call (a train
  state; it is donated). flops_fn: what to count when it is not fn itself (the step without
  remat); while_trips: the trip count of its while loops (decode); compiler_options: XLA options
  of this program's compile.
  """
  fn: Callable
  args: tuple
  mesh: Any
  carry: bool = False
  in_shardings: Any = None
  out_shardings: Any = None
  flops_fn: Callable | None = None
  while_trips: int = 1
  compiler_options: dict | None = None


def jax_impl(program: Program, devices) -> tuple[Impl, dict]:
  """AOT-compiles `program`; returns the Impl and its static facts (FLOPs, memory)."""
  kwargs = {}
  if program.in_shardings is not None:
    kwargs.update(in_shardings=program.in_shardings, out_shardings=program.out_shardings)
  jitted = jax.jit(program.fn, donate_argnums=(0,) if program.carry else (), **kwargs)
  with sharding.use_mesh(program.mesh):
    start = time.perf_counter()
    phase("jax: tracing and lowering")
    traced = jitted.trace(*program.args)
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    phase(f"jax: lowered in {lowered_at - start:.1f} s; compiling")
    compiled = lowered.compile(program.compiler_options)
    compiled_at = time.perf_counter()
    phase(f"jax: compiled in {compiled_at - lowered_at:.1f} s; counting FLOPs")
    if program.flops_fn is None:
      counted = flops_lib.count_jaxpr(traced.jaxpr.jaxpr, program.while_trips)
    else:  # the same step without remat: model FLOPs
      counted = flops_lib.count_flops(program.flops_fn, *abstract(program.args),
                                      while_trips=program.while_trips)
  facts = {"lower_s": lowered_at - start, "xla_compile_s": compiled_at - lowered_at,
           "flops_per_step": counted.total,
           "flops_by_kind": {"matmul": counted.matmul, "conv": counted.conv,
                             "fused_attention": counted.attention},
           "xla_cost_analysis_flops": flops_lib.xla_flops(compiled),
           "compiled_memory": compiled_memory(compiled)}
  args = list(program.args)

  def step():
    out = compiled(*args)
    if program.carry:
      args[0] = out[0]
    jax.block_until_ready(out)

  def close():
    args.clear()

  impl = Impl("jax", step, compile_s=compiled_at - start, close=close)
  return impl, facts


def random_batch(shapes: dict[str, tuple[tuple[int, ...], str, float]], seed: int = 0) -> dict:
  """name -> (shape, kind, scale): "normal" float32 x scale, "uniform" in [-scale, scale],
  "int" in [1, scale). Never zeros (they can run faster than data)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, (shape, kind, scale) in shapes.items():
    if kind == "normal":
      out[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    elif kind == "uniform":
      out[name] = rng.uniform(-scale, scale, shape).astype(np.float32)
    else:
      out[name] = rng.integers(1, int(scale), shape).astype(np.int32)
  return out


def param_count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
