"""`lego-jax plan`: will the paper's training fit, and on what? Answered before renting anything.

The REAL jitted train steps of the trainers (train/vae.py, train/vllm.py, train/ldm.py; remat and
compute dtypes as configured) and generate's sampling program are lowered and compiled ahead of
time for the TARGET's own compiler, from abstract shapes only: the models are built with
`nnx.eval_shape`, the train state is `jax.ShapeDtypeStruct`s carrying the trainer's shardings, and
nothing is allocated. No accelerator is needed:

  - TPU targets (tpu-v5p-8, tpu-v5e-16, tpu-v6e-8, tpu-v4-8, ...; Google's names: a v5p-N or
    v4-N has N/2 chips, a v5e-N or v6e-N N chips) compile with libtpu for a deviceless topology
    (`jax.experimental.topologies`; extra `plan-tpu`);
  - GPU targets (a100-40g-x8, a100-80g-x8, h100-80g-x8, h200-x8) compile with XLA:GPU of the
    jax-cuda12 plugin for a target description (lego_jax/plan_targets/*.txtpb, XLA's own files;
    extra `plan-gpu`, no CUDA runtime);
  - cpu-N compiles for N fake CPU devices: a mesh no target has; its temporaries are only an
    estimate of an accelerator's.

For every stage, mesh shape and target it reports

  - per-device memory from the target compiler (`compiled.memory_analysis()`: arguments +
    outputs - donated aliases + temporaries; the generated code is reported apart, it is not in
    HBM's working set the way buffers are) and whether it fits the chip's HBM with 10% headroom;
  - FLOPs per step: matmul and convolution FLOPs counted on the step's jaxpr by
    lego_jax/bench/flops.py, scanned layers times their trip count and rematerialised forwards
    included (XLA's `cost_analysis()`, also printed where the target answers (not XLA:GPU),
    counts a scanned layer's body once, so it under-reports deep models), and the bytes those
    matmuls and convolutions read and write;
  - a roofline bound on the step time: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip,
    with the peaks of `TARGETS` (sources beside them), so no faster than that on the target;
  - the micro-batch per device: global batch / grad_accum / (data x fsdp devices).

`use_fake_devices` must run before JAX starts a backend (the CLI calls it for this command).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.experimental import topologies

from lego_jax import config as config_lib
from lego_jax.bench import flops as flop_count
from lego_jax.config import ConfigError
from lego_jax.infer import ldm as ldm_infer
from lego_jax.infer import sampler as sampler_lib
from lego_jax.models import lego_ldm
from lego_jax.parallel import sharding
from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train import ldm, vllm
from lego_jax.train import vae as vae_train

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "mesh", "vae", "vae_train", "clip_vision", "llama", "llava",
                   "vllm_train", "unet", "clip_text", "conditioner", "ldm_train")


FAKE_DEVICES = 16
HEADROOM = 0.9  # of HBM usable by the step (runtime, fragmentation; GPUs: set
#                 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9, JAX's default preallocation is 0.75)
GIB = 2**30
SPECS = Path(__file__).with_name("plan_targets")

_STAGES = flags.DEFINE_list("plan_stages", ["vllm", "ldm", "vae"],
                            "plan: stages to compile (vllm, ldm, vae: train steps; sample: "
                            "generate's whole sampling program for --plan_sample_batch frames)")
_SAMPLE_BATCH = flags.DEFINE_integer("plan_sample_batch", 32, "plan: frames per sampling call")
_MESHES = flags.DEFINE_list(
    "plan_meshes", ["config", "1:-1:1"],
    "plan: (data:fsdp:tensor) mesh shapes to try, -1 = the remaining devices; 'config' = "
    "cfg.mesh.shape")
_TARGETS = flags.DEFINE_list(
    "plan_targets", ["tpu-v5p-8", "tpu-v5e-16", "tpu-v6e-8", "h100-80g-x8", "a100-40g-x8"],
    "plan: targets to compile for (tpu-*: libtpu, extra plan-tpu; *-x8 GPUs: the jax-cuda12 "
    "plugin, extra plan-gpu; cpu-N: N fake CPU devices)")


@dataclasses.dataclass(frozen=True)
class Target:
  """A pod slice or GPU node: its chips, their HBM and peaks (per chip), and how to compile for
  it: `platform` "tpu" (libtpu, `topology` as jax.experimental.topologies names it), "cuda"
  (XLA:GPU for the target description `spec` in plan_targets/) or "cpu" (fake devices)."""
  name: str
  chips: int
  hbm_bytes: float
  peak_flops: float      # dense bf16 FLOP/s
  hbm_bandwidth: float   # bytes/s
  platform: str
  topology: str = ""
  spec: str = ""
  source: str = ""


_GCP = "cloud.google.com/tpu/docs/"
# One table of every number the fits and roofline use. TPU: Google's per-chip key specifications
# (HBM in GB as published); GPU: NVIDIA's datasheets for dense bf16 tensor-core FLOP/s (without
# sparsity), HBM size and bandwidth from XLA's target description of the part.
TARGETS = (
    Target("tpu-v5p-8", 4, 95e9, 459e12, 2765e9, "tpu", "v5p:2x2x1", source=_GCP + "v5p"),
    Target("tpu-v5p-16", 8, 95e9, 459e12, 2765e9, "tpu", "v5p:2x2x2", source=_GCP + "v5p"),
    Target("tpu-v5e-4", 4, 16e9, 197e12, 819e9, "tpu", "v5e:2x2", source=_GCP + "v5e"),
    Target("tpu-v5e-16", 16, 16e9, 197e12, 819e9, "tpu", "v5e:4x4", source=_GCP + "v5e"),
    Target("tpu-v5e-32", 32, 16e9, 197e12, 819e9, "tpu", "v5e:4x8", source=_GCP + "v5e"),
    Target("tpu-v6e-8", 8, 32e9, 918e12, 1640e9, "tpu", "v6e:2x4", source=_GCP + "v6e"),
    Target("tpu-v6e-16", 16, 32e9, 918e12, 1640e9, "tpu", "v6e:4x4", source=_GCP + "v6e"),
    Target("tpu-v4-8", 4, 32 * GIB, 275e12, 1200e9, "tpu", "v4:2x2x1", source=_GCP + "v4"),
    Target("a100-40g-x8", 8, 42331013120, 312e12, 1555.2e9, "cuda", "1x1x8", "a100_sxm_40.txtpb",
           "NVIDIA A100 Tensor Core GPU datasheet (SXM4); XLA a100_sxm_40.txtpb"),
    Target("a100-80g-x8", 8, 85100068864, 312e12, 2039.04e9, "cuda", "1x1x8", "a100_sxm_80.txtpb",
           "NVIDIA A100 Tensor Core GPU datasheet (SXM4); XLA a100_sxm_80.txtpb"),
    Target("h100-80g-x8", 8, 84942979072, 989e12, 3352.32e9, "cuda", "1x1x8", "h100_sxm.txtpb",
           "NVIDIA H100 Tensor Core GPU datasheet (SXM5); XLA h100_sxm.txtpb"),
    Target("h200-x8", 8, 151397597184, 989e12, 4800e9, "cuda", "1x1x8", "h200.txtpb",
           "NVIDIA H200 Tensor Core GPU datasheet (SXM); XLA h200.txtpb"),
)
_BY_NAME = {t.name: t for t in TARGETS}


def target_of(name: str) -> Target:
  """A target of TARGETS, or cpu-N: N fake CPU devices (no HBM or peaks to judge by)."""
  if name in _BY_NAME:
    return _BY_NAME[name]
  n = name.removeprefix("cpu-")
  if name.startswith("cpu-") and n.isdigit() and 1 <= int(n) <= FAKE_DEVICES:
    return Target(name, int(n), math.nan, math.nan, math.nan, "cpu")
  raise ConfigError(f"--plan_targets: unknown target {name!r} (known: {sorted(_BY_NAME)} and "
                    f"cpu-N, N <= {FAKE_DEVICES})")


_EXTRA = {"tpu": ("libtpu", "plan-tpu"), "cuda": ("jax_plugins.xla_cuda12", "plan-gpu")}


def compiler_missing(target: Target) -> str | None:
  """Why `target`'s compiler cannot run here (a pip extra to install), or None."""
  if target.platform not in _EXTRA:
    return None
  module, extra = _EXTRA[target.platform]
  if importlib.util.find_spec(module.split(".")[0]) is None or (
      importlib.util.find_spec(module) is None):
    return (f"{target.name}: its compiler is not installed ({module} not found; "
            f"pip install -e \".[{extra}]\")")
  return None


