"""Faults: `kill -9` at a random step of train-vae, train-vllm or train-ldm, then the same command
again, ends bitwise equal (CPU) to an uninterrupted run, having seen the same batches; a non-finite
loss stops training with a clear message and keeps the last good checkpoint, or is skipped and
counted with `skip_nonfinite`.

Every run is the real `lego-jax` command in a subprocess on one CPU device, sharing one JAX
compilation cache so only the first run of a model pays its compile."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import synthetic_records
from lego_jax import config as config_lib
from lego_jax.parallel import distributed
from procs import SMALL_LDM, SMALL_VAE, SMALL_VLLM, kill_when

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600
VAE = SMALL_VAE
VLLM = SMALL_VLLM
LDM = SMALL_LDM + ["--config.ldm_train.batch_size=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
  """Synthetic records + tokenizer, written once by the real prepare-data code."""
  return synthetic_records(tmp_path_factory.mktemp("resume_data"), 32, 8, 8)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  e = dict(os.environ)
  # The programs are run, never benchmarked: LLVM's optimisations only cost compile time.
  e["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
                    " --xla_llvm_disable_expensive_passes=true")
  e.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3",
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return e


def _command(stage: str, workdir: Path, data: Path, args) -> list[str]:
  return [sys.executable, "-m", "lego_jax", stage, f"--workdir={workdir}",
          f"--config.data.records_dir={data / 'records'}",
          f"--config.data.tokenizer_dir={data / 'tokenizer'}", *args]


def _run(cmd, env) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)


def _steps(directory: Path) -> list[int]:
  # Finished checkpoints only: Orbax renames a step's directory to its number when complete.
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
      if directory.exists() else []


def restore_on_one_device(path: Path):
  """A saved train state as single-device arrays, whatever mesh and processes wrote it."""
  ckptr = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ckptr.metadata(path).item_metadata)
  return ckptr.restore(path, target)


def _state(workdir: Path, name: str, step: int | None = None) -> dict:
  directory = workdir / "checkpoints" / name
  step = _steps(directory)[-1] if step is None else step
  restored = restore_on_one_device(directory / str(step) / "state")
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(restored)}


def _losses(workdir: Path, name: str) -> dict[int, list[float]]:
  out: dict[int, list[float]] = {}
  for line in (workdir / "logs" / name / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    out.setdefault(row["step"], []).append(row["loss"])
  return out


def _kill_and_resume(cmd_of, name: str, num_steps: int, env, tmp_path: Path, prepare_dir=None):
  """Reference run, a run killed with SIGKILL after a random checkpoint, the same command again."""
  ref, run = tmp_path / "reference", tmp_path / "killed"
  for w in (ref, run):
    w.mkdir()
    if prepare_dir:
      prepare_dir(w)
  done = _run(cmd_of(ref), env)
  assert done.returncode == 0, done.stderr[-3000:]
  # With data workers (the VAE's runs) nothing is left to the resource tracker at exit.
  assert "leaked shared_memory" not in done.stderr, done.stderr[-3000:]

  kill_after = int(np.random.default_rng().integers(1, num_steps - 1))
  proc = subprocess.Popen(cmd_of(run), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  kill_when(proc, lambda: any(s >= kill_after for s in _steps(run / "checkpoints" / name)),
            TIMEOUT)
  assert proc.returncode == -signal.SIGKILL
  killed_at = _steps(run / "checkpoints" / name)[-1]
  assert killed_at < num_steps, f"the run had finished before the kill (after {kill_after})"

  again = _run(cmd_of(run), env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "leaked shared_memory" not in again.stderr, again.stderr[-3000:]
  final_ref, final_run = _state(ref, name), _state(run, name)
  assert int(final_run["['step']"]) == int(final_ref["['step']"])
  for key, value in final_ref.items():
    np.testing.assert_array_equal(final_run[key], value, err_msg=f"{key} (killed after "
                                  f"checkpoint {killed_at})")
  # The same batches in the same order: every step's loss, before and after the kill and in
  # the steps redone after it, equals the uninterrupted run's, bit for bit; and the log holds
  # one history: each step once (the killed run's steps after its checkpoint were cut).
  ref_losses, run_losses = _losses(ref, name), _losses(run, name)
  assert sorted(ref_losses) == list(range(1, num_steps + 1))
  assert sorted(run_losses) == sorted(ref_losses)
  for step, losses in run_losses.items():
    assert losses == ref_losses[step], (step, losses, ref_losses[step])
  return killed_at


def test_vae_kill_9_then_resume_is_bitwise_equal(data, env, tmp_path):
  n = 6
  args = VAE + [f"--config.vae_train.num_steps={n}", "--config.vae_train.ckpt_every=1",
                "--config.data.num_workers=2"]
  _kill_and_resume(lambda w: _command("train-vae", w, data, args), "vae", n, env, tmp_path)


def test_nonfinite_loss_stops_with_the_last_good_checkpoint_or_is_skipped(data, env, tmp_path):
  # lr=1e30: step 1 is finite but throws the weights to ~1e30, so step 2's loss overflows.
  args = VAE + ["--config.vae_train.num_steps=4", "--config.vae_train.ckpt_every=1",
                "--config.vae_train.lr=1e30", "--config.data.num_workers=0"]
  stopped = _run(_command("train-vae", tmp_path / "stop", data, args), env)
  assert stopped.returncode == 1, stopped.stderr[-3000:]
  assert "non-finite loss or gradient at or before step 2" in stopped.stderr
  assert "Traceback" not in stopped.stderr
  assert _steps(tmp_path / "stop" / "checkpoints" / "vae") == [1]
  good = _state(tmp_path / "stop", "vae")
  assert int(good["['nonfinite']"]) == 0
  assert all(np.isfinite(v).all() for k, v in good.items() if "trained" in k)

  skipped = _run(_command("train-vae", tmp_path / "skip", data,
                          args + ["--config.vae_train.skip_nonfinite=true"]), env)
  assert skipped.returncode == 0, skipped.stderr[-3000:]
  final = _state(tmp_path / "skip", "vae")
  # Steps 2-4 were all rejected (the weights never came back): counted, parameters unchanged.
  assert int(final["['nonfinite']"]) == 3
  logged = json.loads((tmp_path / "skip" / "logs" / "vae" / "metrics.jsonl").read_text()
                      .splitlines()[-1])
  assert logged["nonfinite_steps"] == 3
  for key, value in good.items():
    if "trained" in key:
      np.testing.assert_array_equal(final[key], value, err_msg=key)


@pytest.mark.parametrize("workers", [0, 2])
def test_data_iterators_resume_exactly(data, workers):
  """The host's data stream: restarting from a saved state (through its JSON form, as in the
  checkpoint) continues with exactly the records an uninterrupted stream gives."""
  from lego_jax.data import pipeline

  cfg = config_lib.load("tiny", [f"data.records_dir={data / 'records'}", "data.image_size=16",
                                 f"data.num_workers={workers}"])

  def loader():
    return distributed.ShardedLoader(
        lambda shard, n: pipeline.train_pairs(cfg, data, n, views=("ldm",), shard_options=shard),
        global_batch=4, num_shards=2)

  straight = iter(loader())
  expected = [next(straight)["index"].tolist() for _ in range(12)]
  first = iter(loader())
  seen = [next(first)["index"].tolist() for _ in range(5)]
  saved = json.loads(json.dumps(first.get_state()))
  assert saved["num_shards"] == 2 and sorted(saved["shards"]) == ["0", "1"]
  resumed = iter(loader())
  resumed.set_state(saved)
  seen += [next(resumed)["index"].tolist() for _ in range(7)]
  assert seen == expected
  # 12 batches of 2 x 2 rows run past the 16 records of each shard: epochs roll over too.
  assert len({i for b in expected for i in b}) == 32


def test_a_loader_state_of_one_shard_per_host_resumes_as_that_hosts_shard(data):
  """Checkpoints of train-vllm / train-ldm from before they read data shards hold one plain
  DataLoader state per host: a sharded loader resumes it in the same order."""
  from lego_jax.data import pipeline

  cfg = config_lib.load("tiny", [f"data.records_dir={data / 'records'}", "data.image_size=16",
                                 "data.num_workers=0"])

  def make(shard=None, n=4):
    return pipeline.train_pairs(cfg, data, n, views=("ldm",), shard_options=shard)

  straight = iter(make())
  expected = [next(straight)["index"].tolist() for _ in range(6)]
  old = iter(make())
  seen = [next(old)["index"].tolist() for _ in range(2)]
  saved = distributed.from_jsonable(json.loads(json.dumps(distributed.to_jsonable(
      old.get_state()))))
  resumed = iter(distributed.ShardedLoader(make, global_batch=4))
  resumed.set_state(saved)
  seen += [next(resumed)["index"].tolist() for _ in range(4)]
  assert seen == expected
  assert resumed.get_state()["num_shards"] == 1


def test_vllm_kill_9_then_resume_is_bitwise_equal(data, env, tmp_path):
  n = 6
  args = [f"--config.vllm_train.num_steps={n}", "--config.vllm_train.ckpt_every=1",
          "--config.vllm_train.log_every=1", "--config.vllm_train.batch_size=4",
          "--config.vllm_train.grad_accum=1", "--config.data.num_workers=2", *VLLM]
  _kill_and_resume(lambda w: _command("train-vllm", w, data, args), "vllm", n, env, tmp_path)


@pytest.fixture(scope="module")
def ldm_inputs(data, env, tmp_path_factory) -> Path:
  """What train-ldm reads from its workdir (a VAE checkpoint, the VLLM's features of every
  split), made once by the real commands at their cheapest: one VAE step (the same compiled step
  as the VAE test's), the VLLM's random initialisation, 4-token descriptions."""
  root = tmp_path_factory.mktemp("ldm_inputs")
  for stage, args in (("train-vae", VAE + ["--config.vae_train.num_steps=1"]),
                      ("train-vllm", VLLM + ["--config.vllm_train.num_steps=0"]),
                      ("extract", VLLM + ["--config.vllm_generate.max_new_tokens=4"])):
    done = _run(_command(stage, root, data, args), env)
    assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
  return root


def test_ldm_kill_9_then_resume_is_bitwise_equal(data, env, ldm_inputs, tmp_path):
  n = 5  # killed after checkpoint 1, 2 or 3: every step costs a checkpoint write here
  args = VAE + LDM + [f"--config.ldm_train.num_steps={n}", "--config.ldm_train.ckpt_every=1",
                      "--config.data.num_workers=2"]

  def prepare_dir(workdir: Path) -> None:
    shutil.copytree(ldm_inputs / "checkpoints" / "vae", workdir / "checkpoints" / "vae")
    shutil.copytree(ldm_inputs / "features", workdir / "features")

  _kill_and_resume(lambda w: _command("train-ldm", w, data, args), "ldm", n, env, tmp_path,
                   prepare_dir=prepare_dir)
  # What was compared bit for bit: the UNet and conditioner, their Adam moments and EMA.
  compared = {k.split("]")[0] + "]" for k in _state(tmp_path / "reference", "ldm")}
  assert {"['trained']", "['opt_state']", "['ema']", "['frozen']"} <= compared


def _descendants(pid: int) -> set[int]:
  children: dict[int, list[int]] = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  out, todo = set(), [pid]
  while todo:
    for c in children.get(todo.pop(), []):
      out.add(c)
      todo.append(c)
  return out


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


def test_kill_9_leaves_no_data_workers_or_resource_tracker(data, env, tmp_path):
  """Grain's worker processes and multiprocessing's resource tracker end with their parent."""
  cmd = _command("train-vae", tmp_path, data, VAE + [
      "--config.data.num_workers=2", "--config.vae_train.num_steps=1000",
      "--config.vae_train.ckpt_every=1"])
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  seen: set[int] = set()

  def training_with_workers() -> bool:  # 2 workers and the resource tracker
    seen.update(_descendants(proc.pid))
    return len(seen) >= 3

  kill_when(proc, training_with_workers, TIMEOUT, poll_s=0.2)
  assert proc.returncode == -signal.SIGKILL
  deadline = time.monotonic() + 30
  while any(_alive(p) for p in seen) and time.monotonic() < deadline:
    time.sleep(0.2)
  left = [p for p in seen if _alive(p)]
  for p in left:
    os.kill(p, signal.SIGKILL)
  assert not left, f"{len(left)} of the {len(seen)} child processes outlived their parent by 30 s"
