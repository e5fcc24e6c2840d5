"""`lego-jax plan`: will the paper's training fit, and on what? Answered before renting anything.

The REAL jitted train steps of the trainers (train/vae.py, train/vllm.py, train/ldm.py; remat and
compute dtypes as configured) are lowered and compiled ahead of time on a fake CPU device mesh,
from abstract shapes only: the models are built with `nnx.eval_shape`, the train state is
`jax.ShapeDtypeStruct`s carrying the trainer's shardings, and nothing is allocated. For every
stage, mesh shape and device count it reports

  - per-device memory of the compiled step (`compiled.memory_analysis()`: arguments + outputs -
    donated aliases + XLA temporaries), and whether it fits each target's HBM with 10% headroom:
    8 x A100-40G (the paper's node), 8 x H100-80G, TPU v5p-8 (4 chips, 95 GB each),
    v5e-16 (16 chips, 16 GB), v6e-8 (8 chips, 32 GB);
  - FLOPs per step: matmul and convolution FLOPs counted on the step's jaxpr, scanned layers
    times their trip count and rematerialised forwards included (XLA's `cost_analysis()`, also
    printed, counts a scanned layer's body once, so it under-reports deep models);
  - the micro-batch per device: global batch / grad_accum / (data x fsdp devices).

The compile is XLA's CPU backend: parameter, gradient and optimizer bytes are exact; activation
temporaries are the CPU compiler's buffer assignment, an estimate of what GPU/TPU compilers do.
`use_fake_devices` must run before JAX starts a backend (the CLI calls it for this command).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lego_jax.config import ConfigError
from lego_jax.parallel import sharding

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "mesh", "vae", "vae_train", "clip_vision", "llama", "llava",
                   "vllm_train", "unet", "clip_text", "conditioner", "ldm_train")


FAKE_DEVICES = 16
HEADROOM = 0.9  # of HBM usable by the step (runtime, fragmentation; GPUs: set
#                 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9, JAX's default preallocation is 0.75)
GIB = 2**30

_STAGES = flags.DEFINE_list("plan_stages", ["vllm", "ldm", "vae"], "plan: stages to compile")
_MESHES = flags.DEFINE_list(
    "plan_meshes", ["config", "1:-1:1"],
    "plan: (data:fsdp:tensor) mesh shapes to try, -1 = the remaining devices; 'config' = "
    "cfg.mesh.shape")
_TARGETS = flags.DEFINE_list("plan_targets", [], "plan: target names (default: all)")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  chips: int
  hbm_gib: float


TARGETS = (
    Target("8x A100-40G", 8, 40.0),
    Target("8x H100-80G", 8, 80.0),
    Target("TPU v5p-8", 4, 95.0),
    Target("TPU v5e-16", 16, 16.0),
    Target("TPU v6e-8", 8, 32.0),
)


def use_fake_devices(count: int = FAKE_DEVICES) -> None:
  """CPU devices for the whole plan; only possible before any JAX backend has started.

  The plan never runs the programs it compiles, so LLVM's optimisations of the CPU code are
  switched off: they take most of the compile time and do not change XLA's buffer assignment,
  which is what the memory numbers come from."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", count)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true")


@dataclasses.dataclass
class Stage:
  """What one trainer compiles: its pure step and abstract arguments."""
  name: str
  step: Callable
  state: Any             # ShapeDtypeStructs with the trainer's shardings
  shardings: Any
  batch: dict            # ShapeDtypeStructs of the global batch, split over (data, fsdp)
  global_batch: int
  grad_accum: int
  trained_params: int
  total_params: int


def _place(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _batch(mesh, arrays: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
  return {k: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1),
                                                     shape))
          for k, (shape, dtype) in arrays.items()}


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _opt_state(tx, trained, mesh):
  # What jit gives tx.init of the placed parameters: Adam moments follow the parameters; the
  # step counts, which depend on no input, come out on one device and are replicated instead.
  compiled = jax.jit(tx.init).lower(trained).compile()
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated,
                           compiled.output_shardings)
  return _place(jax.eval_shape(tx.init, trained), shardings)


