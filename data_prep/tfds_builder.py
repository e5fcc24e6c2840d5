"""One TFDS builder writes both record kinds as ArrayRecord, without tensorflow.

`convert(records_dir, kind, splits, ...)` is the entry point: it validates and encodes the
records of every split in parallel threads (PIL decodes and encodes outside the GIL), counts and
skips bad records, fails when a split has more than `max_bad_fraction` of them, and lets TFDS
write ArrayRecord shards into a temporary directory that is renamed into place only after every
split is written: a conversion that stops half-way never leaves output that looks complete.
Reading back needs only the directory: `tfds.builder_from_directory(...).as_data_source()` or,
with this module imported, `tfds.data_source("lego/pairs", data_dir=records_dir)`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
# TFDS asks for one shard count for all splits; a 32-example val split must not get 64 shards.
from tensorflow_datasets.core.utils import shard_utils

from data_prep.lego_json import ConversionError, ConversionSettingsError, RecordError
from lego_jax.data import records

MAX_LISTED_BAD = 20


@dataclasses.dataclass(frozen=True)
class SplitInput:
  """The records of one split: `load(entry)` returns a record dict or raises RecordError."""
  entries: Sequence[Any]
  load: Callable[[Any], dict]
  source: str  # what the entries came from, for messages


@dataclasses.dataclass(frozen=True)
class ConvertResult:
  path: Path
  skipped: bool                 # complete output from the same inputs was already there
  num_records: dict[str, int]   # written per split
  bad: dict[str, list[str]]     # messages of the skipped records per split (first few)
  num_bad: dict[str, int]


@dataclasses.dataclass(frozen=True)
class _ShardsAtMostRecords(shard_utils.ShardConfig):
  def get_number_shards(self, total_size: int, num_examples: int,
                        uses_precise_sharding: bool = True) -> int:
    return max(1, min(self.num_shards or 1, num_examples))


@dataclasses.dataclass(eq=False)
class _DownloadConfig(tfds.download.DownloadConfig):
  def get_shard_config(self) -> shard_utils.ShardConfig:
    return _ShardsAtMostRecords(num_shards=self.num_shards)


def _ordered_parallel(fn: Callable, items: Sequence, workers: int) -> Iterator:
  """fn over items in order, `workers` threads, a bounded window of pending results (a large
  dataset must not be held in memory while the writer catches up). Exceptions are returned."""
  def call(item):
    try:
      return fn(item)
    except RecordError as e:
      return e

  if workers <= 1:
    yield from map(call, items)
    return
  window = collections.deque()
  with ThreadPoolExecutor(workers) as pool:
    for item in items:
      window.append(pool.submit(call, item))
      if len(window) >= 8 * workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


class Lego(tfds.core.GeneratorBasedBuilder):
  """Records of the LEGO task. Configs: "pairs" (action-frame pairs), "instruct" (LLaVA)."""

  VERSION = tfds.core.Version(records.VERSION)
  RELEASE_NOTES = {records.VERSION: "Pair and instruction records (see lego_jax/data/records.py)."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=records.PAIRS, description="input/target frame pairs"),
      tfds.core.BuilderConfig(name=records.INSTRUCT, description="LLaVA instruction records"),
  ]

  # TFDS looks for the builder's source through `importlib_resources` (not installed; only needed
  # for zipapps) whenever the class lives in a package; the file path is all it needs.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, splits: dict[str, SplitInput] | None = None, workers: int = 1,
               max_bad_fraction: float = 0.0, fingerprint: dict | None = None, **kwargs):
    self._inputs = splits or {}
    self._workers = workers
    self._max_bad_fraction = max_bad_fraction
    self._fingerprint = fingerprint or {}
    self.num_bad: dict[str, int] = {}
    self.bad: dict[str, list[str]] = {}
    self.num_written: dict[str, int] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=records.features(self.builder_config.name),
        description=__doc__, disable_shuffling=True, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    for split, inp in self._inputs.items():
      if not inp.entries:
        raise ConversionError(f"split {split!r} is empty: {inp.source} has no records")
    return {split: self._generate_examples(split) for split in self._inputs}

  def _generate_examples(self, split: str):
    inp = self._inputs[split]
    n = len(inp.entries)
    allowed = math.floor(self._max_bad_fraction * n)
    bad: list[str] = []
    seen: set[str] = set()
    written = 0
    for i, result in enumerate(_ordered_parallel(inp.load, inp.entries, self._workers)):
      if not isinstance(result, RecordError) and result["id"] in seen:
        result = RecordError(f"{result['id']}: duplicate id (record {i} of {inp.source})")
      if isinstance(result, RecordError):
        bad.append(str(result))
        logging.warning("skipping bad record in %s split: %s", split, result)
        if len(bad) > allowed:
          listed = "\n  ".join(bad[:MAX_LISTED_BAD])
          raise ConversionError(
              f"split {split!r} ({inp.source}): {len(bad)} of {n} records are bad, more than "
              f"max_bad_fraction={self._max_bad_fraction} allows ({allowed}); nothing was "
              f"written. Bad records:\n  {listed}")
        continue
      seen.add(result["id"])
      written += 1
      yield i, result
    if written == 0:
      raise ConversionError(f"split {split!r} ({inp.source}) has no usable records")
    self.num_bad[split], self.bad[split], self.num_written[split] = len(bad), bad, written
    self.info.metadata["fingerprint"] = self._fingerprint
    self.info.metadata.setdefault("num_bad", {})[split] = len(bad)
    self.info.metadata.setdefault("bad", {})[split] = bad[:MAX_LISTED_BAD]


def _differences(old: dict, new: dict) -> list[str]:
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def convert(records_dir: str | Path, kind: str, splits: dict[str, SplitInput], *,
            num_shards: int, workers: int, max_bad_fraction: float,
            fingerprint: dict) -> ConvertResult:
  """Writes RECORDS_DIR/lego/<kind>/<version>/ (see module doc). Idempotent: complete output
  written from the same inputs (same `fingerprint`) is kept; from other inputs, an error."""
  records_dir = Path(records_dir)
  path = records.dataset_dir(records_dir, kind)
  if records.is_complete(records_dir, kind):
    meta = records.build_metadata(records_dir, kind)
    old = meta.get("fingerprint", {})
    if old != fingerprint:
      raise ConversionSettingsError(
          f"{path} holds {kind} records written from other inputs (differing: "
          f"{', '.join(_differences(old, fingerprint))}); delete it or choose another workdir")
    info = tfds.builder_from_directory(str(path)).info
    return ConvertResult(path, True, {s: info.splits[s].num_examples for s in info.splits},
                         dict(meta.get("bad", {})), dict(meta.get("num_bad", {})))
  if not 0.0 <= max_bad_fraction <= 1.0:
    raise ConversionSettingsError(f"max_bad_fraction={max_bad_fraction} is not in [0, 1]")
  if num_shards < 1:
    raise ConversionSettingsError(f"num_shards={num_shards} must be at least 1")

  builder = Lego(splits=splits, workers=workers, max_bad_fraction=max_bad_fraction,
                 fingerprint=fingerprint, config=kind, data_dir=str(records_dir),
                 file_format="array_record")
  # TFDS creates download folders even when nothing is downloaded; keep them out of records_dir.
  scratch = Path(tempfile.mkdtemp(prefix="lego_tfds_"))
  try:
    builder.download_and_prepare(
        download_dir=str(scratch),
        download_config=_DownloadConfig(num_shards=num_shards))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return ConvertResult(path, False, dict(builder.num_written), dict(builder.bad),
                       dict(builder.num_bad))
