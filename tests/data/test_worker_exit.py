"""Grain's worker processes end cleanly: a program that read batches with data.num_workers > 0
exits without multiprocessing's "There appear to be N leaked shared_memory objects" and without
a traceback, whether it closed its iterator, ran it to the end or still held it open at exit,
and when an evaluation's one ordered pass is closed after its first batch (the rest of the epoch
already in Grain's buffers: 14 blocks were reported leaked before pipeline._finish_unlinks).
The cases run in one fresh Python process, as the warning comes from the resource tracker at
its exit. (tests/train/test_resume.py checks the same of train-vae's own runs with 2 workers.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import synthetic_records

REPO = Path(__file__).resolve().parents[2]

PROGRAM = """
import sys
from lego_jax.data import pipeline

def read(records, how):
  if how.startswith("one pass"):  # an evaluation's loader: ordered, one epoch
    loader = pipeline.pair_loader(records, "train", batch_size=4, image_size=16,
                                  vllm_image_size=12, worker_count=2, shuffle=False,
                                  num_epochs=1, drop_remainder=False)
  else:
    loader = pipeline.pair_loader(records, "train", batch_size=4, image_size=16,
                                  vllm_image_size=12, worker_count=2, shuffle=True,
                                  hflip_prob=0.5, num_epochs=1 if how == "to the end" else None)
  it = iter(loader)
  if how == "to the end":
    return None, [b["index"].tolist() for b in it]
  # one pass: left after its first batch, the rest of the epoch already in Grain's buffers
  batches = [next(it) for _ in range(1 if how.startswith("one pass") else 3)]
  if how.endswith("closed"):
    it.close()
  elif how.endswith("with"):
    with it:
      pass
  return it, [b["index"].tolist() for b in batches]  # "held": the iterator open until exit

if __name__ == "__main__":  # the workers are spawned: they import this file
  KEEP = []
  for how in ("closed", "to the end", "held", "one pass, closed", "one pass, with"):
    KEEP.append(read(sys.argv[1], how))
    print(how, len(KEEP[-1][1]), "batches", flush=True)
"""


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
  root = synthetic_records(tmp_path_factory.mktemp("workers"), 16, 4, 4)
  (root / "read.py").write_text(PROGRAM)
  return root


def test_reading_with_workers_leaks_no_shared_memory(records):
  # One process for the three cases (each spawned worker imports the data stack: seconds).
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(records / "read.py"), str(records / "records")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ["closed 3 batches", "to the end 4 batches",
                                      "held 3 batches", "one pass, closed 1 batches",
                                      "one pass, with 1 batches"]
  assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, \
      proc.stderr[-3000:]
