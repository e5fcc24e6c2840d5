"""Input-pipeline throughput: decode + resize + joint flip + batch of frame pairs, in pairs/s.

    python -m lego_jax.bench.data_pipeline [--workers=2 --batch_size=32 --batches=60
        --source_height=256 --source_width=341 --image_size=256 --clip_view=false]

Writes pair records once (synthetic scenes rendered at 256 and stored as JPEGs of the source
size: 256x341 is Ego4D's 4:3 at short side 256, so the LANCZOS squash to 256x256 is part of the
work), then times the training pipeline (shuffled, endless, hflip 0.5) with `--workers` Grain
worker processes after `--warmup` batches, and the same in one process for reference.

On a shared machine other processes take cores from the workers, so besides wall-clock pairs/s
it reports the CPU time the pipeline itself spent per pair (this process and its worker
processes, from /proc) and what that gives on `os.cpu_count()` free cores.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from absl import app, flags
from PIL import Image

from lego_jax.data import images, pipeline, records, synthetic

_WORKERS = flags.DEFINE_integer("workers", 2, "Grain worker processes")
_BATCH = flags.DEFINE_integer("batch_size", 32, "pairs per batch")
_BATCHES = flags.DEFINE_integer("batches", 60, "timed batches")
_WARMUP = flags.DEFINE_integer("warmup", 8, "untimed batches first (worker start-up)")
_RECORDS = flags.DEFINE_integer("num_records", 256, "distinct pairs written (epochs repeat)")
_SRC_H = flags.DEFINE_integer("source_height", 256, "stored frame height")
_SRC_W = flags.DEFINE_integer("source_width", 341, "stored frame width")
_SIZE = flags.DEFINE_integer("image_size", 256, "LDM view size")
_CLIP = flags.DEFINE_boolean("clip_view", False, "also compute the 224 CLIP view")
_DIR = flags.DEFINE_string("records_dir", "", "reuse/keep records here (default: a temp dir)")
_JSON = flags.DEFINE_string("json", "", "also write the results to this JSON file")
_SKIP_LOCAL = flags.DEFINE_boolean("skip_in_process", False, "skip the 0-worker reference")


def write_records(records_dir: Path, num: int, height: int, width: int) -> None:
  from data_prep import tfds_builder  # imports tensorflow_datasets: seconds, only when writing

  if records.is_complete(records_dir, records.PAIRS):
    return
  examples = [ex for _, _, ex in synthetic.generate_split("train", num, 0, 256)]

  def load(i: int) -> dict:
    ex = examples[i]
    enc = lambda a: images.encode_jpeg(
        Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC))
    return dict(id=f"bench/{i}", input_jpeg=enc(ex.input), target_jpeg=enc(ex.target),
                action=ex.action, raw_action=ex.raw_action, description=ex.description,
                height=height, width=width, mask_png=images.encode_png(ex.mask),
                meta=json.dumps(ex.meta))

  tfds_builder.convert(records_dir, records.PAIRS, {"train": tfds_builder.SplitInput(
      list(range(num)), load, "synthetic")}, num_shards=4, workers=2, max_bad_fraction=0.0,
                       fingerprint={"bench": [num, height, width]})


def _cpu_seconds() -> float:
  """CPU time of this process and its live children (Grain workers), Linux /proc."""
  total = time.process_time()
  tick = os.sysconf("SC_CLK_TCK")
  for child in multiprocessing.active_children():
    try:
      fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    except (OSError, IndexError, ValueError):
      return float("nan")
  return total


def measure(records_dir: Path, workers: int) -> dict:
  loader = pipeline.pair_loader(
      records_dir, "train", batch_size=_BATCH.value, image_size=_SIZE.value,
      vllm_image_size=224 if _CLIP.value else None, hflip_prob=0.5, seed=0, shuffle=True,
      num_epochs=None, worker_count=workers)
  it = iter(loader)
  start = time.perf_counter()
  for _ in range(_WARMUP.value):
    batch = next(it)
  warm = time.perf_counter()
  load_before = os.getloadavg()[0]
  cpu_before = _cpu_seconds()
  for _ in range(_BATCHES.value):
    batch = next(it)
  end = time.perf_counter()
  cpu = _cpu_seconds() - cpu_before
  shape = tuple(batch["input"].shape)
  del batch, it  # release Grain's shared-memory batches while the workers still run
  gc.collect()
  pairs = _BATCHES.value * _BATCH.value
  cpu_ms = 1000 * cpu / pairs
  return {"workers": workers, "pairs_per_s": pairs / (end - warm), "startup_s": warm - start,
          "timed_pairs": pairs, "batch_shape": shape, "cpu_ms_per_pair": cpu_ms,
          "pairs_per_s_on_free_cores": min(max(workers, 1), os.cpu_count()) * 1000 / cpu_ms,
          "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main(_):
  records_dir = Path(_DIR.value) if _DIR.value else Path(tempfile.mkdtemp(prefix="lego_bench_"))
  t = time.perf_counter()
  write_records(records_dir, _RECORDS.value, _SRC_H.value, _SRC_W.value)
  print(f"records: {records_dir} ({_RECORDS.value} pairs of {_SRC_H.value}x{_SRC_W.value} JPEG, "
        f"{time.perf_counter() - t:.1f} s)")
  print(f"cpus: {os.cpu_count()}, load average now: {os.getloadavg()}")
  results = []
  runs = [_WORKERS.value] + ([] if _SKIP_LOCAL.value or _WORKERS.value == 0 else [0])
  for workers in runs:
    r = measure(records_dir, workers)
    results.append(r)
    print(f"workers={workers}: {r['pairs_per_s']:.1f} pairs/s  (decode+resize to "
          f"{_SIZE.value}+flip+batch{' +clip224' if _CLIP.value else ''}; batch {r['batch_shape']};"
          f" start-up {r['startup_s']:.1f} s; load avg {r['load_avg_1min']})")
    print(f"           {r['cpu_ms_per_pair']:.2f} CPU ms per pair -> "
          f"{r['pairs_per_s_on_free_cores']:.0f} pairs/s with {max(workers, 1)} free core(s)")
  if _JSON.value:
    Path(_JSON.value).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # Grain's worker processes re-import this module
  app.run(main)
