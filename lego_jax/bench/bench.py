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
  sample       lego_jax/infer/ldm.py's `generate_latents`: VAE encode, CLIP text, conditioner,
               `--sample_steps` Euler-ancestral steps with the 3-way dual-guidance batch, VAE decode.
  data         the training input pipeline (Grain, JPEG decode, resize, flip, batch) on synthetic
               records at the config's image sizes, `cfg.data.num_workers` worker processes.

Default batch (`--batch=0`): unet/ldm-train the config's per-step LDM batch (batch_size /
grad_accum), vllm-train vllm_train.batch_size / grad_accum, vllm-decode and sample
vllm_generate.batch_size, data ldm_train.batch_size.

Reported: ms_per_step (median), samples_per_s (tokens_per_s for the LLM benches), flops_per_step
and TFLOP/s, MFU against the device's dense bf16 peak (harness.PEAK_TFLOPS; none on CPU),
compile_s (AOT lower + compile), peak device memory (`memory_stats()`, GPU/TPU) and XLA's
compiled memory analysis. FLOPs are COUNTED from the program's jaxpr (lego_jax/bench/flops.py:
matmul and convolution multiply-adds x 2, loops x their trip count, PyTorch FlopCounterMode's
convention); XLA's own cost-analysis figure, which counts every loop body once, is reported
beside it. With remat on, the count is of the same step without remat (model FLOPs, the MFU
convention).

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

This module is the command (flags -> one bench's result); the programs are built in
lego_jax/bench/workloads.py and timed by lego_jax/bench/harness.py.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import flags

from lego_jax.bench import torch_baseline, workloads
from lego_jax.bench.harness import (Impl, device_info, jax_impl, measure, peak_memory_bytes,
                                    summarise)
from lego_jax.bench.workloads import num_patches
from lego_jax.errors import UserError
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
    "unet_attention", "default", list(workloads.UNET_ATTENTION),
    "UNet attention kernel (UNetConfig.attention_impl): default = lego_jax's head-major XLA "
    "products, xla = jax.nn.dot_product_attention's XLA path, cudnn = its fused cuDNN kernel")
_CACHE = flags.DEFINE_string("compilation_cache", "", "directory of JAX's persistent "
                             "compilation cache (off when empty)")


# --- what the flags choose --------------------------------------------------------------------


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


# --- the command ------------------------------------------------------------------------------


def which_bench(argv: list[str]) -> str:
  if _WHAT.value:
    return _WHAT.value
  words = [a for a in argv[1:] if not a.startswith("-")]
  picked = [w for w in words if w in WHATS]
  if not picked:
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
      impl, facts = workloads.data_impl(cfg, batch,
                                        Path(tempfile.mkdtemp(prefix="lego_bench_data_")))
      return impl
    # Models are built outside the mesh context (flax would try to shard their abstract
    # variables there); the step is traced and compiled inside it.
    program, shapes = build_program()
    impl, facts = jax_impl(program, devices)
    return impl

  def build_program():
    attention = _UNET_ATTENTION.value
    if what == "unet-train":
      return workloads.unet_train_program(cfg, batch, dtype, bool(remat), mesh, attention)
    if what == "ldm-train":
      return workloads.ldm_train_program(cfg, batch, dtype, bool(remat), mesh, attention)
    if what == "vllm-train":
      r = cfg.vllm_train.remat if remat is None else remat
      return workloads.vllm_train_program(cfg, batch, seq_len(cfg), dtype, bool(r), mesh)
    if what == "vllm-decode":
      return workloads.decode_program(cfg, batch, prompt_len(cfg), new_tokens(cfg), dtype,
                                      inference_param_dtype(dtype), mesh)
    return workloads.sample_program(cfg, batch, sample_steps(cfg), dtype,
                                    inference_param_dtype(dtype), mesh, attention)

  if what == "vllm-train":
    units_per_step, unit = batch * seq_len(cfg), "tokens"
  elif what == "vllm-decode":
    units_per_step, unit = batch * new_tokens(cfg), "tokens"
  elif what == "sample":
    unit = "frames"

  factories: list[tuple[str, Callable[[], Impl]]] = []
  baseline = _BASELINE.value == "torch" and what != "data"
  if baseline:
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
