"""`lego-jax bench <what>`: speed of lego_jax's real steps, optionally against the PyTorch baseline.

    lego-jax bench unet-train  [--config=...] [--batch=N] [--baseline=torch] [flags]
    lego-jax bench ldm-train | vllm-train | vllm-decode | sample | data

The word after `bench` picks the bench (`--what=unet-train` says the same). Each bench builds its
program at the config's sizes (default: the embedded tiny config; the paper's sizes with
`--config=configs/lego_ego4d.py`), compiles it ahead of time, runs `--warmup_steps` untimed steps,
then times `--steps` x `--repeats` steps, each one synchronised with the device
(`jax.block_until_ready`), and prints a JSON object (also written to `--out`, default
WORKDIR/bench/<what>.json). The figure is the MEDIAN step.

  unet-train   the UNet alone: one AdamW step on the eps-MSE of noisy 4-channel latents ++ the input
               frame's 4-channel latent (8 in), cross-attention context of LEGO's length
               (text_len + patches + text_len: 410 x 768 at full size), fresh t and noise each step.
  ldm-train    lego_jax/train/ldm.py's `make_train_step` as train-ldm runs it: VAE encode of input
               and target frames, CLIP text of the description and of "", the conditioner,
               classifier-free-guidance dropout, UNet, AdamW, EMA (random weights, same shapes).
  vllm-train   lego_jax/train/vllm.py's `make_train_step`: LLaVA (frozen CLIP tower, projector,
               LLaMA) next-token loss on `--seq_len` tokens holding the image placeholders, AdamW.
  vllm-decode  lego_jax/infer/decode.py's KV-cache generation (prefill + fixed-shape decode loop,
               H_t rows returned) of `--new_tokens` tokens after a `--prompt_len`-token prompt,
               sampling as vllm_generate says; end-of-sequence is disabled so every row makes
               exactly `--new_tokens` tokens.
  sample       lego_jax/infer/generate.py's `generate_latents`: VAE encode, CLIP text, conditioner,
               `--sample_steps` Euler-ancestral steps with the 3-way dual-guidance batch, VAE decode.
  data         the training input pipeline (Grain, JPEG decode, resize, flip, batch) on synthetic
               records at the config's image sizes, `cfg.data.num_workers` worker processes.

Default batch (`--batch=0`): unet/ldm-train the config's per-step LDM batch (batch_size /
grad_accum), vllm-train vllm_train.batch_size / grad_accum, vllm-decode and sample
vllm_generate.batch_size, data ldm_train.batch_size.

Reported: ms_per_step (median), samples_per_s (tokens_per_s for the LLM benches), flops_per_step
and TFLOP/s, MFU against the device's dense bf16 peak (PEAK_TFLOPS; none on CPU), compile_s (AOT
lower + compile), peak device memory (`memory_stats()`, GPU/TPU) and XLA's compiled memory
analysis. FLOPs are COUNTED from the program's jaxpr (lego_jax/bench/flops.py: matmul and
convolution multiply-adds x 2, loops x their trip count, PyTorch FlopCounterMode's convention);
XLA's own cost-analysis figure, which counts every loop body once, is reported beside it. With
remat on, the count is of the same step without remat (model FLOPs, the MFU convention).

`--baseline=torch` builds the PyTorch reference at the same shapes in the same process
(lego_jax/bench/torch_baseline.py: diffusers UNet2DConditionModel / AutoencoderKL, transformers
CLIPTextModel / LlavaForConditionalGeneration / LlamaForCausalLM), eager and (`--torch_compile`)
torch.compile, and prints the speed-up of lego_jax over each. On CPU the implementations
alternate round by round (`--repeats`), so load from other processes hits all of them alike; on
accelerators they run one after the other, torch first, its memory released before JAX starts.

Threads: torch gets `--threads` (default: the CPUs this process may use, which is what XLA's CPU
backend uses). To pin both to one thread, start with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
and pass --threads=1 (XLA reads XLA_FLAGS only up to its first entry without "--").
`--compilation_cache=DIR` turns on JAX's persistent compilation cache (a second run's compile_s
then shows the cache hit).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from lego_jax.bench import flops as flops_lib
from lego_jax.parallel import sharding

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "mesh", "vae", "unet", "clip_text", "clip_vision", "conditioner",
                   "llama", "llava", "ldm_train", "vllm_train", "vllm_generate", "sampler")
CLI_FLAGS = ("out",)


WHATS = ("unet-train", "ldm-train", "vllm-train", "vllm-decode", "sample", "data")

_WHAT = flags.DEFINE_enum("what", None, WHATS, "bench: the word after `bench`, or this flag")
_BATCH = flags.DEFINE_integer("batch", 0, "global batch (frames, sequences); 0 = the bench's "
                              "default (see `lego_jax.bench.bench`)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per implementation and repeat")
_WARMUP = flags.DEFINE_integer("warmup_steps", 2, "untimed steps after compilation")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timing rounds (implementations alternate by round)")
_BASELINE = flags.DEFINE_enum("baseline", "none", ["none", "torch"],
                              "also time the PyTorch reference at the same shapes")
_TORCH_COMPILE = flags.DEFINE_boolean("torch_compile", True,
                                      "with --baseline=torch: time torch.compile too")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "compute dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "auto", ["auto", "float32", "bfloat16"],
    "weights of the inference benches (vllm-decode, sample); auto = the compute dtype. Training "
    "benches always keep float32 master weights")
_REMAT = flags.DEFINE_boolean("remat", None, "recompute activations in the backward pass "
                              "(default: vllm_train.remat for vllm-train, off for the UNet)")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "vllm-train tokens per sequence; 0 = "
                                "vllm_train.max_length")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "vllm-decode prompt tokens; 0 = image "
                                   "patches + 44 (LEGO's prompt: 300 at full size)")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 0, "vllm-decode tokens generated per row; 0 = "
                                   "min(128, vllm_generate.max_new_tokens)")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 0, "sample: sampler steps; 0 = "
                                     "sampler.num_steps")
_DEVICES = flags.DEFINE_integer("devices", 0, "use the first N devices (0 = all) for the mesh "
                                "cfg.mesh.shape")
_THREADS = flags.DEFINE_integer("threads", 0, "torch CPU threads; 0 = the CPUs this process may "
                                "use (XLA's default)")
_INTERLEAVE = flags.DEFINE_boolean("interleave", None, "alternate implementations by round "
                                   "(default: on CPU only)")
_UNET_ATTENTION = flags.DEFINE_enum(
    "unet_attention", "default", ["default", "xla", "cudnn"],
    "UNet attention kernel (UNetConfig.attention_impl): default = lego_jax's head-major XLA "
    "products, xla = jax.nn.dot_product_attention's XLA path, cudnn = its fused cuDNN kernel")
_CACHE = flags.DEFINE_string("compilation_cache", "", "directory of JAX's persistent "
                             "compilation cache (off when empty)")

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
    for _, make in factories:
      impls.append(make())
      _warm(impls[-1], warmup)
    for r in range(repeats):
      for impl in (impls if r % 2 == 0 else impls[::-1]):
        record(impl, steps)
    for impl in impls:
      impl.close()
  else:
    for _, make in factories:
      impl = make()
      _warm(impl, warmup)
      record(impl, steps * repeats)
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


def compute_dtype(devices) -> Any:
  name = _DTYPE.value
  if name == "auto":
    name = "float32" if devices[0].platform == "cpu" else "bfloat16"
  return jnp.dtype(name)


def inference_param_dtype(dtype) -> Any:
  return dtype if _PARAM_DTYPE.value == "auto" else jnp.dtype(_PARAM_DTYPE.value)


def make_bench_mesh(cfg):
  devices = jax.devices()
  if _DEVICES.value:
    devices = devices[:_DEVICES.value]
  return sharding.make_mesh(tuple(cfg.mesh.shape), devices), devices


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
  remat); while_trips: the trip count of its while loops (decode).
  """
  fn: Callable
  args: tuple
  mesh: Any
  carry: bool = False
  in_shardings: Any = None
  out_shardings: Any = None
  flops_fn: Callable | None = None
  while_trips: int = 1


