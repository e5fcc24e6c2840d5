"""`lego-jax plan` on a small config: fake devices set up before JAX starts, the real train-vae
step compiled from abstract shapes on two meshes, memory per device and fits reported, each row
saved as it is finished and kept by a rerun into the same workdir. (Its FLOP counter,
lego_jax/bench/flops.py, is tested in tests/bench/test_flops.py.)"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax

from lego_jax import config as config_lib
from lego_jax import plan
from lego_jax.parallel import sharding
from procs import kill_when

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config.vae.block_out_channels=(8,)", "--config.vae.layers_per_block=1",
        "--config.vae.norm_groups=4", "--config.data.image_size=16",
        "--config.vae_train.batch_size=8"]


def _plan(workdir: Path, *args: str, wait: bool = True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # the command sets up its own 16 fake devices
  cmd = [sys.executable, "-m", "lego_jax", "plan", f"--workdir={workdir}",
         "--plan_targets=cpu-4", *TINY, *args]  # args last: they override TINY
  if not wait:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _saved(workdir: Path) -> list[dict]:
  path = workdir / "plan.json"
  return json.loads(path.read_text())["rows"] if path.exists() else []


def test_plan_command_compiles_the_vae_step_abstractly_row_by_row(tmp_path):
  # Killed during its second row (the LDM step, a compile of many seconds): the first row is
  # already in plan.json, written whole.
  proc = _plan(tmp_path, "--plan_stages=vae,ldm", "--plan_meshes=config", wait=False)
  kill_when(proc, lambda: bool(_saved(tmp_path)), 600)
  assert proc.returncode == -signal.SIGKILL, "the plan ended before its LDM row was killed"
  (first,) = _saved(tmp_path)
  assert (first["stage"], first["mesh_request"], first["target"], first["devices"]) == (
      "vae", "config", "cpu-4", 4)
  # Marked, to tell a row taken from plan.json from one compiled again.
  saved = json.loads((tmp_path / "plan.json").read_text())
  saved["rows"][0]["compile_s"] = 12345.0
  (tmp_path / "plan.json").write_text(json.dumps(saved))

  # The same output again, one more mesh: the finished row is kept, only the new one compiles.
  done = _plan(tmp_path, "--plan_stages=vae", "--plan_meshes=config,1:2:2")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "targets cpu-4;" in done.stdout and "1 rows done before" in done.stdout
  assert done.stdout.count("(from plan.json)") == 1
  rows = _saved(tmp_path)
  assert [(r["mesh"], r["devices"]) for r in rows] == [
      ({"data": 4, "fsdp": 1, "tensor": 1}, 4), ({"data": 1, "fsdp": 2, "tensor": 2}, 4)]
  replicated, split = rows
  assert replicated["compile_s"] == 12345.0 and split["compile_s"] < 12345.0
  for r in rows:
    assert "error" not in r and r["compiler"] == "cpu" and r["fits"] is None  # no HBM to judge
    assert r["global_batch"] == 8 and r["bytes_per_device"]["peak"] > 0
    assert f"{r['micro_batch_per_device']:g}/device" in done.stdout
  assert replicated["micro_batch_per_device"] == 2 and split["micro_batch_per_device"] == 4
  # The argument bytes are exactly each device's shards of the train state and the batch.
  cfg = config_lib.load("tiny", [a.removeprefix("--config.") for a in TINY])
  for r in rows:
    mesh = sharding.make_mesh(tuple(r["mesh"].values()), devices=jax.devices()[:4])
    stage = plan.vae_stage(cfg, mesh)
    shards = [math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
              for x in jax.tree.leaves([stage.state, stage.batch])]
    assert abs(r["bytes_per_device"]["arguments"] - sum(shards)) <= 64  # + the rng key
  assert split["bytes_per_device"]["arguments"] < replicated["bytes_per_device"]["arguments"]
  # No scans in the VAE: the jaxpr count and XLA's per-device count agree on the work.
  ratio = replicated["flops_per_device"] / replicated["xla_cost_analysis_flops_per_device"]
  assert 0.8 < ratio < 1.25, ratio
  assert replicated["flops_per_step"] == split["flops_per_step"]

  # Rows of another config are never mixed into this file.
  other = _plan(tmp_path, "--plan_stages=vae", "--plan_meshes=config",
                "--config.vae_train.batch_size=16")
  assert other.returncode == 2, other.stderr[-3000:]
  assert "another config (differs in vae_train.batch_size)" in other.stderr
  assert _saved(tmp_path) == rows
