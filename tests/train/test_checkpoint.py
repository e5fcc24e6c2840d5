"""Orbax checkpoints: one checkpoint holds state + data-iterator state + config, keeps N, restores
onto other meshes, survives kill -9 mid-write, and SIGTERM saves one and exits cleanly."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lego_jax.parallel import sharding
from lego_jax.train import checkpoint as ckpt_lib
from procs import kill_when

REPO = Path(__file__).resolve().parents[2]


def _state(mesh):
  """A train-state-like tree: FSDP x tensor-split weights, replicated bias and counters."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  b = rng.normal(size=(6,)).astype(np.float32)
  shardings = {"params": {"w": sharding.named_sharding(mesh, ("embed", "mlp"), w.shape),
                          "b": sharding.named_sharding(mesh, ("mlp",), b.shape)},
               "mu": {"w": sharding.named_sharding(mesh, ("embed", "mlp"), w.shape)},
               "step": NamedSharding(mesh, P())}
  values = {"params": {"w": w, "b": b}, "mu": {"w": 2 * w}, "step": np.int32(7)}
  return jax.device_put(values, shardings), shardings


def test_one_checkpoint_holds_state_data_config_and_keeps_n(tmp_path):
  mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
  state, shardings = _state(mesh)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ck", keep=2, async_save=True)
  data_state = json.dumps({"last_seen_indices": {"0": 41}}).encode()
  for step in range(1, 5):
    ckpt.save(step, state, data_state, {"name": "t", "lr": 0.5}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4]
  step, restored, data = ckpt.restore(ckpt_lib.abstract_like(state, shardings))
  assert step == 4 and data == data_state
  assert ckpt.read_config() == {"name": "t", "lr": 0.5}
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))
  ckpt.close()


@pytest.mark.parametrize("shape,count", [((1, 1, 1), 1), ((1, 2, 2), 4)])
def test_restore_onto_another_mesh(tmp_path, shape, count):
  eight = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
  state, _ = _state(eight)
  assert state["params"]["w"].sharding.spec == P("fsdp", "tensor")
  assert len(state["params"]["w"].addressable_shards) == 8
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ck")
  ckpt.save(3, state, None, {}, force=True)
  ckpt.close()

  mesh = sharding.make_mesh(shape, devices=jax.devices()[:count])
  _, target_shardings = _state(mesh)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ck")
  step, restored, data = ckpt.restore(ckpt_lib.abstract_like(state, target_shardings))
  ckpt.close()
  assert step == 3 and data is None
  for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
    original = dict(jax.tree_util.tree_leaves_with_path(state))[path]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original))
    assert leaf.sharding == dict(jax.tree_util.tree_leaves_with_path(target_shardings))[path]
    assert {d.id for d in leaf.sharding.device_set} == {d.id for d in jax.devices()[:count]}


# The child saves a small good checkpoint, then a big one, and is killed while writing it.
_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from lego_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], async_save=False)
    good = {"w": np.arange(1000, dtype=np.float32), "step": np.int32(1)}
    ckpt.save(1, jax.device_put(good), None, {"step": 1}, force=True)
    ckpt.wait()
    print("saved 1", flush=True)
    # ~200 MB in 400 arrays: long enough to be caught mid-write.
    big = {f"a{i}": np.full((128, 1024), i, np.float32) for i in range(400)}
    ckpt.save(2, jax.device_put(big), None, {"step": 2}, force=True)
    ckpt.wait()
    print("saved 2", flush=True)
""")


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def test_a_reader_leaves_a_running_trainings_unfinished_save_alone(tmp_path):
  """generate / serve / an export open the checkpoints of a run that may still be training: its
  in-flight save (an unfinished `<step>.orbax-checkpoint-tmp-<time>` directory) must survive
  them. A writer opening the directory removes it (its own leftovers from a killed run); a
  reader that did so once crashed a training mid-save."""
  d = tmp_path / "ldm"
  with ckpt_lib.Checkpointer(d) as ckpt:
    ckpt.save(1, {"w": jnp.ones(3)}, None, {}, force=True)
  in_flight = d / "2.orbax-checkpoint-tmp-1796340000000000"
  (in_flight / "state").mkdir(parents=True)
  for _ in range(2):
    with ckpt_lib.Checkpointer(d, reader=True) as ckpt:
      assert ckpt.latest_step() == 1
    assert in_flight.is_dir()
  with ckpt_lib.Checkpointer(d) as ckpt:
    assert ckpt.latest_step() == 1
  for _ in range(100):  # Orbax removes it in a background future
    if not in_flight.exists():
      break
    time.sleep(0.1)
  assert not in_flight.exists()
  assert not (tmp_path / "absent").exists()
  with ckpt_lib.Checkpointer(tmp_path / "absent", reader=True) as ckpt:
    assert ckpt.latest_step() is None
  assert not (tmp_path / "absent").exists()   # a reader creates nothing


def test_kill_9_during_a_save_keeps_the_last_good_checkpoint(tmp_path):
  directory = tmp_path / "ck"
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory)], env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert proc.stdout.readline().strip() == "saved 1"
  except BaseException:
    proc.kill()
    raise
  # Orbax writes step 2 into a temporary directory and renames it only when complete.
  kill_when(proc, lambda: any("tmp" in p.name for p in directory.iterdir()), 120, poll_s=0.005)
  leftovers = sorted(p.name for p in directory.iterdir())
  assert "2" not in leftovers and any("tmp" in n for n in leftovers), leftovers

  ckpt = ckpt_lib.Checkpointer(directory)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  target = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
  step, restored, _ = ckpt.restore(target)
  assert step == 1 and int(restored["step"]) == 1
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1000, dtype=np.float32))
  # Training goes on: the next save lands, the half-written one is gone.
  ckpt.save(2, restored, None, {}, force=True)
  ckpt.close()
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
  from helpers import synthetic_records

  return synthetic_records(tmp_path_factory.mktemp("sigterm_data"), 32, 8, 8)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
  grace = 30  # seconds: what GCE/TPU VMs give a preempted process
  workdir = tmp_path / "run"
  env = _env(1)
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  cmd = [sys.executable, "-m", "lego_jax", "train-vae", f"--workdir={workdir}",
         f"--config.data.records_dir={data / 'records'}", "--config.data.image_size=16",
         "--config.vae.block_out_channels=(8,)", "--config.vae.layers_per_block=1",
         "--config.vae.norm_groups=4", "--config.vae_train.batch_size=8",
         "--config.vae_train.num_steps=100000", "--config.vae_train.ckpt_every=100000",
         "--config.vae_train.log_every=1", "--config.data.num_workers=0"]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / "logs" / "vae" / "metrics.jsonl"
  try:
    deadline = time.monotonic() + 600
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=grace)
    took = time.monotonic() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, err[-3000:]
  assert took < grace
  assert "Traceback" not in err
  line = [l for l in err.splitlines() if "stopped by SIGTERM" in l]
  assert len(line) == 1, err[-3000:]
  step = int(line[0].split("after step ")[1].split(";")[0])
  assert step >= 2 and "Run the same command again to resume" in line[0]
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints" / "vae")
  assert ckpt.all_steps() == [step]  # written at the stop, not at ckpt_every
  assert ckpt.read_config()["vae_train"]["num_steps"] == 100000
  ckpt.close()
  # Nothing after training ran on the half-trained model.
  assert not (workdir / "vae_check.json").exists()