def jax_impl(program: Program, devices) -> tuple[Impl, dict]:
  """AOT-compiles `program`; returns the Impl and its static facts (FLOPs, memory)."""
  kwargs = {}
  if program.in_shardings is not None:
    kwargs.update(in_shardings=program.in_shardings, out_shardings=program.out_shardings)
  jitted = jax.jit(program.fn, donate_argnums=(0,) if program.carry else (), **kwargs)
  with sharding.use_mesh(program.mesh):
    start = time.perf_counter()
    traced = jitted.trace(*program.args)
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
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


def latent_size(cfg) -> int:
  return cfg.data.image_size // 2 ** (len(cfg.vae.block_out_channels) - 1)


def num_patches(cfg) -> int:
  return (cfg.clip_vision.image_size // cfg.clip_vision.patch_size) ** 2


def context_length(cfg) -> int:
  """LEGO's cross-attention context: CLIP text, projected H_i, mixed H_t (410 at full size)."""
  t = cfg.ldm_train
  n = cfg.conditioner.text_len
  return (n + (num_patches(cfg) if t.use_image_embedding else 0)
          + (cfg.conditioner.text_len if t.use_text_embedding else 0))


def unet_attention() -> dict:
  return {} if _UNET_ATTENTION.value == "default" else {"attention_impl": _UNET_ATTENTION.value}


def _with(cfg_section, **changes) -> dict:
  return {**dict(cfg_section), **changes}


# --- unet-train -------------------------------------------------------------------------------


def unet_train_program(cfg, batch: int, dtype, remat: bool, mesh) -> tuple[Program, dict]:
  from lego_jax.models.unet import UNet, UNetConfig
  from lego_jax.train import common, ldm

  def build(remat_):
    return UNetConfig(**_with(cfg.unet, dtype=dtype, remat=remat_, **unet_attention()))

  model = random_model(lambda: UNet(build(remat), rngs=nnx.Rngs(0)), mesh, cfg.seed)
  graphdef, params = nnx.split(model)
  t = cfg.ldm_train
  tx = common.adamw(params, t.lr, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps)
  schedule = ldm.schedule_of(cfg)
  params = jax.device_put(params, sharding.state_shardings(mesh, params))
  state = {"params": params, "opt_state": jax.jit(tx.init)(params)}
  shardings = jax.tree.map(lambda x: x.sharding, state)
  size, ctx = latent_size(cfg), context_length(cfg)
  out_channels = cfg.unet.out_channels
  data = random_batch({
      "target": ((batch, size, size, out_channels), "normal", 1.0),
      "input": ((batch, size, size, cfg.unet.in_channels - out_channels), "normal", 1.0),
      "context": ((batch, ctx, cfg.unet.context_dim), "normal", 1.0)})
  from lego_jax.data import pipeline
  data = pipeline.to_global(data, mesh)

  def make_step(gd):
    def loss_fn(p, data, rng):
      unet = nnx.merge(gd, p)
      k_t, k_noise = jax.random.split(rng)
      b = data["target"].shape[0]
      timesteps = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps)
      noise = jax.random.normal(k_noise, data["target"].shape, jnp.float32)
      noisy = schedule.q_sample(data["target"], timesteps, noise)
      eps = unet(jnp.concatenate([noisy, data["input"]], axis=-1), timesteps, data["context"])
      return jnp.mean(jnp.square(eps - noise))

    def step(state, data, rng):
      loss, grads = jax.value_and_grad(loss_fn)(state["params"], data, rng)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    return step

  key = jax.random.key(0)
  program = Program(make_step(graphdef), (state, data, key), mesh, carry=True,
                    in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                    flops_fn=make_step(nnx.split(nnx.eval_shape(
                        lambda: UNet(build(False), rngs=nnx.Rngs(0))))[0]) if remat else None)
  shapes = {"latent": [batch, size, size, cfg.unet.in_channels],
            "context": [batch, ctx, cfg.unet.context_dim],
            "params": param_count(params)}
  return program, shapes


