"""`lego-jax bench`: every bench runs at a micro config and reports sane numbers (never timed
against a target: the numbers are whatever this machine gives); the torch baseline runs in the
same process. The FLOP counter's own tests are in test_flops.py."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

from lego_jax import config as config_lib
from lego_jax.bench import bench, harness
from lego_jax.models.unet import UNet, UNetConfig


def micro_config():
  """The tiny config shrunk further: every bench compiles in seconds on one core."""
  cfg = config_lib.load("tiny")
  with cfg.unlocked():
    cfg.data.update(image_size=16, vllm_image_size=16, num_workers=0)
    # One level each: XLA:CPU's compile time grows with the number of parameter arrays.
    cfg.unet.update(block_out_channels=(16,), attention_levels=(True,), num_heads=2,
                    context_dim=16, norm_groups=8)
    cfg.vae.update(block_out_channels=(8,), norm_groups=4)
    cfg.clip_text.update(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    cfg.clip_vision.update(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                           image_size=16, patch_size=8, projection_dim=8)
    cfg.llama.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                     num_kv_heads=2, max_position=128)
    cfg.llava.update(vision_hidden=16, text_hidden=32)
    cfg.conditioner.update(llm_dim=32, context_dim=16, num_heads=2, ffn_dim=32, num_layers=1)
    cfg.sampler.num_steps = 2
    cfg.vllm_train.frozen = r"^vision/.*"  # the release's rule (the tiny default trains it)
    cfg.mesh.shape = (-1, 1, 1)
  return cfg


BENCH_FLAGS = ("what", "batch", "steps", "warmup_steps", "repeats", "baseline", "torch_compile",
               "threads", "devices", "new_tokens", "seq_len", "prompt_len")


@pytest.fixture(autouse=True)
def parsed_flags():
  # In-process runs (no CLI): parse the flags once, put the bench's back after each test.
  # (absl's flagsaver would also drop flags that libraries define meanwhile, e.g. array_record's.)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  saved = {name: getattr(flags.FLAGS, name) for name in BENCH_FLAGS}
  yield
  for name, value in saved.items():
    setattr(flags.FLAGS, name, value)


def run(what: str, tmp_path, **flag_values) -> dict:
  values = {**dict(steps=1, repeats=1, warmup_steps=1, devices=1, batch=2), **flag_values}
  for name, value in values.items():
    setattr(flags.FLAGS, name, value)
  result = bench.run_bench(micro_config(), what, tmp_path)
  json.dumps(result)  # what main() prints must serialise
  return result


def positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_common(r: dict, unit: str, what: str) -> None:
  assert r["bench"] == what and r["config"] == "tiny" and r["backend"] == "cpu"
  assert r["num_devices"] == 1 and r["batch"] == 2
  for key in ("ms_per_step", "ms_min", "ms_p90", f"{unit}_per_s", f"{unit}_per_step"):
    assert positive(r[key]), (key, r[key])
  assert r["ms_min"] <= r["ms_per_step"] <= r["ms_p90"]
  assert r[f"{unit}_per_s"] == pytest.approx(r[f"{unit}_per_step"] / r["ms_per_step"] * 1000)
  assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # no MFU on CPU
  assert r["run"]["cpus"] >= 1 and len(r["run"]["load_avg_before"]) == 3


def check_flops(r: dict) -> None:
  assert positive(r["flops_per_step"]) and positive(r["tflops"]) and positive(r["compile_s"])
  assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["ms_per_step"] / 1e9)
  assert sum(r["flops_by_kind"].values()) == pytest.approx(r["flops_per_step"])
  assert r["compiled_memory"]["total_bytes"] > 0


@pytest.mark.parametrize("what,unit", [("ldm-train", "samples"), ("vllm-train", "tokens"),
                                       ("vllm-decode", "tokens"), ("sample", "frames")])
def test_bench_reports_sane_numbers(what, unit, tmp_path):
  r = run(what, tmp_path, new_tokens=4, seq_len=24, prompt_len=8)
  check_common(r, unit, what)
  check_flops(r)
  if what == "vllm-train":
    assert r["tokens_per_step"] == 2 * 24 and r["shapes"]["ids"] == [2, 24]
    assert r["shapes"]["frozen_params"] > 0  # the CLIP tower is frozen (vllm_train.frozen)
  if what == "vllm-decode":
    assert r["tokens_per_step"] == 2 * 4 and r["shapes"]["prompt"] == [2, 8]
    assert positive(r["weight_read_gb_per_s"])
  if what == "sample":
    assert r["shapes"]["unet_batch"] == 6 and r["shapes"]["steps"] == 2


def test_unet_train_against_torch_in_the_same_process(tmp_path):
  r = run("unet-train", tmp_path, baseline="torch", torch_compile=False, repeats=2, threads=1)
  check_common(r, "samples", "unet-train")
  check_flops(r)
  base = r["baseline"]["torch_eager"]
  assert set(r["baseline"]) == {"torch_eager"} and base["precision"] == "fp32"
  assert base["timed_steps"] == 2 and base["threads"] == 1 and positive(base["samples_per_s"])
  assert r["speedup_vs_torch_eager"] == pytest.approx(base["ms_per_step"] / r["ms_per_step"])
  # CPU time per step (every thread of the process), what a shared machine's load leaves alone
  assert positive(r["cpu_ms_per_step"]) and positive(base["cpu_ms_per_step"])
  assert r["cpu_speedup_vs_torch_eager"] == pytest.approx(
      base["cpu_ms_per_step"] / r["cpu_ms_per_step"])
  assert r["run"]["interleaved"] and r["timed_steps"] == 2
  # micro config: 16x16 frames, a one-level VAE (factor 1); context 77 + 4 patches + 77
  assert r["shapes"]["latent"] == [2, 16, 16, 8] and r["shapes"]["context"] == [2, 158, 16]


def test_data_bench(tmp_path):
  r = run("data", tmp_path)
  check_common(r, "samples", "data")
  assert r["flops_per_step"] is None and r["workers"] == 0 and r["source_frames"] == [16, 21]


def test_peak_table_and_bench_word():
  assert harness.peak_tflops("NVIDIA H100 80GB HBM3") == 989
  assert harness.peak_tflops("NVIDIA H200") == 989
  assert harness.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
  assert harness.peak_tflops("TPU v5 lite") == 197 and harness.peak_tflops("TPU v5p") == 459
  assert harness.peak_tflops("TPU v6 lite") == 918 and harness.peak_tflops("cpu") is None
  assert bench.which_bench(["lego-jax", "bench", "--batch=4", "vllm-decode"]) == "vllm-decode"
  flags.FLAGS.what = "sample"
  assert bench.which_bench(["lego-jax", "bench"]) == "sample"


def test_random_model_is_placed_and_not_zero():
  cfg = micro_config()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  model = harness.random_model(lambda: UNet(UNetConfig(**cfg.unet), rngs=nnx.Rngs(0)), mesh)
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(np.all(np.isfinite(np.asarray(x))) and np.any(np.asarray(x) != 0) for x in leaves)
  scale = np.asarray(model.conv_norm_out.scale.get_value())
  assert abs(float(scale.mean()) - 1.0) < 0.05  # norm scales start near 1
