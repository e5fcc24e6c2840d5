"""`lego-jax plan` on the target compilers, without the hardware: a sharded train step compiled by
libtpu for a TPU v5e-4 topology and by XLA:GPU for an 8 x H100 node (XLA's own target
description), memory from those compilers within what the step's shapes allow, judged against
the target's HBM, and a roofline from the peaks table. Skipped only where the extra that brings
the compiler (plan-tpu, plan-gpu) is not installed."""

import math

import jax
import pytest

from lego_jax import config as config_lib
from lego_jax import plan
from lego_jax.config import ConfigError
from lego_jax.parallel import sharding

# The smallest VAE the trainer accepts (tests/procs.py's SMALL_VAE): its step compiles in
# seconds, yet has convolutions, norms and an optimizer split over every mesh axis.
SMALL_VAE = ["vae.block_out_channels=(8,)", "vae.layers_per_block=1", "vae.norm_groups=4",
             "data.image_size=16", "vae_train.batch_size=8"]


def _needs(target: plan.Target):
  missing = plan.compiler_missing(target)
  if missing:
    pytest.skip(missing)


def _tiled(shape) -> int:
  """Elements of `shape` padded to (8, 128) tiles in its last two dimensions (1-D: one row)."""
  s = [1] * max(0, 2 - len(shape)) + list(shape)
  s[-1], s[-2] = -(-s[-1] // 128) * 128, -(-s[-2] // 8) * 8
  return math.prod(s)


@pytest.mark.parametrize("name, mesh_shape, kind, cost_analysis", [
    ("tpu-v5e-4", (1, 2, 2), "TPU v5 lite", True),
    ("h100-80g-x8", (2, 2, 2), "NVIDIA H100 80GB HBM3", False),
])
def test_target_compiler_memory_of_a_sharded_step(name, mesh_shape, kind, cost_analysis):
  target = plan.target_of(name)
  _needs(target)
  cfg = config_lib.load("tiny", SMALL_VAE)
  devices = plan.target_devices(target)
  assert len(devices) == target.chips and devices[0].device_kind == kind
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  row = plan.judge(dict(plan.compile_stage(cfg, "vae", mesh), target=name, mesh_request="x"))

  assert row["compiler"] == target.platform.replace("cuda", "gpu")
  assert row["mesh"] == dict(zip(sharding.MESH_AXES, mesh_shape))
  b = row["bytes_per_device"]
  # Arguments: at least this device's shards of state and batch; a GPU takes them as they are,
  # a TPU pads every shard to its (8, 128) tiles.
  stage = plan.vae_stage(cfg, mesh)
  shards = [x.sharding.shard_shape(x.shape) for x in jax.tree.leaves([stage.state, stage.batch])]
  items = [x.dtype.itemsize for x in jax.tree.leaves([stage.state, stage.batch])]
  exact = sum(math.prod(s) * i for s, i in zip(shards, items))
  tiled = sum(_tiled(s) * i for s, i in zip(shards, items))
  assert exact <= b["arguments"] <= (tiled if target.platform == "tpu" else exact + 64)
  # The split over (fsdp, tensor) reached the compiler: gradients are reduced between devices.
  assert row["collectives"].get("all-reduce", 0) + row["collectives"].get("reduce-scatter", 0) > 0
  assert b["aliased"] > 0.9 * b["outputs"]  # the donated state is updated in place
  assert 0 < b["temporaries"] < 2**30
  # The peak is the buffers; the generated code is reported apart.
  assert b["peak"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"]
  assert b["generated_code"] >= 0
  assert row["fits"] is True and row["hbm_bytes"] == target.hbm_bytes
  # The roofline: the larger of the compute and memory times at the target's peaks.
  compute = row["flops_per_device"] / target.peak_flops
  memory = max(row["matmul_bytes_per_device"], b["arguments"] + b["outputs"]) / target.hbm_bandwidth
  assert row["roofline_s"] == max(compute, memory) > 0
  xla = row["xla_cost_analysis_flops_per_device"]
  if cost_analysis:
    # libtpu counts what one device runs: the VAE has no layer split over `tensor`, so each
    # device convolves its (data, fsdp) part of the batch whole; no scans, so the jaxpr agrees.
    batch_part = row["flops_per_step"] / (mesh.shape["data"] * mesh.shape["fsdp"])
    assert 0.8 < batch_part / xla < 1.25, (batch_part, xla)
  else:
    assert xla is None
  assert plan.format_row(row).startswith(f"vae    {name}")


def test_target_names_and_missing_compilers(monkeypatch):
  assert plan.target_of("cpu-16").platform == "cpu"
  for bad in ("cpu-17", "tpu-v9-8", "h100"):
    with pytest.raises(ConfigError, match="unknown target"):
      plan.target_of(bad)
  # Every target's compiler is one of the two extras, and its description file is in the package.
  for t in plan.TARGETS:
    assert t.platform in ("tpu", "cuda") and t.source
    assert t.platform == "tpu" or (plan.SPECS / t.spec).is_file()
  # Without its extra, a target names the one to install.
  monkeypatch.setitem(plan._EXTRA, "tpu", ("lego_jax_no_such_module", "plan-tpu"))
  assert "pip install -e \".[plan-tpu]\"" in plan.compiler_missing(plan.target_of("tpu-v5p-8"))
  assert plan.compiler_missing(plan.target_of("cpu-4")) is None
