"""The ArrayRecord schema every stage reads, and how to open a written split.

Records are written by the TFDS builder in data_prep/tfds_builder.py (file_format ARRAY_RECORD)
under RECORDS_DIR/lego/<kind>/<version>/, kind "pairs" (action-frame pairs, LDM and feature
extraction) or "instruct" (LLaVA instruction tuning). Reading needs only the written directory
(tfds.builder_from_directory), not the builder's code and not tensorflow.

Pair record (one per annotated action):
  id           str    "<clip_id>/<action_id>"
  input_jpeg   bytes  RGB JPEG of the input frame (image_0)
  target_jpeg  bytes  RGB JPEG of the action frame (image_1)
  action       str    normalised action prompt ("cut the carrot")
  raw_action   str    the annotation's text ("#C C cuts the carrot")
  description  str    enriched description (LEGO's "llava_forecast_finetune"; may be "")
  height,width int    original frame size (metadata JSON, else the decoded input frame)
  mask_png     bytes  8-bit PNG, 255 where the action changes pixels; b"" for real data
  meta         str    JSON dict (synthetic scene facts); "{}" for real data
Instruction record:
  id str, image_jpeg bytes, prompt str (human turn, with "<image>"), answer str (gpt turn)

The order of records in a split is the order of the annotation file (shuffling at write time is
off), so files written later by other stages (e.g. extracted VLLM features) align by index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

BUILDER_NAME = "lego"
VERSION = "1.0.0"
PAIRS = "pairs"
INSTRUCT = "instruct"
KINDS = (PAIRS, INSTRUCT)
SPLITS = ("train", "val", "test")

PAIR_STRINGS = ("id", "action", "raw_action", "description", "meta")
PAIR_BYTES = ("input_jpeg", "target_jpeg", "mask_png")
PAIR_INTS = ("height", "width")
INSTRUCT_STRINGS = ("id", "prompt", "answer")
INSTRUCT_BYTES = ("image_jpeg",)


class RecordFileError(Exception):
  """A record file that is damaged (truncated, overwritten): reported as one line, exit code 1."""


def check_files(paths, num_records=None, *, redo: str) -> None:
  """Opens each ArrayRecord file's footer and index (cheap: no record is read) so that a
  truncated or damaged file is named when a reader opens it, not as a Riegeli traceback minutes
  into a run. `num_records`: the count each file should hold; `redo` says how to rewrite it."""
  for i, path in enumerate(paths):
    path = str(path)
    try:
      reader = ArrayRecordReader(path, "readahead_buffer_size:0")
      try:
        got = reader.num_records()
      finally:
        reader.close()
    except (RuntimeError, OSError, ValueError) as e:
      reason = str(e).split(";")[0] if str(e) else type(e).__name__
      raise RecordFileError(f"{path}: damaged ArrayRecord file ({reason}): {redo}") from None
    if num_records is not None and got != num_records[i]:
      raise RecordFileError(f"{path}: holds {got} records where {num_records[i]} were written "
                            f"(truncated or replaced): {redo}")


def features(kind: str):
  """The tfds FeaturesDict of a record kind. Bytes are stored as-is (object Tensors): no
  tensorflow is needed to encode or decode them."""
  import tensorflow_datasets as tfds  # seconds to import: only writers and builders need it

  def blob():
    return tfds.features.Tensor(shape=(), dtype=np.object_)

  if kind == PAIRS:
    spec = {k: tfds.features.Text() for k in PAIR_STRINGS}
    spec.update({k: blob() for k in PAIR_BYTES})
    spec.update({k: tfds.features.Scalar(dtype=np.int32) for k in PAIR_INTS})
  elif kind == INSTRUCT:
    spec = {k: tfds.features.Text() for k in INSTRUCT_STRINGS}
    spec.update({k: blob() for k in INSTRUCT_BYTES})
  else:
    raise ValueError(f"unknown record kind {kind!r} (expected one of {KINDS})")
  return tfds.features.FeaturesDict(spec)


def dataset_dir(records_dir: str | Path, kind: str) -> Path:
  return Path(records_dir) / BUILDER_NAME / kind / VERSION


def is_complete(records_dir: str | Path, kind: str) -> bool:
  """TFDS renames its temporary directory into place only after every split was written."""
  return (dataset_dir(records_dir, kind) / "dataset_info.json").exists()


def _builder(records_dir: str | Path, kind: str):
  import tensorflow_datasets as tfds  # seconds to import: only writers and builders need it

  path = dataset_dir(records_dir, kind)
  if not is_complete(records_dir, kind):
    raise FileNotFoundError(
        f"no {kind} records in {path}: run `lego-jax prepare-data --workdir=...` first")
  return tfds.builder_from_directory(str(path))


def split_names(records_dir: str | Path, kind: str = PAIRS) -> list[str]:
  """The written splits, train/val/test first."""
  written = set(_builder(records_dir, kind).info.splits)
  return [s for s in SPLITS if s in written] + sorted(written - set(SPLITS))


def open_split(records_dir: str | Path, split: str, kind: str = PAIRS):
  """Random-access source of raw records (strings as bytes); picklable for Grain workers."""
  builder = _builder(records_dir, kind)
  if split not in builder.info.splits:
    raise FileNotFoundError(f"split {split!r} not in {dataset_dir(records_dir, kind)} "
                            f"(has {sorted(builder.info.splits)})")
  info = builder.info.splits[split]
  check_files(info.filepaths, info.shard_lengths,
              redo=f"delete {dataset_dir(records_dir, kind)} and run `lego-jax prepare-data` "
              "(or data_prep) again")
  return builder.as_data_source(split=split)


def build_metadata(records_dir: str | Path, kind: str = PAIRS) -> dict:
  """What the converter recorded: input fingerprint and bad-record counts per split."""
  return dict(_builder(records_dir, kind).info.metadata or {})


def to_python(record: dict) -> dict:
  """A raw record -> str for text fields, bytes for blobs, int for ints."""
  out = {}
  for k, v in record.items():
    if k in PAIR_STRINGS or k in INSTRUCT_STRINGS:
      out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    elif k in PAIR_INTS:
      out[k] = int(v)
    else:
      out[k] = v
  return out


def read_meta(record: dict) -> dict:
  meta = record.get("meta", "{}")
  return json.loads(meta.decode("utf-8") if isinstance(meta, bytes) else meta)
