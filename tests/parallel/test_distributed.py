"""Multi-host start-up decisions, the per-host data shards, and the CPU multi-process launcher."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lego_jax.parallel import distributed

REPO = Path(__file__).resolve().parents[2]
SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


def test_cluster_detection_from_the_environment():
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster(SLURM) == "slurm"
  assert distributed.detect_cluster(dict(SLURM, SLURM_NTASKS="1")) is None  # one task: no peers
  assert distributed.detect_cluster({"SLURM_JOB_ID": "77"}) is None          # sbatch, no srun
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}) == "tpu"
  assert distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "env"
  assert distributed.detect_cluster({"OMPI_MCA_orte_hnp_uri": "1;tcp://h:1",
                                     "OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"


def test_initialize_checks_the_flags_and_leaves_single_processes_alone(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
            "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("127.0.0.1:1234", None, 0)
  with pytest.raises(ValueError, match="not in"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  assert distributed.initialize() == "single process"
  assert distributed.initialize("127.0.0.1:1234", 1, 0) == "single process"
  assert not jax.distributed.is_initialized()


class _Shard:
  """A stand-in Grain DataLoader over one shard: rows are (shard, position) pairs."""

  def __init__(self, options, batch):
    self.options, self.batch = options, batch

  def __iter__(self):
    return _ShardIterator(self.options.shard_index, self.options.shard_count, self.batch)


class _ShardIterator:
  def __init__(self, index, count, batch):
    self.index, self.count, self.batch, self.pos = index, count, batch, 0

  def __next__(self):
    rows = np.arange(self.pos, self.pos + self.batch)
    self.pos += self.batch
    return {"x": np.stack([np.full_like(rows, self.index), rows], axis=1),
            "name": np.asarray([f"s{self.index}r{r}" for r in rows])}

  def get_state(self):
    return f'{{"pos": {self.pos}, "count": {self.count}}}'.encode()

  def set_state(self, state):
    import json

    s = json.loads(state)
    assert s["count"] == self.count
    self.pos = s["pos"]


def test_sharded_loader_puts_each_shard_in_its_rows_and_resumes_with_its_shard_count():
  # The per-shard transform doubles rows (like train-vae's input + target frames) BEFORE the
  # shards are joined, so every shard's rows stay together in the global batch.
  double = lambda b: {"x": np.concatenate([b["x"], b["x"] + 100]),
                      "name": np.concatenate([b["name"], b["name"]])}
  # As in train-vae, the factory reads half the shard's rows: `prepare` doubles them.
  half = lambda options, rows: _Shard(options, rows // 2)
  loader = distributed.ShardedLoader(half, global_batch=8, prepare=double, num_shards=2)
  it = iter(loader)
  first = next(it)
  np.testing.assert_array_equal(first["x"][:, 0], [0, 0, 100, 100, 1, 1, 101, 101])
  np.testing.assert_array_equal(first["x"][:, 1], [0, 1, 100, 101, 0, 1, 100, 101])
  assert list(first["name"][:2]) == ["s0r0", "s0r1"]
  state = it.get_state()
  assert state == {"num_shards": 2, "shards": {"0": {"pos": 2, "count": 2},
                                               "1": {"pos": 2, "count": 2}}}
  # A fresh loader of another default shard count adopts the checkpoint's.
  other = iter(distributed.ShardedLoader(half, global_batch=8, prepare=double, num_shards=4))
  other.set_state(state)
  np.testing.assert_array_equal(next(other)["x"][:, 1], [2, 3, 102, 103, 2, 3, 102, 103])
  with pytest.raises(ValueError, match="not divisible"):
    iter(distributed.ShardedLoader(_Shard, global_batch=6, num_shards=4))
  assert distributed.gather_data_states(state) == state  # one process: as it is
  assert distributed.this_process_data_state({"per_process": [b"a"]}) == b"a"
  with pytest.raises(ValueError, match="resume on as many processes"):
    distributed.this_process_data_state({"per_process": [b"a", b"b"]})


def test_data_shards_flag():
  distributed.set_data_shards(4)
  try:
    assert distributed.data_shards() == 4
    assert distributed.ShardedLoader(_Shard, 8).num_shards == 4
  finally:
    distributed.set_data_shards(None)
  assert distributed.data_shards() == jax.process_count()
  with pytest.raises(ValueError):
    distributed.set_data_shards(0)


def test_cpu_multiprocess_launcher_reports_a_failing_process():
  script = REPO / "launch" / "cpu_multiprocess.sh"
  usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
  assert usage.returncode == 2 and "NUM_PROCESSES" in usage.stdout
  env = dict(os.environ, NUM_PROCESSES="2", DEVICES_PER_PROCESS="1", PYTHON=sys.executable)
  bad = subprocess.run(["bash", str(script), "no-such-command"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=REPO)
  assert bad.returncode == 2
  assert "unknown command 'no-such-command'" in bad.stderr