def vae_stage(cfg, mesh) -> Stage:
  from lego_jax.train import vae

  t = cfg.vae_train
  made = {}

  def init():
    graphdef, state, shardings, tx = vae.init_state(cfg, mesh)
    made.update(graphdef=graphdef, shardings=shardings, tx=tx)
    return state

  state = _place(jax.eval_shape(init), made["shardings"])
  s = cfg.data.image_size
  return Stage("vae", vae.make_train_step(made["graphdef"], made["tx"], t.kl_weight, t.l2_weight),
               state, made["shardings"],
               _batch(mesh, {"images": ((t.batch_size, s, s, 3), jnp.float32)}),
               t.batch_size, 1, _count(state["params"]), _count(state["params"]))


def vllm_stage(cfg, mesh) -> Stage:
  from lego_jax.train import vllm

  t = cfg.vllm_train
  vllm.check_config(cfg, mesh)
  # The schedule's length changes learning-rate values only, never shapes or memory.
  num_steps = t.num_steps if t.num_steps > 0 else 1000
  graphdef, state, shardings, tx, schedule = vllm.init_state(cfg, mesh, num_steps, abstract=True)
  accum = max(int(t.grad_accum), 1)
  step = vllm.make_train_step(graphdef, tx, schedule, accum=accum, zero_image=bool(t.zero_image))
  b, n, v = t.batch_size, t.max_length, cfg.data.vllm_image_size
  batch = _batch(mesh, {"ids": ((b, n), jnp.int32), "targets": ((b, n), jnp.int32),
                        "weights": ((b, n), jnp.float32), "pixels": ((b, v, v, 3), jnp.float32),
                        "truncated": ((b,), jnp.float32)})
  return Stage("vllm", step, state, shardings, batch, b, accum, _count(state["trained"]),
               _count([state["trained"], state["frozen"]]))


def ldm_stage(cfg, mesh) -> Stage:
  """train/ldm.py's state, built abstractly (its init_state reads the VAE from a workdir)."""
  from lego_jax.train import common, ldm
  from lego_jax.train import vae as vae_train

  t = cfg.ldm_train

  def modules():
    unet, conditioner = ldm.build_trainable(cfg, cfg.seed)
    return unet, conditioner, ldm.build_text_encoder(cfg, cfg.seed), vae_train.build(cfg)

  unet, conditioner, clip_text, vae_model = nnx.eval_shape(modules)
  graphdefs, trained, frozen = {}, {}, {}
  for name, module, trains in (("unet", unet, True), ("conditioner", conditioner,
                                                      t.train_projections),
                               ("vae", vae_model, False), ("clip_text", clip_text, False)):
    graphdefs[name], params = nnx.split(module)
    (trained if trains else frozen)[name] = params
  tx = common.adamw(trained, t.lr, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps)
  replicated = NamedSharding(mesh, P())
  trained = _place(trained, sharding.state_shardings(mesh, trained))
  frozen = _place(frozen, sharding.state_shardings(mesh, frozen))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  state = {"trained": trained, "frozen": frozen, "opt_state": _opt_state(tx, trained, mesh),
           "ema": trained, "step": scalar, "nonfinite": scalar}
  shardings = jax.tree.map(lambda x: x.sharding, state)
  text_len = 77  # CLIP's context: ldm.TextIds pads every text to it

  class _Ids:  # the host-side text tokenizer, for shapes only
    def __call__(self, batch):
      return np.zeros((len(batch["input"]), text_len), np.int32)

  s = cfg.data.image_size
  one = {"input": np.zeros((1, s, s, 3), np.uint8), "target": np.zeros((1, s, s, 3), np.uint8)}
  example = ldm.batch_arrays(cfg, one, _Ids())  # the trainer's own batch layout, one row
  b = t.batch_size
  batch = _batch(mesh, {k: ((b,) + v.shape[1:], v.dtype) for k, v in example.items()})
  step = ldm.make_train_step(cfg, graphdefs, tx, ldm.schedule_of(cfg),
                             jnp.zeros((1, text_len), jnp.int32))
  return Stage("ldm", step, state, shardings, batch, b, max(int(t.grad_accum), 1),
               _count(trained), _count([trained, frozen]))


STAGES: dict[str, Callable[[Any, Any], Stage]] = {"vae": vae_stage, "vllm": vllm_stage,
                                                   "ldm": ldm_stage}