@functools.cache
def target_devices(target: Target) -> list:
  """The devices to compile for: deviceless TPU / GPU topologies, or the fake CPU devices."""
  if target.platform == "cpu":
    return jax.devices("cpu")[:target.chips]
  missing = compiler_missing(target)
  if missing:
    raise ConfigError(missing)
  if target.platform == "tpu":
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; a deviceless
    # compile drives none, and two plans (or a plan and a test) may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
  else:
    desc = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                        target_config=(SPECS / target.spec).read_text())
  devices = list(desc.devices)
  if len(devices) != target.chips:
    raise ConfigError(f"{target.name}: topology {target.topology} has {len(devices)} devices, "
                      f"expected {target.chips}")
  return devices


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
  train: bool = True     # a train step returns the state (donated); sampling returns frames


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


def vae_stage(cfg, mesh) -> Stage:
  t = cfg.vae_train
  graphdef, state, shardings, tx = vae_train.init_state(cfg, mesh, abstract=True)
  s = cfg.data.image_size
  return Stage("vae", vae_train.make_train_step(graphdef, tx, t.kl_weight, t.l2_weight),
               state, shardings, _batch(mesh, {"images": ((t.batch_size, s, s, 3), jnp.float32)}),
               t.batch_size, 1, _count(state["trained"]), _count(state["trained"]))


