"""Multi-host on one machine: 2 processes x 4 CPU devices (launch/cpu_multiprocess.sh: coordinator
on 127.0.0.1, gloo collectives) train train-vae and checkpoint; the result equals 1 process x 8
devices reading the same 2 data shards, and the 2-process checkpoint resumes on 1 process with
the same data order."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lego_jax import config as config_lib
from lego_jax.data import prepare

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600
VAE = ["--config.vae.block_out_channels=(8,)", "--config.vae.layers_per_block=1",
       "--config.vae.norm_groups=4", "--config.data.image_size=16",
       "--config.vae_train.batch_size=8", "--config.vae_train.log_every=1",
       "--config.vae_train.ckpt_every=2", "--config.data.num_workers=0"]
# See tests/parallel/test_sharding.py: softmax ignores it, its gradient is rounding noise.
NOISE_ONLY = "['to_k']['bias']"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("multihost_data")
  cfg = config_lib.load("tiny", ["data.synthetic.num_train=32", "data.synthetic.num_val=8",
                                 "data.synthetic.num_test=8"])
  prepare.prepare(cfg, root)
  return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  e = dict(os.environ)
  e["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
                    " --xla_llvm_disable_expensive_passes=true")
  # PYTHON: the launcher's processes use this interpreter (a checkout without .venv, too).
  e.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHON=sys.executable,
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return e


def _args(stage: str, workdir: Path, data: Path, *extra) -> list[str]:
  return [stage, f"--workdir={workdir}", f"--config.data.records_dir={data / 'records'}",
          f"--config.data.tokenizer_dir={data / 'tokenizer'}", *extra]


def _single(args, env) -> None:
  done = subprocess.run([sys.executable, "-m", "lego_jax", *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]


def _multi(args, env, logs: Path) -> None:
  e = dict(env, NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", LOG_DIR=str(logs))
  done = subprocess.run(["bash", str(REPO / "launch" / "cpu_multiprocess.sh"), *args], env=e,
                        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
  other = (logs / "process_1.log").read_text() if (logs / "process_1.log").exists() else ""
  assert done.returncode == 0, done.stderr[-3000:] + "\n--- process 1:\n" + other[-2000:]
  assert "train-vae: held-out reconstruction PSNR" in other  # process 1 ran to the end too


def restore_on_one_device(path: Path):
  """A saved train state as single-device arrays, whatever mesh and processes wrote it."""
  ckptr = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ckptr.metadata(path).item_metadata)
  return ckptr.restore(path, target)


def _params(workdir: Path, step: int) -> dict:
  restored = restore_on_one_device(workdir / "checkpoints" / "vae" / str(step) / "state")
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(restored["params"])}


def _losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(l) for l in (workdir / "logs" / "vae" / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows}


def _assert_close(a: dict, b: dict, what: str) -> None:
  assert a.keys() == b.keys()
  for key in a:
    if NOISE_ONLY not in key:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=f"{what}: {key}")


def test_two_processes_equal_one_process_and_resume_on_one(data, env, tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  # Reference: one process x 8 devices, the data cut into the 2 shards two hosts would read.
  _single(_args("train-vae", single, data, *VAE, "--config.vae_train.num_steps=6",
                "--data_shards=2"), env)
  # Two processes x 4 devices, one shard each; every process saves its part.
  _multi(_args("train-vae", multi, data, *VAE, "--config.vae_train.num_steps=4"), env,
         tmp_path / "logs")
  assert sorted(p.name for p in (multi / "checkpoints" / "vae").iterdir()) == ["2", "4"]
  data_item = json.loads((multi / "checkpoints" / "vae" / "4" / "data" / "metadata").read_text())
  assert data_item["state"]["num_shards"] == 2
  assert sorted(data_item["state"]["shards"]) == ["0", "1"]  # both hosts' iterators

  ref_losses = _losses(single)
  for step, loss in _losses(multi).items():
    np.testing.assert_allclose(loss, ref_losses[step], rtol=1e-5, err_msg=f"step {step}")
  _assert_close(_params(multi, 4), _params(single, 4), "2x4 vs 1x8 at step 4")

  # Resumed on ONE process (no --data_shards: the checkpoint's 2 shards keep the data order).
  _single(_args("train-vae", multi, data, *VAE, "--config.vae_train.num_steps=6"), env)
  assert sorted(_losses(multi)) == list(range(1, 7))
  for step in (5, 6):
    np.testing.assert_allclose(_losses(multi)[step], ref_losses[step], rtol=1e-5)
  _assert_close(_params(multi, 6), _params(single, 6), "2x4 then 1x8 vs 1x8 at step 6")
