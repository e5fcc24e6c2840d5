"""A damaged record file is named when a reader opens it (one line, exit 1 from the CLI), not a
Riegeli traceback when the pipeline first reaches it, minutes into training."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import lego_json, tfds_builder
from lego_jax.data import pipeline, records

tfds.display_progress_bar(False)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("rec")
  frames = root / "frames"
  frames.mkdir()
  buf = io.BytesIO()
  Image.new("RGB", (32, 24), (9, 200, 9)).save(buf, "JPEG")
  (frames / "a.jpg").write_bytes(buf.getvalue())
  ann = {"c": {str(i): {"image_0": "a.jpg", "image_1": "a.jpg", "action": "#C C cuts it"}
               for i in range(12)}}
  inp = tfds_builder.SplitInput(lego_json.pair_entries(ann, "a"),
                                lambda e: lego_json.load_pair(e, frames, {}, "ego4d"), "a")
  tfds_builder.convert(root / "rec", records.PAIRS, {"train": inp}, num_shards=3, workers=1,
                       max_bad_fraction=0.0, fingerprint={"test": 1})
  return root / "rec"


def _shard(records_dir, k):
  name = f"lego-train.array_record-0000{k}-of-00003"
  return records.dataset_dir(records_dir, records.PAIRS) / name


@pytest.mark.parametrize("keep", [70000, 0])
def test_truncated_shard_is_named_when_opened(written, tmp_path, keep):
  import shutil

  damaged = tmp_path / "rec"
  shutil.copytree(written, damaged)
  assert len(records.open_split(damaged, "train")) == 12   # intact: opens
  os.truncate(_shard(damaged, 1), keep)
  with pytest.raises(records.RecordFileError, match="lego-train.array_record-00001-of-00003: "
                     "damaged ArrayRecord file .*run `lego-jax prepare-data`"):
    records.open_split(damaged, "train")
  with pytest.raises(records.RecordFileError):   # the training pipeline opens it the same way
    pipeline.pair_loader(damaged, "train", batch_size=2, image_size=16, vllm_image_size=None,
                         shuffle=False, num_epochs=1)


def test_replaced_shard_and_damaged_feature_part(written, tmp_path):
  import shutil

  from array_record.python.array_record_module import ArrayRecordWriter

  damaged = tmp_path / "rec"
  shutil.copytree(written, damaged)
  writer = ArrayRecordWriter(str(_shard(damaged, 2)), "group_size:1")   # intact, but other data
  writer.write(b"x")
  writer.close()
  with pytest.raises(records.RecordFileError,
                     match="00002-of-00003: holds 1 records where 4 were written"):
    records.open_split(damaged, "train")
  # The feature / cache parts later stages write are checked the same way when opened.
  part = tmp_path / "part-00000.array_record"
  part.write_bytes(_shard(written, 0).read_bytes()[:5000])
  with pytest.raises(records.RecordFileError, match="part-00000.array_record: damaged"):
    records.check_files([part], redo="re-run `lego-jax extract`")


def test_show_data_says_one_line_and_exits_1(written, tmp_path):
  import shutil

  damaged = tmp_path / "rec"
  shutil.copytree(written, damaged)
  os.truncate(_shard(damaged, 2), 70000)
  run = subprocess.run(
      [sys.executable, "-m", "lego_jax", "show-data", f"--workdir={tmp_path / 'w'}",
       f"--config.data.records_dir={damaged}"], cwd=REPO, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 1, run.stderr[-2000:]
  last = run.stderr.strip().splitlines()
  assert last[-1].startswith("lego-jax show-data: error: ") and "00002-of-00003" in last[-1]
  assert "Traceback" not in run.stderr
