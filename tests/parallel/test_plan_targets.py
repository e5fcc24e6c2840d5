"""`lego-jax plan` on the target compilers, without the hardware: a sharded train step compiled by
libtpu for a TPU v5e-4 topology and by XLA:GPU for an 8 x H100 node (XLA's own target
description), memory from those compilers within what the step's shapes allow, judged against
the target's HBM, and a roofline from the peaks table. Skipped only where the extra that brings
the compiler (plan-tpu, plan-gpu) is not installed."""

import math
import re

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
def test_target_compiler_memory_of_a_sharded_step(name, mesh_shape, kind, cost_analysis,
                                                  monkeypatch):
  target = plan.target_of(name)
  _needs(target)
  cfg = config_lib.load("tiny", SMALL_VAE)
  devices = plan.target_devices(target)
  assert len(devices) == target.chips and devices[0].device_kind == kind
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  texts = []  # the compiled program's HLO text, as compile_stage reads it
  as_text = jax.stages.Compiled.as_text
  monkeypatch.setattr(jax.stages.Compiled, "as_text",
                      lambda self, *a, **k: texts.append(as_text(self, *a, **k)) or texts[-1])
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
  # The split over (fsdp, tensor) reached the compiler: FSDP gathers the weights, gradients are
  # reduced between devices.
  c = row["collectives"]
  assert c.get("all-gather", 0) > 0 and c.get("all-reduce", 0) + c.get("reduce-scatter", 0) > 0
  # Every collective the compiler planned is counted: XLA names an instruction after its op
  # (`%all-gather-start.3 = ...`), whatever its shape. Both compilers combine small collectives
  # into ones of tuple shape (what the row of libtpu's full-size VAE step missed).
  text = texts[-1]
  named = re.findall(r"^\s*(?:ROOT )?%(" + "|".join(plan.COLLECTIVES) + r")(?:-start)?(?:\.\d+)? = ",
                     text, re.M)
  assert c == {op: named.count(op) for op in set(named)}
  assert re.search(r"^\s*%(all-reduce|all-gather)\S* = \(", text, re.M)
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


def test_collectives_in_hlo_text():
  # Lines as libtpu and XLA:GPU print them (shortened): tuple shapes with comments and tiled
  # layouts, async start/done pairs, collectives as operands of other instructions.
  text = """
  %all-reduce.95 = (f32[]{:T(128)}, f32[8]{0:T(128)}, /*index=5*/f32[3,3,4,8]{3,2,1,0:T(4,128)}) all-reduce(%a, %b, %c), channel_id=1, to_apply=%add
  %get-tuple-element.79 = f32[8]{0:T(128)} get-tuple-element(%all-reduce.95), index=1
  %all-reduce.1 = f32[4,256]{1,0:T(4,128)S(1)} all-reduce(%fusion.2), channel_id=2, to_apply=%add
  %fusion.73 = f32[4,256]{1,0} fusion(%all-reduce.1, %all-gather.2), kind=kLoop, calls=%fused_computation.49
  %all-gather-start.6 = ((f32[4,4]{1,0}, f32[4,4]{1,0}), (f32[8,4]{1,0}, f32[8,4]{1,0})) all-gather-start(%p, %q), dimensions={0}
  %all-gather-done.6 = (f32[8,4]{1,0}, f32[8,4]{1,0}) all-gather-done(%all-gather-start.6)
  %all-reduce-start.12 = pred[6]{0} all-reduce-start(%wrapped_concatenate.6), channel_id=253
  %all-reduce-done.12 = pred[6]{0} all-reduce-done(%all-reduce-start.12)
  %collective-permute-start = (f32[2]{0}, f32[2]{0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  ROOT %reduce-scatter = f32[] reduce-scatter(%y), dimensions={0}
  """
  assert plan.collectives(text) == {"all-gather": 1, "all-reduce": 3, "collective-permute": 1,
                                    "reduce-scatter": 1}
  assert plan.collectives("%add.1 = f32[] add(%x, %y)") == {}


# libtpu's refusals, as the deviceless compile and a TPU VM's compile print them (the first from
# the 13B VLLM step on tpu-v5e-16, mesh (1, 16, 1), 2026-12-03).
DEVICELESS_OOM = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                  "temporaries (19.40G) exceeds available HBM (15.75G).")
TPU_VM_OOM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
              "space hbm. Used 21.95G of 15.48G hbm.\n Exceeded hbm capacity by 6.47G.\n")


def test_hbm_refusal_is_a_row_that_does_not_fit(monkeypatch):
  """A step the target's compiler refuses for want of HBM is a does-not-fit row with what the
  compiler named; any other compile error stays an error. No compile: the SMALL_VAE step is lowered
  for 4 CPU devices standing in for a v5e-4, and the compiler's answer is the message above."""
  r = plan.hbm_refusal(TPU_VM_OOM)
  assert (r["required_bytes"], r["available_bytes"]) == (round(21.95 * 2**30), round(15.48 * 2**30))
  assert r["required_for"] == "the program" and "\n" not in r["message"]
  # Out of on-chip vector memory is a kernel that cannot be laid out, not a chip too small.
  assert plan.hbm_refusal("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem. Used "
                          "32.42M of 16.00M vmem.") is None

  target = plan.target_of("tpu-v5e-4")
  monkeypatch.setattr(plan, "target_devices", lambda t: jax.devices("cpu")[:t.chips])
  answer = [DEVICELESS_OOM]

  def compile(self, *args, **kwargs):
    raise jax.errors.JaxRuntimeError(answer[0])

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile)
  cfg = config_lib.load("tiny", SMALL_VAE)
  lines = []
  row, = plan.plan(cfg, ("vae",), ("1:-1:1",), (target,), log=lines.append)
  assert "error" not in row and row["fits"] is False and row["roofline_s"] is None
  assert row["refused"] == {"required_bytes": round(19.40 * 2**30),
                            "available_bytes": round(15.75 * 2**30),
                            "required_for": "HLO temporaries", "message": DEVICELESS_OOM}
  assert row["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and row["devices"] == 4
  assert (row["global_batch"], row["grad_accum"], row["micro_batch_per_device"]) == (8, 1, 2)
  assert row["hbm_bytes"] == target.hbm_bytes and "bytes_per_device" not in row
  assert lines == [
      "vae    tpu-v5e-4   mesh {'data': 1, 'fsdp': 4, 'tensor': 1} (cpu compiler): micro-batch "
      "2/device (global 8, accum 1); DOES NOT FIT: the compiler refused it, HLO temporaries "
      f"19.40 GiB > the 15.75 GiB of HBM it has; compile {row['compile_s']:.0f} s"]
  # A finished row: a rerun into the same plan.json takes it as it is.
  again = plan.plan(cfg, ("vae",), ("1:-1:1",), (target,), log=lines.append, done=(row,))
  assert again[0]["refused"] == row["refused"] and lines[-1].endswith("(from plan.json)")

  answer[0] = "INTERNAL: Couldn't legalize %dot.3"  # any other refusal: an error
  row, = plan.plan(cfg, ("vae",), ("1:-1:1",), (target,), log=lines.append)
  assert row["error"] == "JaxRuntimeError: INTERNAL: Couldn't legalize %dot.3"
  assert row["fits"] is None and lines[-1].endswith("does not compile: " + row["error"])