# ---------------------------------------------------------------------------------------------
# FLOPs on the jaxpr (XLA's cost analysis counts a loop body once).

def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (_, rc), (_, rb) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs.shape) if i not in rc and i not in rb]
  return 2 * math.prod(lhs.shape) * math.prod(rhs_free)


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
  window = math.prod(rhs.shape[d] for d in spec[2:])
  return 2 * math.prod(out.shape) * rhs.shape[spec[1]] * window


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
  """Matmul + convolution FLOPs of a (closed) jaxpr; scans count `length` times, conds their
  most expensive branch."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


# ---------------------------------------------------------------------------------------------

def parse_mesh(text: str, cfg) -> tuple[int, ...]:
  if text == "config":
    return tuple(cfg.mesh.shape)
  try:
    shape = tuple(int(x) for x in text.split(":"))
  except ValueError:
    shape = ()
  if len(shape) != len(sharding.MESH_AXES):
    raise ConfigError(f"--plan_meshes entry {text!r}: expected 'config' or data:fsdp:tensor, "
                     "e.g. 1:-1:1")
  return shape


def compile_stage(cfg, stage_name: str, mesh) -> dict:
  """Lowers and compiles one stage's step on `mesh`; memory, FLOPs and timings as a dict."""
  t0 = time.perf_counter()
  # Built outside the mesh context: there, model construction would read the parameters'
  # logical names as mesh axes.
  stage = STAGES[stage_name](cfg, mesh)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  with sharding.use_mesh(mesh):
    jitted = jax.jit(stage.step, in_shardings=(stage.shardings, None, None),
                     out_shardings=(stage.shardings, None), donate_argnums=0)
    lowered = jitted.lower(stage.state, stage.batch, rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    flops = jaxpr_flops(jax.make_jaxpr(stage.step)(stage.state, stage.batch, rng))
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  return {
      "stage": stage_name, "mesh": dict(mesh.shape), "devices": int(mesh.devices.size),
      "global_batch": stage.global_batch, "grad_accum": stage.grad_accum,
      "micro_batch_per_device": stage.global_batch / stage.grad_accum / batch_devices,
      "trained_params": stage.trained_params, "total_params": stage.total_params,
      "bytes_per_device": {"arguments": int(mem.argument_size_in_bytes),
                           "outputs": int(mem.output_size_in_bytes),
                           "aliased": int(mem.alias_size_in_bytes),
                           "temporaries": int(mem.temp_size_in_bytes),
                           "peak": int(peak)},
      "flops_per_step": int(flops), "flops_per_device": int(flops // mesh.devices.size),
      "xla_cost_analysis_flops_per_device": float(cost.get("flops", float("nan"))),
      "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
  }


def row_key(row: dict) -> tuple[str, str, int]:
  return row["stage"], row["mesh_request"], row["devices"]


def judge(row: dict, targets: tuple[Target, ...]) -> dict:
  """row["targets"]: for each target with the row's chip count, whether the step fits it."""
  row["targets"] = {}
  for t in targets:
    if t.chips == row["devices"]:
      row["targets"][t.name] = None if "error" in row else bool(
          row["bytes_per_device"]["peak"] <= HEADROOM * t.hbm_gib * GIB)
  return row


def plan(cfg, stages=("vllm", "ldm", "vae"), meshes=("config",),
         targets: tuple[Target, ...] = TARGETS, log: Callable[[str], None] = print,
         done: tuple[dict, ...] = (), on_row: Callable[[dict], None] = lambda row: None
         ) -> list[dict]:
  """One row per (stage, mesh, device count) with the targets it fits; compile failures (e.g.
  a batch that does not split over the devices) are rows with an "error".

  A compiled row of `done` (an earlier run's, same config) is taken as it is, its fits judged
  again for `targets`; rows with an error are tried again. `on_row` sees every row once it is
  finished, so a caller can save it before the next compile (a full-size row takes minutes)."""
  for s in stages:
    if s not in STAGES:
      raise ValueError(f"unknown stage {s!r} (one of {sorted(STAGES)})")
  available = jax.devices()
  finished = {row_key(r): r for r in done if "error" not in r}
  rows = []
  for stage_name in stages:
    for mesh_text in meshes:
      for chips in sorted({t.chips for t in targets}):
        key = (stage_name, mesh_text, chips)
        if key in finished:
          row = judge(dict(finished[key]), targets)
          log(format_row(row) + " (from plan.json)")
          rows.append(row)
          continue
        row = {"stage": stage_name, "mesh_request": mesh_text, "devices": chips}
        if chips > len(available):
          row["error"] = f"needs {chips} devices, {len(available)} available"
        else:
          try:
            mesh = sharding.make_mesh(parse_mesh(mesh_text, cfg), devices=available[:chips])
            row.update(compile_stage(cfg, stage_name, mesh))
          except Exception as e:  # a plan reports what does not compile and goes on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        judge(row, targets)
        log(format_row(row))
        on_row(row)
        rows.append(row)
  return rows


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
    if abs(x) >= scale:
      return f"{x / scale:.1f} {prefix}{unit}"
  return f"{x:.0f} {unit}"


def format_row(row: dict) -> str:
  head = f"{row['stage']:5s} mesh {row.get('mesh', row['mesh_request'])} on {row['devices']:2d} devices"
  if "error" in row:
    return f"{head}: does not compile: {row['error']}"
  b = row["bytes_per_device"]
  fits = ", ".join(f"{name}: {'fits' if ok else 'NO'}" for name, ok in row["targets"].items())
  return (f"{head}: micro-batch {row['micro_batch_per_device']:g}/device "
          f"(global {row['global_batch']}, accum {row['grad_accum']}); per device "
          f"{b['peak'] / GIB:.2f} GiB (args {b['arguments'] / GIB:.2f}, temps "
          f"{b['temporaries'] / GIB:.2f}); {_si(row['flops_per_step'], 'FLOP')}/step "
          f"({_si(row['flops_per_device'], 'FLOP')}/device; XLA cost analysis "
          f"{_si(row['xla_cost_analysis_flops_per_device'], 'FLOP')}); compile "
          f"{row['compile_s']:.0f} s | {fits}")


def _flat(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
  return out


def saved_rows(path: Path, config: dict) -> list[dict]:
  """The rows an earlier plan into `path` finished; refused if it planned another config
  (rows of two configs in one file could not be told apart)."""
  if not path.exists():
    return []
  saved = json.loads(path.read_text())
  theirs, ours = _flat(saved.get("config_values", {})), _flat(config)
  differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
  if differ:
    raise ConfigError(f"{path} holds a plan of another config (differs in {', '.join(differ[:8])}"
                      f"{' ...' if len(differ) > 8 else ''}): use another --workdir or remove it")
  return saved["rows"]


def main(cfg, workdir: Path) -> int:
  from lego_jax import config as config_lib
  from lego_jax.train import checkpoint as ckpt_lib

  names = _TARGETS.value or [t.name for t in TARGETS]
  unknown = [n for n in names if n not in {t.name for t in TARGETS}]
  if unknown:
    raise ConfigError(f"--plan_targets: unknown {unknown} (known: {[t.name for t in TARGETS]})")
  targets = tuple(t for t in TARGETS if t.name in names)
  meshes = tuple(_MESHES.value)
  for m in meshes:
    parse_mesh(m, cfg)
  out = Path(workdir) / "plan.json"
  config = config_lib.to_dict(cfg)
  rows = saved_rows(out, config)
  print(f"plan: config {cfg.name}, {len(jax.devices())} fake {jax.devices()[0].platform} "
        f"devices; HBM budget {HEADROOM:.0%} of each chip; {out}: "
        f"{sum('error' not in r for r in rows)} rows done before")

  def save(row: dict) -> None:
    # Every finished row is on disk before the next compile starts (atomically: a plan stopped
    # mid-write leaves the previous file); rows of other stages or meshes stay.
    rows[:] = [r for r in rows if row_key(r) != row_key(row)] + [row]
    ckpt_lib.dump_json({"config": cfg.name, "config_values": config, "headroom": HEADROOM,
                        "targets": [dataclasses.asdict(t) for t in TARGETS], "rows": rows}, out)

  plan(cfg, tuple(_STAGES.value), meshes, targets, done=tuple(rows), on_row=save)
  print(f"plan: {out}")
  return 0