def param_count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


# --- ldm-train --------------------------------------------------------------------------------


def ldm_models(cfg, dtype, remat: bool, mesh=None, param_dtype=jnp.float32):
  """(unet, conditioner, clip_text, vae) at the config's sizes computing in `dtype`: random on
  `mesh`, or abstract (shapes only) without one."""
  from lego_jax.models.clip_text import CLIPText, CLIPTextConfig
  from lego_jax.models.conditioner import Conditioner, ConditionerConfig
  from lego_jax.models.unet import UNet, UNetConfig
  from lego_jax.models.vae import VAE, VAEConfig

  kw = dict(dtype=dtype, param_dtype=param_dtype)

  def build():
    rngs = nnx.Rngs(0)
    return (UNet(UNetConfig(**_with(cfg.unet, remat=remat, **kw, **unet_attention())), rngs=rngs),
            Conditioner(ConditionerConfig(**_with(cfg.conditioner, **kw)), rngs=rngs),
            CLIPText(CLIPTextConfig(**_with(cfg.clip_text, **kw)), rngs=rngs),
            VAE(VAEConfig(**_with(cfg.vae, **kw)), rngs=rngs))

  return nnx.eval_shape(build) if mesh is None else random_model(build, mesh, cfg.seed)


def ldm_train_program(cfg, batch: int, dtype, remat: bool, mesh) -> tuple[Program, dict]:
  """train-ldm's step (lego_jax.train.ldm.make_train_step) on a state laid out as its
  `init_state` lays it out, with a random VAE instead of a trained one."""
  from lego_jax.data import pipeline
  from lego_jax.train import common, ldm

  t = cfg.ldm_train
  names = ("unet", "conditioner", "clip_text", "vae")
  trains = {"unet": True, "conditioner": t.train_projections, "clip_text": False, "vae": False}

  def split(models):
    graphdefs, trained, frozen = {}, {}, {}
    for name, module in zip(names, models):
      graphdefs[name], params = nnx.split(module)
      (trained if trains[name] else frozen)[name] = params
    return graphdefs, trained, frozen

  graphdefs, trained, frozen = split(ldm_models(cfg, dtype, remat, mesh))
  tx = common.adamw(trained, t.lr, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps)
  trained = jax.device_put(trained, sharding.state_shardings(mesh, trained))
  frozen = jax.device_put(frozen, sharding.state_shardings(mesh, frozen))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"trained": trained, "frozen": frozen, "opt_state": jax.jit(tx.init)(trained),
           "ema": jax.jit(lambda p: jax.tree.map(jnp.copy, p))(trained),
           "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           "nonfinite": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
  shardings = jax.tree.map(lambda x: x.sharding, state)
  size, text_len = cfg.data.image_size, cfg.conditioner.text_len
  vocab, llm = cfg.clip_text.vocab_size, cfg.conditioner.llm_dim
  data = pipeline.to_global(random_batch({
      "input": ((batch, size, size, 3), "uniform", 1.0),
      "target": ((batch, size, size, 3), "uniform", 1.0),
      "text_ids": ((batch, text_len), "int", vocab),
      "h_img": ((batch, num_patches(cfg), llm), "normal", 1.0),
      "h_txt": ((batch, text_len, llm), "normal", 1.0)}), mesh)
  empty_ids = jnp.asarray(random_batch({"e": ((1, text_len), "int", vocab)}, seed=1)["e"])
  schedule = ldm.schedule_of(cfg)
  step = ldm.make_train_step(cfg, graphdefs, tx, schedule, empty_ids)
  counting = (ldm.make_train_step(cfg, split(ldm_models(cfg, dtype, False))[0], tx, schedule,
                                  empty_ids) if remat else None)
  program = Program(step, (state, data, jax.random.key(0)), mesh, carry=True,
                    in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                    flops_fn=counting)
  shapes = {"images": [batch, size, size, 3], "latent": [batch, latent_size(cfg),
                                                         latent_size(cfg), cfg.unet.in_channels],
            "context": [batch, context_length(cfg), cfg.unet.context_dim],
            "grad_accum": int(t.grad_accum), "trained_params": param_count(trained),
            "frozen_params": param_count(frozen)}
  return program, shapes


