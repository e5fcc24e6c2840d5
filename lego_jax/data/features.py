"""The VLLM features LEGO's diffusion stage is conditioned on, stored as ArrayRecord.

Written by `lego-jax extract`, read by `lego-jax train-ldm` / `generate` through Grain, aligned BY
INDEX with the split's pair records (record i of features/<split> belongs to pair i).

Layout: WORKDIR/features/<split>/part-<k>.array_record, part k holding records
[k * part_size, (k + 1) * part_size) of the split in order, plus info.json (dims, dtype, part
size, number of records). A part is written to a temporary name and renamed when complete, so an
interrupted extraction resumes at the first missing part and never duplicates or drops a record.

One record (msgpack map):
  index int, id str, description str (the generated R), tokens list[int] (R's token ids),
  h_img bytes (N, D) and h_txt bytes (T, D) in `dtype` (float16 / bfloat16 / float32),
  n_img, n_txt, dim int, dtype str.
H_i is the projector output for the input frame; H_t row 0 is the last prompt position, then one
row per generated token (the release's generate(output_hidden_states=True) convention).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import grain
import ml_dtypes
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lego_jax.data import records

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def split_dir(features_dir: str | Path, split: str) -> Path:
  return Path(features_dir) / split


def part_path(features_dir: str | Path, split: str, part: int) -> Path:
  return split_dir(features_dir, split) / f"part-{part:05d}.array_record"


def encode(index: int, id_: str, description: str, tokens: Iterable[int], h_img: np.ndarray,
           h_txt: np.ndarray, dtype: str) -> bytes:
  np_dtype = DTYPES[dtype]
  h_img = np.asarray(h_img).astype(np_dtype)
  h_txt = np.asarray(h_txt).astype(np_dtype)
  return msgpack.packb({
      "index": int(index), "id": id_, "description": description,
      "tokens": [int(t) for t in tokens], "h_img": h_img.tobytes(), "h_txt": h_txt.tobytes(),
      "n_img": int(h_img.shape[0]), "n_txt": int(h_txt.shape[0]), "dim": int(h_img.shape[1]),
      "dtype": dtype}, use_bin_type=True)


def decode(blob: bytes) -> dict:
  r = msgpack.unpackb(blob, raw=False)
  dt = DTYPES[r["dtype"]]
  r["h_img"] = np.frombuffer(r["h_img"], dt).reshape(r["n_img"], r["dim"])
  r["h_txt"] = np.frombuffer(r["h_txt"], dt).reshape(r["n_txt"], r["dim"])
  return r


def write_part(features_dir: str | Path, split: str, part: int, blobs: Iterable[bytes]) -> Path:
  """Writes one complete part atomically (temporary file, then rename)."""
  final = part_path(features_dir, split, part)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.with_name(final.name + ".tmp")
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  for b in blobs:
    writer.write(b)
  writer.close()
  os.replace(tmp, final)
  return final


def write_info(features_dir: str | Path, split: str, info: Mapping) -> None:
  d = split_dir(features_dir, split)
  d.mkdir(parents=True, exist_ok=True)
  tmp = d / "info.json.tmp"
  tmp.write_text(json.dumps(dict(info), indent=2, sort_keys=True))
  os.replace(tmp, d / "info.json")


def read_info(features_dir: str | Path, split: str) -> dict:
  p = split_dir(features_dir, split) / "info.json"
  if not p.exists():
    raise FileNotFoundError(
        f"no extracted features for split {split!r} in {split_dir(features_dir, split)}: "
        "run `lego-jax extract` first")
  return json.loads(p.read_text())


def done_parts(features_dir: str | Path, split: str) -> set[int]:
  d = split_dir(features_dir, split)
  if not d.exists():
    return set()
  return {int(p.stem.split("-")[1]) for p in d.glob("part-*.array_record")}


def is_complete(features_dir: str | Path, split: str) -> bool:
  try:
    info = read_info(features_dir, split)
  except FileNotFoundError:
    return False
  return info.get("complete", False) and done_parts(features_dir, split) == set(range(info["num_parts"]))


def open_source(features_dir: str | Path, split: str) -> grain.sources.ArrayRecordDataSource:
  """A random-access source of encoded feature records, index-aligned with the split."""
  info = read_info(features_dir, split)
  if not is_complete(features_dir, split):
    raise FileNotFoundError(
        f"features of split {split!r} in {split_dir(features_dir, split)} are incomplete "
        f"({len(done_parts(features_dir, split))}/{info['num_parts']} parts): re-run "
        "`lego-jax extract` to finish them")
  paths = [str(part_path(features_dir, split, k)) for k in range(info["num_parts"])]
  records.check_files(paths, redo="delete it and re-run `lego-jax extract` to write it again")
  return grain.sources.ArrayRecordDataSource(paths)


class DecodeFeatures(grain.transforms.Map):
  """Zipped "features" bytes -> h_img (N, D), h_txt (text_len, D) zero-padded/truncated (as the
  release pads H_t to 77 rows), n_txt, and the generated description."""

  def __init__(self, text_len: int):
    self.text_len = text_len

  def map(self, ex: dict) -> dict:
    r = decode(ex.pop("features"))
    if r["index"] != ex["index"]:
      raise ValueError(f"feature record {r['index']} zipped with pair {ex['index']}: the "
                       "features were extracted from a different ordering of the split")
    h_txt = np.zeros((self.text_len, r["dim"]), np.float32)
    n = min(r["n_txt"], self.text_len)
    h_txt[:n] = r["h_txt"][:n]
    ex["h_img"] = r["h_img"].astype(np.float32)
    ex["h_txt"] = h_txt
    ex["n_txt"] = np.int32(r["n_txt"])
    ex["generated"] = r["description"]
    return ex