def vllm_stage(cfg, mesh) -> Stage:
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


def _ldm_example(cfg) -> dict:
  """One row of the LDM trainer's batch arrays (features zero-filled), for shapes."""
  class _Ids:  # the host-side text tokenizer, for shapes only: CLIP's context of 77
    def __call__(self, batch):
      return np.zeros((len(batch["input"]), 77), np.int32)

  s = cfg.data.image_size
  one = {"input": np.zeros((1, s, s, 3), np.uint8), "target": np.zeros((1, s, s, 3), np.uint8)}
  return lego_ldm.batch_arrays(cfg, one, _Ids())


def ldm_stage(cfg, mesh) -> Stage:
  t = cfg.ldm_train
  graphdefs, state, shardings, tx = ldm.init_state(cfg, None, mesh, abstract=True)
  example = _ldm_example(cfg)  # the trainer's own batch layout, one row
  text_len = example["text_ids"].shape[1]
  b = t.batch_size
  batch = _batch(mesh, {k: ((b,) + v.shape[1:], v.dtype) for k, v in example.items()})
  step = ldm.make_train_step(cfg, graphdefs, tx, lego_ldm.schedule_of(cfg),
                             jnp.zeros((1, text_len), jnp.int32))
  return Stage("ldm", step, state, shardings, batch, b, max(int(t.grad_accum), 1),
               _count(state["trained"]), _count([state["trained"], state["frozen"]]))


def sample_stage(cfg, mesh) -> Stage:
  """`lego-jax generate`'s one program for a batch of --gen_batch_size frames: VAE encode, CLIP
  text, conditioner, the configured sampler (LEGO: 100 Euler-ancestral steps, dual guidance in a
  3-way UNet batch) and VAE decode; EMA weights as frozen inputs, frames split over the batch."""
  graphdefs, params = lego_ldm.abstract(cfg)
  graphdefs = [graphdefs[n] for n in lego_ldm.NAMES]
  params = [params[n] for n in lego_ldm.NAMES]
  params = _place(params, sharding.state_shardings(mesh, params))
  s, t = cfg.sampler, cfg.ldm_train
  b = _SAMPLE_BATCH.value
  example = {k: v for k, v in _ldm_example(cfg).items() if k != "target"}
  text_len = example["text_ids"].shape[1]
  batch = _batch(mesh, {k: ((b,) + v.shape[1:], v.dtype) for k, v in example.items()})
  guided = not sampler_lib.unguided(s.text_guidance, s.image_guidance)

  def run(params, batch, key):
    unet, conditioner, clip_text, vae = (nnx.merge(g, p) for g, p in zip(graphdefs, params))
    empty = jnp.zeros((1, text_len), jnp.int32)
    frames = ldm_infer.generate_latents(
        unet, conditioner, clip_text, vae, batch["input"], batch["text_ids"], empty,
        batch["h_img"], batch["h_txt"], key, s.text_guidance, s.image_guidance,
        num_steps=s.num_steps, kind=s.kind, use_image=t.use_image_embedding,
        use_text=t.use_text_embedding, scaling=float(cfg.vae.scaling_factor), guided=guided)
    return frames, {}

  shardings = jax.tree.map(lambda x: x.sharding, params)
  return Stage("sample", run, params, shardings, batch, b, 1, 0, _count(params), train=False)