# --- vllm-train -------------------------------------------------------------------------------


def vllm_batch(cfg, batch: int, seq_len: int, mesh, image_token_id: int) -> dict:
  """Right-padded-free sequences: BOS, a short prefix, the image placeholders, text; the last
  third of each sequence counts as the answer (loss weights 1)."""
  from lego_jax.data import pipeline

  patches = num_patches(cfg)
  if seq_len < patches + 8:
    raise ValueError(f"--seq_len={seq_len} cannot hold the {patches} image placeholders")
  size = cfg.clip_vision.image_size
  data = random_batch({"ids": ((batch, seq_len), "int", cfg.llama.vocab_size),
                       "targets": ((batch, seq_len), "int", cfg.llama.vocab_size),
                       "pixels": ((batch, size, size, 3), "normal", 1.0)})
  data["ids"][:, 4:4 + patches] = image_token_id
  weights = np.zeros((batch, seq_len), np.float32)
  weights[:, max(patches + 4, (2 * seq_len) // 3):] = 1.0
  data["weights"] = weights
  return pipeline.to_global(data, mesh)


def vllm_train_program(cfg, batch: int, seq_len: int, dtype, remat: bool, mesh
                       ) -> tuple[Program, dict]:
  from lego_jax.data import tokenizer as tokenizer_lib
  from lego_jax.models.llava import Llava
  from lego_jax.train import vllm

  t = cfg.vllm_train
  dtype_name = jnp.dtype(dtype).name
  config = vllm.llava_config(cfg, dtype=dtype_name, remat=remat)
  model = random_model(lambda: Llava(config, rngs=nnx.Rngs(0)), mesh, cfg.seed)
  accum = max(int(t.grad_accum), 1)
  graphdef, state, shardings, tx, schedule = vllm.init_state(cfg, mesh, 1000, model=model,
                                                             dtype=dtype_name, remat=remat)
  data = vllm_batch(cfg, batch, seq_len, mesh, tokenizer_lib.IMAGE_TOKEN_ID)
  step = vllm.make_train_step(graphdef, tx, schedule, accum=accum)
  counting = None
  if remat:
    counting_model = nnx.eval_shape(lambda: Llava(
        vllm.llava_config(cfg, dtype=dtype_name, remat=False), rngs=nnx.Rngs(0)))
    counting = vllm.make_train_step(vllm.split_trainable(counting_model, t.frozen)[0], tx,
                                    schedule, accum=accum)
  program = Program(step, (state, data, jax.random.key(0)), mesh, carry=True,
                    in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                    flops_fn=counting)
  shapes = {"ids": [batch, seq_len], "pixels": list(data["pixels"].shape), "grad_accum": accum,
            "trained_params": param_count(state["trained"]),
            "frozen_params": param_count(state["frozen"]), "frozen": t.frozen}
  return program, shapes


# --- vllm-decode ------------------------------------------------------------------------------


def decode_program(cfg, batch: int, prompt_len: int, new_tokens: int, dtype, param_dtype, mesh
                   ) -> tuple[Program, dict]:
  from lego_jax.infer import decode
  from lego_jax.models.llama import Llama, LlamaConfig

  g = cfg.vllm_generate
  config = LlamaConfig(**_with(cfg.llama, dtype=dtype, param_dtype=param_dtype))
  if prompt_len + new_tokens > config.max_position:
    raise ValueError(f"prompt {prompt_len} + {new_tokens} new tokens exceed llama.max_position="
                     f"{config.max_position}")
  lm = random_model(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, cfg.seed)
  graphdef, state = nnx.split(lm)
  state = jax.device_put(state, sharding.state_shardings(mesh, state))
  ids = random_batch({"ids": ((batch, prompt_len), "int", config.vocab_size)})["ids"]
  embeds = jax.jit(lambda s, i: nnx.merge(graphdef, s).embed(i))(state, jnp.asarray(ids))
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  # eos_id -1 never matches a token: every row makes exactly `new_tokens` tokens.
  knobs = decode.SamplingConfig(
      max_new_tokens=new_tokens, greedy=jnp.asarray(bool(g.greedy)),
      temperature=jnp.asarray(float(g.temperature), jnp.float32),
      top_p=jnp.asarray(float(g.top_p), jnp.float32), top_k=jnp.asarray(int(g.top_k), jnp.int32),
      eos_id=jnp.asarray(-1, jnp.int32), pad_id=jnp.asarray(0, jnp.int32))
  cache_dtype = jnp.dtype(dtype)

  def generate(state, embeds, lengths, key, knobs):
    return decode._generate(graphdef, state, embeds, lengths, key, knobs, cache_dtype)

  program = Program(generate, (state, embeds, lengths, jax.random.key(0), knobs), mesh,
                    while_trips=new_tokens - 1)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  shapes = {"prompt": [batch, prompt_len], "new_tokens": new_tokens,
            "params": param_count(state), "weight_bytes": int(weight_bytes),
            "param_dtype": jnp.dtype(param_dtype).name,
            "sampling": {"greedy": bool(g.greedy), "temperature": float(g.temperature),
                         "top_k": int(g.top_k), "top_p": float(g.top_p)}}
  return program, shapes


# --- sample -----------------------------------------------------------------------------------


def sample_program(cfg, batch: int, num_steps: int, dtype, param_dtype, mesh
                   ) -> tuple[Program, dict]:
  from lego_jax.data import pipeline
  from lego_jax.infer import generate

  models = ldm_models(cfg, dtype, False, mesh, param_dtype)
  graphdefs, states = zip(*(nnx.split(m) for m in models))
  states = tuple(jax.device_put(s, sharding.state_shardings(mesh, s)) for s in states)
  size, text_len = cfg.data.image_size, cfg.conditioner.text_len
  vocab, llm = cfg.clip_text.vocab_size, cfg.conditioner.llm_dim
  data = pipeline.to_global(random_batch({
      "input": ((batch, size, size, 3), "uniform", 1.0),
      "text_ids": ((batch, text_len), "int", vocab),
      "h_img": ((batch, num_patches(cfg), llm), "normal", 1.0),
      "h_txt": ((batch, text_len, llm), "normal", 1.0)}), mesh)
  empty_ids = jnp.asarray(random_batch({"e": ((1, text_len), "int", vocab)}, seed=1)["e"])
  s, t = cfg.sampler, cfg.ldm_train

  def run(states, data, key):
    unet, conditioner, clip_text, vae = (nnx.merge(g, st) for g, st in zip(graphdefs, states))
    return generate.generate_latents(
        unet, conditioner, clip_text, vae, data["input"], data["text_ids"], empty_ids,
        data["h_img"], data["h_txt"], key, s.text_guidance, s.image_guidance,
        num_steps=num_steps,
        kind=s.kind, use_image=t.use_image_embedding, use_text=t.use_text_embedding,
        scaling=cfg.vae.scaling_factor)

  program = Program(run, (states, data, jax.random.key(0)), mesh)
  shapes = {"frames": [batch, size, size, 3], "unet_batch": 3 * batch, "steps": num_steps,
            "sampler": s.kind, "param_dtype": jnp.dtype(param_dtype).name,
            "context": [3 * batch, context_length(cfg), cfg.unet.context_dim]}
  return program, shapes


# --- data -------------------------------------------------------------------------------------


def data_impl(cfg, batch: int, records_dir: Path) -> tuple[Impl, dict]:
  """The LDM training input pipeline (both views when the config trains the VLLM at a different
  size: here the LDM view only, what train-ldm reads) over synthetic records."""
  from lego_jax.bench import data_pipeline
  from lego_jax.data import pipeline

  size = cfg.data.image_size
  # Ego4D frames are 4:3 at the stored short side, so the squash to size x size is real work.
  source_h, source_w = size, round(size * 4 / 3)
  start = time.perf_counter()
  data_pipeline.write_records(records_dir, max(4 * batch, 64), source_h, source_w)
  written = time.perf_counter() - start
  loader = pipeline.pair_loader(
      records_dir, "train", batch_size=batch, image_size=size, vllm_image_size=None,
      hflip_prob=cfg.data.hflip_prob, seed=0, shuffle=True, num_epochs=None,
      worker_count=int(cfg.data.num_workers))
  it = iter(loader)

  def step():
    return next(it)["input"].shape

  def close():
    nonlocal it
    it = None
    gc.collect()

  impl = Impl("jax", step, info={"pipeline": "grain pair_loader, LDM view"}, close=close)
  facts = {"records_written_s": written, "source_frames": [source_h, source_w],
           "workers": int(cfg.data.num_workers)}
  return impl, facts


# --- the command ------------------------------------------------------------------------------


def which_bench(argv: list[str]) -> str:
  if _WHAT.value:
    return _WHAT.value
  words = [a for a in argv[1:] if not a.startswith("-")]
  picked = [w for w in words if w in WHATS]
  if not picked:
    from lego_jax.errors import UserError

    raise UserError(f"which bench? `lego-jax bench <{'|'.join(WHATS)}>` (or --what=...)")
  return picked[0]


def default_batch(cfg, what: str) -> int:
  if _BATCH.value:
    return _BATCH.value
  accum = lambda s: max(int(s.grad_accum), 1)  # noqa: E731
  return {"unet-train": cfg.ldm_train.batch_size // accum(cfg.ldm_train),
          "ldm-train": cfg.ldm_train.batch_size // accum(cfg.ldm_train),
          "vllm-train": cfg.vllm_train.batch_size // accum(cfg.vllm_train),
          "vllm-decode": cfg.vllm_generate.batch_size, "sample": cfg.vllm_generate.batch_size,
          "data": cfg.ldm_train.batch_size}[what]


def configure_jax() -> None:
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def torch_threads() -> int:
  if _THREADS.value:
    return _THREADS.value
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def run_bench(cfg, what: str, workdir: Path) -> dict:
  """Builds, compiles and times one bench (and its baseline); returns the result dict."""
  configure_jax()
  mesh, devices = make_bench_mesh(cfg)
  dev = device_info(devices)
  on_cpu = dev["backend"] == "cpu"
  interleave = on_cpu if _INTERLEAVE.value is None else _INTERLEAVE.value
  batch = default_batch(cfg, what)
  dtype = compute_dtype(devices)
  units_per_step, unit = batch, "samples"
  facts: dict = {}
  shapes: dict = {}
  remat = _REMAT.value
  load_before = os.getloadavg()

  def jax_factory():
    nonlocal facts, shapes
    if what == "data":
      impl, facts = data_impl(cfg, batch, Path(tempfile.mkdtemp(prefix="lego_bench_data_")))
      return impl
    # Models are built outside the mesh context (flax would try to shard their abstract
    # variables there); the step is traced and compiled inside it.
    program, shapes = build_program()
    impl, facts = jax_impl(program, devices)
    return impl

  def build_program():
    if what == "unet-train":
      return unet_train_program(cfg, batch, dtype, bool(remat), mesh)
    if what == "ldm-train":
      return ldm_train_program(cfg, batch, dtype, bool(remat), mesh)
    if what == "vllm-train":
      r = cfg.vllm_train.remat if remat is None else remat
      return vllm_train_program(cfg, batch, seq_len(cfg), dtype, bool(r), mesh)
    if what == "vllm-decode":
      return decode_program(cfg, batch, prompt_len(cfg), new_tokens(cfg), dtype,
                            inference_param_dtype(dtype), mesh)
    return sample_program(cfg, batch, sample_steps(cfg), dtype, inference_param_dtype(dtype),
                          mesh)

  if what == "vllm-train":
    units_per_step, unit = batch * seq_len(cfg), "tokens"
  elif what == "vllm-decode":
    units_per_step, unit = batch * new_tokens(cfg), "tokens"
  elif what == "sample":
    unit = "frames"

  factories: list[tuple[str, Callable[[], Impl]]] = []
  baseline = _BASELINE.value == "torch" and what != "data"
  if baseline:
    from lego_jax.bench import torch_baseline

    spec = torch_baseline.Spec(
        what=what, cfg=cfg, batch=batch, dtype=jnp.dtype(dtype).name,
        remat=bool(cfg.vllm_train.remat if remat is None and what == "vllm-train" else remat),
        seq_len=seq_len(cfg) if what == "vllm-train" else 0,
        prompt_len=prompt_len(cfg) if what == "vllm-decode" else 0,
        new_tokens=new_tokens(cfg) if what == "vllm-decode" else 0,
        sample_steps=sample_steps(cfg) if what == "sample" else 0,
        threads=torch_threads(), device="cpu" if on_cpu else "cuda")
    factories.append(("torch_eager", lambda: torch_baseline.build(spec, compiled=False)))
    if _TORCH_COMPILE.value and torch_baseline.compile_supported(what):
      factories.append(("torch_compile", lambda: torch_baseline.build(spec, compiled=True)))
  # JAX last when not interleaved: torch's cached memory is released before JAX allocates.
  factories.append(("jax", jax_factory))
  if interleave:
    factories = factories[-1:] + factories[:-1]

  results = measure(factories, steps=max(_STEPS.value, 1), warmup=_WARMUP.value,
                    repeats=max(_REPEATS.value, 1), interleave=interleave)
  jax_result = results.pop("jax")
  timing = summarise(jax_result["times_s"])
  seconds = timing["ms_per_step"] / 1000.0
  flops = facts.get("flops_per_step")
  peak = dev["peak_tflops_per_device"]
  out = {
      "bench": what, "config": cfg.name, **dev, "dtype": jnp.dtype(dtype).name,
      "batch": batch, "shapes": shapes, **timing,
      f"{unit}_per_step": units_per_step, f"{unit}_per_s": units_per_step / seconds,
      "compile_s": jax_result["compile_s"],
      # The process's CPU time per step (median): on a CPU shared with other jobs, what a step
      # costs whatever share of the cores it got.
      "cpu_ms_per_step": 1000.0 * statistics.median(jax_result["cpu_s"]),
      "flops_per_step": flops,
      "flops_source": ("counted from the jaxpr: matmul + convolution multiply-adds x 2, loops x "
                       "trip count (lego_jax/bench/flops.py)") if flops is not None else None,
      "tflops": flops / seconds / 1e12 if flops else None,
      "mfu": (flops / seconds / 1e12 / (peak * len(devices))) if flops and peak else None,
      "peak_memory_bytes": peak_memory_bytes(devices) if not on_cpu else None,
      **{k: v for k, v in facts.items() if k != "flops_per_step"},
  }
  if what == "vllm-decode" and "weight_bytes" in shapes:
    # Every decode step reads all weights once: a floor on bytes moved per step.
    steps = new_tokens(cfg)
    out["weight_read_gb_per_s"] = shapes["weight_bytes"] * steps / seconds / 1e9
  if results:
    out["baseline"] = {}
    for name, r in results.items():
      t = summarise(r["times_s"])
      base_s = t["ms_per_step"] / 1000.0
      out["baseline"][name] = {
          **t, f"{unit}_per_s": units_per_step / base_s, "compile_s": r["compile_s"],
          "tflops": flops / base_s / 1e12 if flops else None,
          "cpu_ms_per_step": 1000.0 * statistics.median(r["cpu_s"]), **r["info"]}
      out[f"speedup_vs_{name}"] = base_s / seconds
      out[f"cpu_speedup_vs_{name}"] = (out["baseline"][name]["cpu_ms_per_step"]
                                       / out["cpu_ms_per_step"])
  out["run"] = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "host": platform.node(), "cpus": os.cpu_count(), "load_avg_before": list(load_before),
      "load_avg_after": list(os.getloadavg()), "interleaved": interleave,
      "steps": _STEPS.value, "repeats": _REPEATS.value, "warmup_steps": _WARMUP.value,
      "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "torch_threads": torch_threads() if baseline else None,
      "compilation_cache": _CACHE.value or None,
      "command": " ".join(sys.argv)}
  return out


def seq_len(cfg) -> int:
  return _SEQ_LEN.value or int(cfg.vllm_train.max_length)


def prompt_len(cfg) -> int:
  return _PROMPT_LEN.value or num_patches(cfg) + 44


def new_tokens(cfg) -> int:
  return _NEW_TOKENS.value or min(128, int(cfg.vllm_generate.max_new_tokens))


def sample_steps(cfg) -> int:
  return _SAMPLE_STEPS.value or int(cfg.sampler.num_steps)


def main(cfg, workdir: Path) -> int:
  what = which_bench(sys.argv)
  result = run_bench(cfg, what, Path(workdir))
  text = json.dumps(result, indent=1, default=str)
  out = Path(flags.FLAGS.out) if flags.FLAGS.out else Path(workdir) / "bench" / f"{what}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text + "\n")
  print(text)
  return 0