STAGES: dict[str, Callable[[Any, Any], Stage]] = {"vae": vae_stage, "vllm": vllm_stage,
                                                   "ldm": ldm_stage, "sample": sample_stage}


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


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
# An instruction of one of them in optimised HLO text: `%name = SHAPE op(` or its async
# `op-start(` (the `-done` half is not counted again). SHAPE ends in `]`, `}` (a layout, TPU
# tiles) or `)`: a tuple, what the combiners make of many small collectives (libtpu's VAE step
# has ONE all-reduce of every gradient) and what every async start returns; tuples hold spaces
# and comments (`/*index=5*/`), so the shape is not matched, only its last character. Operands
# (`%all-reduce.95`) and fused computations' names never follow such a character and a space.
_COLLECTIVE = re.compile(r"(?<=[\]})]) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collectives(hlo_text: str) -> dict[str, int]:
  """The collective instructions of a compiled program's HLO text, by kind: the communication
  the compiler planned (a loop body's once, however often it runs)."""
  found = _COLLECTIVE.findall(hlo_text)
  return {op: found.count(op) for op in sorted(set(found))}


# libtpu refuses to compile a program that cannot fit the chip's HBM, with RESOURCE_EXHAUSTED and
# one of two messages: the deviceless compile (libtpu 0.0.42.1) "Ran out of memory on HBM, the
# total memory required for HLO temporaries (37.79G) exceeds available HBM (31.25G)." (it weighs
# the temporaries alone against the chip, so a compiled step may still not fit), a TPU VM's
# compile "Ran out of memory in memory space hbm. Used 21.95G of 15.48G hbm. ...". G is 2^30
# bytes. XLA:GPU refuses nothing at compile time (it compiled 223 GiB of temporaries for one
# 80 GB H100; docs/plan-targets.md, 2026-12-04): its rows are judged by their memory alone.
_SIZE = r"([\d.]+[KMGT]?)"
_HBM_REFUSALS = (
    re.compile(r"Ran out of memory on HBM, the total memory required for (?P<what>[^(]+?) \("
               + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)"),
    re.compile(r"Ran out of memory in memory space hbm\. Used " + _SIZE + " of " + _SIZE
               + " hbm"),
)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(text: str) -> int:
  return round(float(text.rstrip("KMGT")) * _UNITS.get(text[-1], 1))


def hbm_refusal(message: str) -> dict | None:
  """What a target compiler's refusal says the step needs and the chip has, if `message` is
  libtpu's out-of-HBM error; None for every other error."""
  for pattern in _HBM_REFUSALS:
    m = pattern.search(message)
    if m:
      required, available = m.groups()[-2:]
      return {"required_bytes": _bytes(required), "available_bytes": _bytes(available),
              "required_for": m.groupdict().get("what") or "the program",
              "message": message.strip().splitlines()[0][:300]}
  return None


def _stage_fields(stage: Stage, mesh) -> dict:
  """What a row says of the step before its compiler has said anything: mesh, batch split."""
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  return {"stage": stage.name, "mesh": dict(mesh.shape), "devices": int(mesh.devices.size),
          "compiler": mesh.devices.flat[0].platform,
          "device_kind": mesh.devices.flat[0].device_kind,
          "global_batch": stage.global_batch, "grad_accum": stage.grad_accum,
          "micro_batch_per_device": stage.global_batch / stage.grad_accum / batch_devices,
          "trained_params": stage.trained_params, "total_params": stage.total_params}


def compile_stage(cfg, stage_name: str, mesh) -> dict:
  """Lowers and compiles one stage's program for the devices of `mesh` (a target's, or fake CPU
  devices); memory, FLOPs, bytes and timings as a dict."""
  t0 = time.perf_counter()
  # Built outside the mesh context: there, model construction would read the parameters'
  # logical names as mesh axes.
  stage = STAGES[stage_name](cfg, mesh)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  with sharding.use_mesh(mesh):
    if stage.train:
      jitted = jax.jit(stage.step, in_shardings=(stage.shardings, None, None),
                       out_shardings=(stage.shardings, None), donate_argnums=0)
    else:
      jitted = jax.jit(stage.step, in_shardings=(stage.shardings, None, None))
    lowered = jitted.lower(stage.state, stage.batch, rng)
    t1 = time.perf_counter()
    options = {}
    try:
      try:
        compiled = lowered.compile()
      except Exception as e:
        # XLA:GPU without a device cannot autotune its Triton GEMMs: it takes one tiling per dot
        # from a default table, and for some small f32 dots (the conditioner's [154, 64] of
        # configs/tiny.py on 4 A100s) none is valid. A GPU's autotuner would try others and
        # cuBLAS; here cuBLAS alone, recorded in the row.
        if "Couldn't find output tile sizes" not in str(e):
          raise
        options = {"xla_gpu_enable_triton_gemm": False}
        compiled = lowered.compile(options)
    except Exception as e:
      refused = hbm_refusal(str(e))
      if refused is None:
        raise
      # Not a compile error: the step is valid, the chip too small at this mesh and micro-batch.
      return dict(_stage_fields(stage, mesh), refused=refused,
                  lower_s=round(t1 - t0, 1), compile_s=round(time.perf_counter() - t1, 1))
    t2 = time.perf_counter()
    counted = flop_count.count_flops(stage.step, stage.state, stage.batch, rng)
    flops, nbytes = counted.total, counted.bytes
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  # The step's buffers: what HBM must hold. The executable's code is loaded once per program and
  # is tiny next to them on a GPU; a deviceless TPU compile reports tens of MB for it.
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  devices = int(mesh.devices.size)
  return {
      **_stage_fields(stage, mesh), "compiler_options": options,
      "bytes_per_device": {"arguments": int(mem.argument_size_in_bytes),
                           "outputs": int(mem.output_size_in_bytes),
                           "aliased": int(mem.alias_size_in_bytes),
                           "temporaries": int(mem.temp_size_in_bytes),
                           "peak": int(peak),
                           "generated_code": int(mem.generated_code_size_in_bytes)},
      "collectives": collectives(compiled.as_text() or ""),
      "flops_per_step": int(flops), "flops_per_device": int(flops // devices),
      "matmul_bytes_per_device": int(nbytes // devices),
      # None where the target's compiler does not answer (XLA:GPU)
      "xla_cost_analysis_flops_per_device": cost.get("flops"),
      "xla_cost_analysis_bytes_per_device": cost.get("bytes accessed"),
      "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
  }


def row_key(row: dict) -> tuple[str, str, str]:
  return row["stage"], row["mesh_request"], row["target"]


def judge(row: dict) -> dict:
  """Fits and roofline of a compiled row on its target (from the target table, so rows kept
  from an earlier plan are judged by today's numbers)."""
  t = target_of(row["target"])
  row["fits"] = None
  row["roofline_s"] = None
  if "error" in row or t.platform == "cpu":
    return row
  row["hbm_bytes"] = t.hbm_bytes
  if "refused" in row:  # the target's compiler said it does not fit: no program to judge
    row["fits"] = False
    return row
  row["fits"] = bool(row["bytes_per_device"]["peak"] <= HEADROOM * t.hbm_bytes)
  compute = row["flops_per_device"] / t.peak_flops
  memory = max(row["matmul_bytes_per_device"],
               row["bytes_per_device"]["arguments"] + row["bytes_per_device"]["outputs"]
               ) / t.hbm_bandwidth
  row["roofline_s"] = max(compute, memory)
  row["roofline_bound"] = "compute" if compute >= memory else "memory"
  return row


def plan(cfg, stages=("vllm", "ldm", "vae"), meshes=("config",),
         targets: tuple[Target, ...] = (), log: Callable[[str], None] = print,
         done: tuple[dict, ...] = (), on_row: Callable[[dict], None] = lambda row: None
         ) -> list[dict]:
  """One row per (stage, mesh, target); compile failures (e.g. a batch that does not split over
  the devices, an op the target's compiler rejects) are rows with an "error"; a step the target's
  compiler refuses for want of HBM is a row that does not fit ("refused": what it needs and has).

  A compiled row of `done` (an earlier run's, same config) is taken as it is, judged again;
  rows with an error are tried again. `on_row` sees every row once it is finished, so a caller
  can save it before the next compile (a full-size row takes minutes to hours)."""
  for s in stages:
    if s not in STAGES:
      raise ValueError(f"unknown stage {s!r} (one of {sorted(STAGES)})")
  finished = {row_key(r): r for r in done if "error" not in r}
  rows = []
  for target in targets:
    for stage_name in stages:
      for mesh_text in meshes:
        key = (stage_name, mesh_text, target.name)
        if key in finished:
          row = judge(dict(finished[key]))
          log(format_row(row) + " (from plan.json)")
          rows.append(row)
          continue
        row = {"stage": stage_name, "mesh_request": mesh_text, "target": target.name,
               "devices": target.chips}
        try:
          devices = target_devices(target)
          mesh = sharding.make_mesh(parse_mesh(mesh_text, cfg), devices=devices)
          row.update(compile_stage(cfg, stage_name, mesh))
        except Exception as e:  # a plan reports what does not compile and goes on
          row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        judge(row)
        log(format_row(row))
        on_row(row)
        rows.append(row)
  return rows


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
    if abs(x) >= scale:
      return f"{x / scale:.1f} {prefix}{unit}"
  return f"{x:.0f} {unit}"


def _time(seconds: float) -> str:
  for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds / 1e-9:.3g} ns"


def format_row(row: dict) -> str:
  head = (f"{row['stage']:6s} {row['target']:11s} mesh "
          f"{row.get('mesh', row['mesh_request'])}")
  if "error" in row:
    return f"{head}: does not compile: {row['error']}"
  batch = (f"micro-batch {row['micro_batch_per_device']:g}/device (global {row['global_batch']}, "
           f"accum {row['grad_accum']})")
  if "refused" in row:
    r = row["refused"]
    return (f"{head} ({row['compiler']} compiler): {batch}; DOES NOT FIT: the compiler refused "
            f"it, {r['required_for']} {r['required_bytes'] / GIB:.2f} GiB > the "
            f"{r['available_bytes'] / GIB:.2f} GiB of HBM it has; compile {row['compile_s']:.0f} s")
  b = row["bytes_per_device"]
  xla = row.get("xla_cost_analysis_flops_per_device")
  fits = "" if row["fits"] is None else (
      f" | {'fits' if row['fits'] else 'DOES NOT FIT'} {row['hbm_bytes'] / GIB:.0f} GiB"
      f"; roofline >= {_time(row['roofline_s'])}/step ({row['roofline_bound']})")
  return (f"{head} ({row['compiler']} compiler): {batch}; per device {b['peak'] / GIB:.2f} GiB "
          f"(args "
          f"{b['arguments'] / GIB:.2f}, temps {b['temporaries'] / GIB:.2f}; code "
          f"{b['generated_code'] / 2**20:.0f} MiB apart); {_si(row['flops_per_device'], 'FLOP')}"
          f"/device (XLA cost analysis {'-' if xla is None else _si(xla, 'FLOP')}); "
          f"compile {row['compile_s']:.0f} s{fits}")


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
  return [r for r in saved["rows"] if "target" in r]  # rows of plans before targets: again


def main(cfg, workdir: Path) -> int:
  targets = tuple(target_of(n) for n in _TARGETS.value)
  for t in targets:  # before any compile: a missing extra is a one-line error, not an hour later
    missing = compiler_missing(t)
    if missing:
      print(f"lego-jax plan: error: {missing}", file=sys.stderr)
      return 1  # the environment's, not the command line's
  meshes = tuple(_MESHES.value)
  for m in meshes:
    parse_mesh(m, cfg)
  out = Path(workdir) / "plan.json"
  config = config_lib.to_dict(cfg)
  config["plan_sample_batch"] = _SAMPLE_BATCH.value
  rows = saved_rows(out, config)
  print(f"plan: config {cfg.name}, targets {', '.join(t.name for t in targets)}; HBM budget "
        f"{HEADROOM:.0%} of each chip; {out}: {sum('error' not in r for r in rows)} rows done "
        "before")

  def save(row: dict) -> None:
    # Every finished row is on disk before the next compile starts (atomically: a plan stopped
    # mid-write leaves the previous file); rows of other stages or meshes stay.
    rows[:] = [r for r in rows if row_key(r) != row_key(row)] + [row]
    ckpt_lib.dump_json({"config": cfg.name, "config_values": config, "headroom": HEADROOM,
                        "targets": [dataclasses.asdict(t) for t in TARGETS], "rows": rows}, out)

  plan(cfg, tuple(_STAGES.value), meshes, targets, done=tuple(rows), on_row=save)
  print(f"plan: {out}")
  return 0
