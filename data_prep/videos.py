"""Raw Ego4D FHO / EPIC-KITCHENS-100 videos + annotations -> LEGO pair records (ArrayRecord).

    python -m data_prep.videos --source=ego4d --annotations=train:fho_main.json \\
        --ids=train:train_clips.txt --videos_dir=ego4d/v1/full_scale --out=/data/lego_ego4d
    python -m data_prep.videos --source=epic \\
        --annotations=train:EPIC_100_train.csv,test:EPIC_100_validation.csv \\
        --videos_dir=EPIC-KITCHENS --out=/data/lego_epic [--lego_dir=/data/lego_epic/release]

Flags (absl): --source ego4d|epic; --annotations SPLIT:PATH[,SPLIT:PATH...] (a bare PATH is the
train split); --videos_dir, searched recursively for <video id>.mp4/.MP4/.mkv/...; --out.
Optional: --ids SPLIT:FILE (keep only these clip/video ids in that split: one per line, a JSON
list, or an Ego4D benchmark JSON with "clips"[].clip_uid), --descriptions JSON keyed like the
LEGO annotation JSON ({clip_id: {action_id: {"llava_forecast_finetune": text}}}; else empty),
--lego_dir (also write the LEGO release layout: <split>.json, metadata.json, frames/),
--records_dir (default OUT/records), --workers (default: all cores), --num_shards,
--short_side 256, --jpeg_quality 95, --min_similarity / --max_similarity (filters, off by
default), --ego4d_videos full_scale|clips, --ego4d_input pre_frame, --ego4d_target pnr_frame,
--epic_positions frames|timestamps, --epic_input_offset_sec 0, --epic_target_fraction 0.5.
The dataset-specific rules are documented in data_prep/ego4d_fho.py and epic_kitchens.py.

How it runs. Pairs are grouped by video; a process pool handles one video per task (seek-based
decoding, data_prep/video_frames.py; frames resized to short side 256 and JPEG-encoded) and
writes OUT/work/<split>/<video>.array_record plus a done marker <video>.json, each to a
temporary name renamed into place, marker last. A re-run skips every video whose marker matches
(same pairs, options and video file size/mtime), so an interrupted run resumes where it stopped
and a finished one is not redone; a video is never half-written and never written twice. Then
the per-video files are merged, in sorted order, into the TFDS ArrayRecord dataset every stage
reads (RECORDS_DIR/lego/pairs/1.0.0, schema in lego_jax/data/records.py; plus "instruct"
records for the pairs with a description), through the same writer as `lego-jax prepare-data`.
Point the pipeline at it with --config.data.records_dir=RECORDS_DIR.

Every annotated pair ends in exactly one outcome, counted per split in OUT/report.json and on
stdout: written, video_missing (no file: retried on the next run), video_unreadable,
frame_before_start, frame_past_end (the annotation points past the video's end, or the file is
truncated), frame_not_found, decode_error, near_duplicate / unrelated (the similarity band
filter: input and target thumbnails, 32x32 gray, correlate above --max_similarity or below
--min_similarity), worker_error. Annotations rejected while reading are listed as "skipped".
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
WORK_FORMAT = 2  # bump when the per-video work files change meaning: old ones are redone
# 2: frame 0 is the first decoded frame (was the stream start_time: AVI + B-frames one late).
OUTCOMES = ("written", "video_missing", "video_unreadable", "frame_before_start",
            "frame_past_end", "frame_not_found", "decode_error", "near_duplicate", "unrelated",
            "worker_error")
_MISSING_OUTCOME = {"before_start": "frame_before_start", "past_end": "frame_past_end",
                    "not_found": "frame_not_found"}
BLOB_FIELDS = ("input_jpeg", "target_jpeg", "mask_png")
DESCRIPTION_KEY = "llava_forecast_finetune"


class UsageError(ValueError):
  """A wrong flag or input file: reported as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
  """What decides the extracted records (all part of the resume fingerprint but `workers`-like
  speed knobs: decoder_threads, skip_nonref)."""
  short_side: int = 256
  jpeg_quality: int = 95
  min_similarity: float | None = None   # below: "unrelated"
  max_similarity: float | None = None   # above: "near_duplicate"
  frame_tolerance: int = 2
  decoder_threads: int = 1
  skip_nonref: bool = True

  def fingerprint(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("decoder_threads")
    d.pop("skip_nonref")
    return d


@dataclasses.dataclass(frozen=True)
class VideoJob:
  split: str
  video_key: str            # file-system safe video id: names the work files
  video_path: str | None    # None: not found under videos_dir
  pairs: tuple             # PairSpec, sorted by id


# ---------------------------------------------------------------------------------------------
# The work format: one ArrayRecord file per video, one record per pair.
# A record is a little-endian u32 header length, a JSON header with the text and int fields and
# the blob lengths, then the blobs. Private to this module (the final records are TFDS's).

def encode_work_record(record: dict) -> bytes:
  header = {k: v for k, v in record.items() if k not in BLOB_FIELDS}
  header["_blobs"] = [[k, len(record[k])] for k in BLOB_FIELDS]
  head = json.dumps(header, sort_keys=True).encode("utf-8")
  return struct.pack("<I", len(head)) + head + b"".join(record[k] for k in BLOB_FIELDS)


def decode_work_record(data: bytes) -> dict:
  (n,) = struct.unpack_from("<I", data, 0)
  header = json.loads(data[4:4 + n].decode("utf-8"))
  out, pos = {}, 4 + n
  for key, size in header.pop("_blobs"):
    out[key] = data[pos:pos + size]
    pos += size
  out.update(header)
  return out


def _write_atomic(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _write_array_record(path: Path, records: Sequence[bytes]) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter

  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  os.replace(tmp, path)


def read_work_file(path: str | Path) -> list[dict]:
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(str(path))
  try:
    return [decode_work_record(r) for r in reader.read_all()]
  finally:
    reader.close()


# ---------------------------------------------------------------------------------------------
# The worker: one video.

def _video_stat(path: str | None) -> dict | None:
  if path is None:
    return None
  st = os.stat(path)
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def job_fingerprint(job: VideoJob, opts: ExtractOptions, lego: bool) -> str:
  desc = {"format": WORK_FORMAT, "options": opts.fingerprint(), "lego": lego,
          "video": _video_stat(job.video_path),
          "pairs": [dataclasses.asdict(p) for p in job.pairs]}
  return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _frame_name(clip_id: str, action_id: str, index: int) -> str:
  return f"{clip_id}/{action_id}/{index:010d}.jpg"


def process_video(job: VideoJob, opts: ExtractOptions, work_dir: str,
                  lego_dir: str | None) -> dict:
  """Extracts one video's pairs; writes its work file and marker; returns the marker.

  Runs in a pool worker: never raises (an unexpected error becomes the "worker_error" outcome
  of its pairs, and no marker, so the next run retries the video).
  """
  start, cpu_start = time.perf_counter(), time.process_time()
  work = Path(work_dir) / job.split
  marker = {"video_key": job.video_key, "split": job.split, "video_path": job.video_path,
            "fingerprint": job_fingerprint(job, opts, lego_dir is not None),
            "outcomes": {}, "shard": None, "error": None, "lego": {}, "metadata": {},
            "decoded_frames": 0, "seeks": 0, "inexact_frames": 0, "extracted_frames": 0}
  try:
    _extract(job, opts, work, lego_dir, marker)
  except Exception as e:  # noqa: BLE001  (a bug or an exotic file must not stop the pool)
    marker.update(outcomes={"worker_error": len(job.pairs)}, shard=None,
                  error=f"{type(e).__name__}: {e}", lego={}, metadata={})
    marker["wall_sec"] = time.perf_counter() - start
    marker["cpu_sec"] = time.process_time() - cpu_start
    return marker
  marker["wall_sec"] = time.perf_counter() - start
  marker["cpu_sec"] = time.process_time() - cpu_start
  if job.video_path is not None:
    _write_atomic(work / f"{job.video_key}.json", json.dumps(marker, sort_keys=True).encode())
  return marker


def _extract(job: VideoJob, opts: ExtractOptions, work: Path, lego_dir: str | None,
             marker: dict) -> None:
  import av

  from data_prep.video_frames import (VideoOpenError, VideoReader, encode_jpeg, resized_size,
                                      similarity, thumbnail)

  outcomes: collections.Counter = collections.Counter()
  if job.video_path is None:
    marker["outcomes"] = {"video_missing": len(job.pairs)}
    return
  try:
    reader = VideoReader(job.video_path, threads=opts.decoder_threads,
                         skip_nonref=opts.skip_nonref, frame_tolerance=opts.frame_tolerance)
  except VideoOpenError as e:
    marker.update(outcomes={"video_unreadable": len(job.pairs)}, error=str(e))
    return
  filtering = opts.min_similarity is not None or opts.max_similarity is not None
  with reader:
    fps = reader.fps
    wanted = {p.id: (p.input.index(fps), p.target.index(fps)) for p in job.pairs}
    frames: dict[int, tuple[bytes, object, int, int]] = {}  # index -> (jpeg, thumb, h, w)
    decode_error = None
    try:
      for index, frame in reader.read([i for pair in wanted.values() for i in pair]):
        w, h = resized_size(frame.width, frame.height, opts.short_side)
        # threads=1: swscale's default is one thread per core, in each of the pool's processes.
        rgb = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA",
                               threads=1)
        frames[index] = (encode_jpeg(rgb, opts.jpeg_quality),
                         thumbnail(rgb) if filtering else None, frame.height, frame.width)
    except av.error.FFmpegError as e:
      decode_error = f"{type(e).__name__}: {e}"
    missing = dict(reader.missing)
    marker.update(decoded_frames=reader.decoded_frames, seeks=reader.seeks,
                  inexact_frames=reader.inexact, extracted_frames=len(frames), error=decode_error)

  records = []
  for p in job.pairs:
    first, second = wanted[p.id]
    absent = [i for i in (first, second) if i not in frames]
    if absent:
      reason = missing.get(absent[0])
      outcomes[_MISSING_OUTCOME[reason] if reason else "decode_error"] += 1
      continue
    (in_jpeg, in_thumb, height, width), (tg_jpeg, tg_thumb, _, _) = frames[first], frames[second]
    meta = dict(p.meta)
    meta.update(video_id=p.video_id, fps=float(fps), input_frame=first, target_frame=second,
                input_sec=float(Fraction(first) / fps), target_sec=float(Fraction(second) / fps))
    if filtering:
      sim = similarity(in_thumb, tg_thumb)
      meta["similarity"] = round(sim, 4)
      if opts.max_similarity is not None and sim > opts.max_similarity:
        outcomes["near_duplicate"] += 1
        continue
      if opts.min_similarity is not None and sim < opts.min_similarity:
        outcomes["unrelated"] += 1
        continue
    records.append(dict(id=p.id, input_jpeg=in_jpeg, target_jpeg=tg_jpeg, action=p.action,
                        raw_action=p.raw_action, description=p.description, height=height,
                        width=width, mask_png=b"", meta=json.dumps(meta, sort_keys=True)))
    outcomes["written"] += 1
    if lego_dir is not None:
      names = (_frame_name(p.clip_id, p.action_id, first),
               _frame_name(p.clip_id, p.action_id, second))
      for name, data in zip(names, (in_jpeg, tg_jpeg)):
        target = Path(lego_dir) / "frames" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, data)
      marker["lego"].setdefault(p.clip_id, {})[p.action_id] = {
          "image_0": names[0], "image_1": names[1], "action": p.raw_action,
          DESCRIPTION_KEY: p.description}
      marker["metadata"][p.clip_id] = {"height": height, "width": width, "fps": float(fps)}
  if records:
    shard = f"{job.video_key}.array_record"
    _write_array_record(work / shard, [encode_work_record(r) for r in records])
    marker["shard"] = shard
    marker["described"] = [i for i, r in enumerate(records) if r["description"].strip()]
  marker["outcomes"] = dict(outcomes)


# ---------------------------------------------------------------------------------------------
# The parent: plan, resume, run the pool, report.

def find_videos(videos_dir: str | Path) -> dict[str, str]:
  """{file stem: path} of every video file under `videos_dir` (recursively, sorted walk)."""
  root = Path(videos_dir)
  if not root.is_dir():
    raise UsageError(f"--videos_dir {root} is not a directory")
  found: dict[str, str] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      stem, ext = os.path.splitext(name)
      if ext.lower() in VIDEO_EXTENSIONS and not name.startswith("."):
        found.setdefault(stem, os.path.join(dirpath, name))
  return found


def _safe_key(video_id: str) -> str:
  key = "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)
  return key.lstrip(".") or "_"


def plan_jobs(split: str, pairs: Sequence, videos: dict[str, str]) -> list[VideoJob]:
  """One job per video, pairs sorted by id; duplicate ids (the same action listed twice) must
  have been removed before."""
  by_video: dict[str, list] = collections.defaultdict(list)
  for p in pairs:
    by_video[p.video_id].append(p)
  keys: dict[str, str] = {}
  jobs = []
  for video_id in sorted(by_video):
    key = _safe_key(video_id)
    if keys.setdefault(key, video_id) != video_id:
      key = f"{key}_{hashlib.sha256(video_id.encode()).hexdigest()[:8]}"
    jobs.append(VideoJob(split, key, videos.get(video_id),
                         tuple(sorted(by_video[video_id], key=lambda p: p.id))))
  return jobs


def _load_marker(work: Path, job: VideoJob, fingerprint: str) -> dict | None:
  path = work / job.split / f"{job.video_key}.json"
  try:
    marker = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  if marker.get("fingerprint") != fingerprint:
    return None
  if marker.get("shard") and not (work / job.split / marker["shard"]).is_file():
    return None
  return marker


def _clean_temporaries(work: Path) -> None:
  """Temporary files of runs that were killed (ours: '.<name>.tmp<pid>')."""
  for path in work.rglob(".*.tmp*"):
    if path.is_file():
      path.unlink()


@dataclasses.dataclass
class SplitReport:
  pairs: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)    # reason -> annotations
  outcomes: dict = dataclasses.field(default_factory=dict)   # outcome -> pairs
  videos: int = 0
  processed: list = dataclasses.field(default_factory=list)  # video keys extracted this run
  resumed: list = dataclasses.field(default_factory=list)    # video keys kept from before
  errors: dict = dataclasses.field(default_factory=dict)     # video key -> message


def _progress(total: int):
  from tqdm import tqdm

  return tqdm(total=total, unit="video", dynamic_ncols=True, file=sys.stderr,
              disable=total == 0)


def extract(pairs_by_split: dict[str, Sequence], videos_dir: str | Path, out: str | Path, *,
            options: ExtractOptions = ExtractOptions(), workers: int = 1,
            lego_dir: str | Path | None = None,
            skipped: dict[str, collections.Counter] | None = None,
            ) -> tuple[dict[str, SplitReport], dict[str, list[dict]]]:
  """Runs (or resumes) the extraction -> ({split: report}, {split: markers in video order}).

  Writes OUT/work/<split>/ (see module doc). `workers` > 1 uses a process pool; 1 runs here.
  """
  out = Path(out)
  work = out / "work"
  videos = find_videos(videos_dir)
  lego = str(lego_dir) if lego_dir is not None else None
  reports: dict[str, SplitReport] = {}
  jobs_by_split: dict[str, list[VideoJob]] = {}
  for split, pairs in pairs_by_split.items():
    (work / split).mkdir(parents=True, exist_ok=True)
    jobs_by_split[split] = plan_jobs(split, pairs, videos)
    reports[split] = SplitReport(pairs=len(pairs), videos=len(jobs_by_split[split]),
                                 skipped=dict((skipped or {}).get(split, {})))
  _clean_temporaries(work)

  markers: dict[tuple[str, str], dict] = {}
  todo: list[VideoJob] = []
  for split, jobs in jobs_by_split.items():
    for job in jobs:
      old = _load_marker(work, job, job_fingerprint(job, options, lego is not None))
      if old is not None:
        markers[(split, job.video_key)] = old
        reports[split].resumed.append(job.video_key)
        if old.get("error"):
          reports[split].errors[job.video_key] = old["error"]
      else:
        todo.append(job)
  # Longest first: the pool's tail is then made of short videos.
  todo.sort(key=lambda j: -len(j.pairs))

  written = 0
  with _progress(len(todo)) as bar:
    def done(marker: dict) -> None:
      nonlocal written
      split, key = marker["split"], marker["video_key"]
      markers[(split, key)] = marker
      if marker["video_path"] is not None:
        reports[split].processed.append(key)
      if marker.get("error"):
        reports[split].errors[key] = marker["error"]
      written += marker["outcomes"].get("written", 0)
      bar.update(1)
      bar.set_postfix(pairs_written=written, refresh=False)

    if workers <= 1 or len(todo) <= 1:
      for job in todo:
        done(process_video(job, options, str(work), lego))
    else:
      # spawn: the workers must not inherit the parent's threads (tqdm's monitor) or locks.
      ctx = multiprocessing.get_context("spawn")
      with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
        futures = {pool.submit(process_video, job, options, str(work), lego): job
                   for job in todo}
        for future in as_completed(futures):
          try:
            done(future.result())
          except Exception as e:  # noqa: BLE001  (a worker process died: e.g. a decoder crash)
            job = futures[future]
            done({"split": job.split, "video_key": job.video_key, "video_path": None,
                  "outcomes": {"worker_error": len(job.pairs)}, "shard": None,
                  "error": f"{type(e).__name__}: {e}"})

  ordered: dict[str, list[dict]] = {}
  for split, jobs in jobs_by_split.items():
    ordered[split] = [markers[(split, job.video_key)] for job in jobs]
    counts: collections.Counter = collections.Counter()
    for m in ordered[split]:
      counts.update(m["outcomes"])
    reports[split].outcomes = {k: counts.get(k, 0) for k in OUTCOMES}
    reports[split].processed.sort()
    reports[split].resumed.sort()
  return reports, ordered


# ---------------------------------------------------------------------------------------------
# After extraction: the LEGO release layout and the TFDS records.

def write_lego_release(lego_dir: str | Path, markers: dict[str, list[dict]]) -> dict[str, Path]:
  """<lego_dir>/<split>.json (LEGO annotation JSON) and metadata.json; frames/ was written by
  the workers. Only pairs that were written appear."""
  lego_dir = Path(lego_dir)
  lego_dir.mkdir(parents=True, exist_ok=True)
  paths, metadata = {}, {}
  for split, ms in markers.items():
    annotation: dict = {}
    for m in ms:
      for clip, actions in m.get("lego", {}).items():
        annotation.setdefault(clip, {}).update(actions)
      metadata.update(m.get("metadata", {}))
    paths[split] = lego_dir / f"{split}.json"
    _write_atomic(paths[split], json.dumps(annotation, indent=1, sort_keys=True).encode())
  paths["metadata"] = lego_dir / "metadata.json"
  _write_atomic(paths["metadata"], json.dumps(metadata, indent=1, sort_keys=True).encode())
  return paths


class _WorkFiles:
  """Entries (split's work files in order, record index) -> record dicts, for the TFDS writer's
  reader threads: each thread keeps its current file open (entries come in file order)."""

  def __init__(self, work: Path, markers: Sequence[dict]):
    import threading

    from array_record.python.array_record_module import ArrayRecordReader

    markers = [m for m in markers if m.get("shard")]
    self._paths = [work / m["split"] / m["shard"] for m in markers]
    self._local = threading.local()
    self._open = ArrayRecordReader
    self.entries, self.described = [], []
    for f, (path, m) in enumerate(zip(self._paths, markers)):
      reader = ArrayRecordReader(str(path))
      self.entries += [(f, i) for i in range(reader.num_records())]
      reader.close()
      self.described += [(f, i) for i in m.get("described", [])]

  def load(self, entry: tuple[int, int]) -> dict:
    f, i = entry
    if getattr(self._local, "file", None) != f:
      if getattr(self._local, "reader", None) is not None:
        self._local.reader.close()
      self._local.reader, self._local.file = self._open(str(self._paths[f])), f
    return decode_work_record(self._local.reader.read([i])[0])


def write_records(records_dir: str | Path, markers: dict[str, list[dict]], work: str | Path, *,
                  num_shards: int, workers: int = 1) -> dict:
  """The per-video work files -> RECORDS_DIR/lego/{pairs,instruct}/<version> via the TFDS
  writer of data_prep/tfds_builder.py. Splits without any record are left out (reported).
  Output this module wrote earlier from other work files is replaced; other output is kept
  (an error)."""
  from data_prep import tfds_builder
  from lego_jax.data import prompts, records

  work = Path(work)
  empty = sorted(s for s, ms in markers.items() if not any(m.get("shard") for m in ms))
  sources = {s: _WorkFiles(work, ms) for s, ms in markers.items() if s not in empty}
  if not sources:
    raise UsageError("no pair was extracted in any split: nothing to write (see the report)")
  digest = {s: hashlib.sha256(json.dumps(
      [(m["video_key"], m["fingerprint"]) for m in markers[s] if m.get("shard")]).encode()
  ).hexdigest()[:16] for s in sources}

  def instruct(load):
    def make(entry):
      r = load(entry)
      return dict(id=r["id"], image_jpeg=r["input_jpeg"], answer=r["description"],
                  prompt=prompts.human_turn(r["action"]))
    return make

  results = {"empty_splits": empty}
  for kind in records.KINDS:
    if kind == records.PAIRS:
      splits = {s: tfds_builder.SplitInput(src.entries, src.load, f"work files of {s}")
                for s, src in sources.items()}
    else:
      # Instruction examples need an answer: only pairs with a description.
      splits = {s: tfds_builder.SplitInput(src.described, instruct(src.load),
                                           f"described pairs of {s}")
                for s, src in sources.items() if src.described}
    fingerprint = {"kind": kind, "writer": "data_prep.videos", "splits": digest}
    if records.is_complete(records_dir, kind):
      old = records.build_metadata(records_dir, kind).get("fingerprint", {})
      if old.get("writer") == "data_prep.videos" and (old != fingerprint or not splits):
        shutil.rmtree(records.dataset_dir(records_dir, kind))   # ours, from other work files
    if not splits:
      results[kind] = None
      continue
    result = tfds_builder.convert(records_dir, kind, splits, num_shards=num_shards,
                                  workers=workers, max_bad_fraction=0.0, fingerprint=fingerprint)
    results[kind] = {"path": str(result.path), "kept": result.skipped,
                     "num_records": result.num_records}
  return results


# ---------------------------------------------------------------------------------------------
# Command line.

def parse_split_paths(value: Sequence[str] | str, what: str) -> dict[str, str]:
  """'train:a.json,test:b.json' (or a list of such items) -> {split: path}; a bare path is the
  train split."""
  items = value.split(",") if isinstance(value, str) else list(value)
  out: dict[str, str] = {}
  for item in (i.strip() for i in items):
    if not item:
      continue
    split, sep, path = item.partition(":")
    if not sep or os.sep in split or not split.isidentifier():
      split, path = "train", item
    if split in out:
      raise UsageError(f"{what}: split {split!r} given twice")
    out[split] = path
  return out


def read_ids(path: str | Path) -> set[str]:
  """Ids to keep: a text file (one per line), a JSON list, or an Ego4D benchmark JSON whose
  "clips" list has clip_uid (and video_uid) fields."""
  path = Path(path)
  if not path.is_file():
    raise UsageError(f"--ids file not found: {path}")
  text = path.read_text(encoding="utf-8")
  try:
    data = json.loads(text)
  except json.JSONDecodeError:
    return {line.strip() for line in text.splitlines() if line.strip()}
  if isinstance(data, list):
    return {str(x) for x in data}
  if isinstance(data, dict) and isinstance(data.get("clips"), list):
    return {str(c["clip_uid"]) for c in data["clips"] if isinstance(c, dict) and c.get("clip_uid")}
  raise UsageError(f"--ids {path}: expected lines of ids, a JSON list, or {{'clips': [...]}}")


def read_descriptions(path: str | Path | None) -> dict:
  if not path:
    return {}
  def no_repeats(pairs):
    twice = sorted(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
    if twice:   # json would keep the last silently; which description is meant is unknown
      raise UsageError(f"--descriptions {path}: key(s) {twice[:5]} given twice in one object")
    return dict(pairs)

  try:
    data = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=no_repeats)
  except FileNotFoundError:
    raise UsageError(f"--descriptions file not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UsageError(f"--descriptions {path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise UsageError(f"--descriptions {path}: expected {{clip_id: {{action_id: {{...}}}}}}")
  return data


def describe(pairs: Iterable, descriptions: dict) -> list:
  """Pairs with their description from a LEGO-keyed JSON (entry dict or plain string)."""
  out = []
  for p in pairs:
    entry = (descriptions.get(p.clip_id) or {}).get(p.action_id)
    text = entry.get(DESCRIPTION_KEY, "") if isinstance(entry, dict) else entry
    out.append(dataclasses.replace(p, description=text) if isinstance(text, str) and text else p)
  return out


def dedupe(pairs: Sequence) -> tuple[list, int]:
  """The first pair of each id (an action listed twice must not become two records)."""
  seen, out = set(), []
  for p in pairs:
    if p.id not in seen:
      seen.add(p.id)
      out.append(p)
  return out, len(pairs) - len(out)


def load_annotations(source: str, split_paths: dict[str, str], ids: dict[str, str], *,
                     ego4d_videos: str = "full_scale", ego4d_input: str = "pre_frame",
                     ego4d_target: str = "pnr_frame", epic_positions: str = "frames",
                     epic_input_offset_sec: float = 0.0, epic_target_fraction: float = 0.5,
                     descriptions: dict | None = None,
                     ) -> tuple[dict[str, list], dict[str, collections.Counter]]:
  """{split: annotation path} -> ({split: pairs}, {split: skipped reasons})."""
  from data_prep import ego4d_fho, epic_kitchens

  unknown = sorted(set(ids) - set(split_paths))
  if unknown:
    raise UsageError(f"--ids names split(s) {unknown} that --annotations does not have")
  pairs_by_split, skipped_by_split = {}, {}
  for split, path in split_paths.items():
    if not Path(path).is_file():
      raise UsageError(f"annotation file not found: {path}")
    keep = read_ids(ids[split]) if split in ids else None
    try:
      if source == "ego4d":
        pairs, skipped = ego4d_fho.load_pairs(path, videos=ego4d_videos, input_key=ego4d_input,
                                              target_key=ego4d_target, ids=keep)
      elif source == "epic":
        pairs, skipped = epic_kitchens.load_pairs(
            path, positions=epic_positions, input_offset_sec=epic_input_offset_sec,
            target_fraction=epic_target_fraction, ids=keep)
      else:
        raise UsageError(f"--source={source!r}: expected 'ego4d' or 'epic'")
    except (ego4d_fho.AnnotationError, epic_kitchens.AnnotationError, ValueError) as e:
      raise UsageError(str(e)) from None
    pairs, duplicates = dedupe(describe(pairs, descriptions or {}))
    if duplicates:
      skipped["duplicate_id"] += duplicates
    pairs_by_split[split], skipped_by_split[split] = pairs, skipped
  return pairs_by_split, skipped_by_split


def format_report(reports: dict[str, SplitReport]) -> str:
  lines = []
  for split, r in reports.items():
    lines.append(f"[{split}] {r.pairs} pairs from {r.videos} videos "
                 f"({len(r.processed)} extracted now, {len(r.resumed)} kept from before)")
    for k in OUTCOMES:
      if r.outcomes.get(k):
        lines.append(f"    {k:20s} {r.outcomes[k]}")
    for k, v in sorted(r.skipped.items()):
      lines.append(f"    skipped:{k:12s} {v}")
    for key, msg in sorted(r.errors.items())[:10]:
      lines.append(f"    error {key}: {msg[:200]}")
  return "\n".join(lines)


def _define_flags():
  from absl import flags

  flags.DEFINE_enum("source", None, ["ego4d", "epic"], "annotation format")
  flags.DEFINE_list("annotations", None, "SPLIT:PATH,... (a bare PATH is the train split)")
  flags.DEFINE_string("videos_dir", None, "directory searched recursively for the videos")
  flags.DEFINE_string("out", None, "output directory (work/, records/, report.json)")
  flags.DEFINE_string("records_dir", None, "TFDS records directory (default OUT/records)")
  flags.DEFINE_string("lego_dir", None, "also write the LEGO release layout here")
  flags.DEFINE_list("ids", [], "SPLIT:FILE,...: keep only these clip/video ids in SPLIT")
  flags.DEFINE_string("descriptions", None, "LEGO-keyed JSON with llava_forecast_finetune texts")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "extraction processes")
  flags.DEFINE_integer("num_shards", 64, "ArrayRecord shards per split (at most one per record)")
  flags.DEFINE_integer("short_side", 256, "frames resized to this short side (0: native size)")
  flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the stored frames")
  flags.DEFINE_float("min_similarity", None, "drop pairs whose thumbnails correlate less")
  flags.DEFINE_float("max_similarity", None, "drop pairs whose thumbnails correlate more")
  flags.DEFINE_integer("decoder_threads", 1, "threads per decoder (1 with many workers)")
  flags.DEFINE_enum("ego4d_videos", "full_scale", ["full_scale", "clips"],
                    "video_uid.mp4 + critical_frames, or clip_uid.mp4 + clip_critical_frames")
  flags.DEFINE_string("ego4d_input", "pre_frame", "critical frame used as input")
  flags.DEFINE_string("ego4d_target", "pnr_frame", "critical frame used as target")
  flags.DEFINE_enum("epic_positions", "frames", ["frames", "timestamps"],
                    "EPIC start/stop from start_frame/stop_frame (numbered at 60 fps for "
                    "PXX_YY videos, 50 for PXX_1YY, whatever the video's rate) or the "
                    "timestamps")
  flags.DEFINE_float("epic_input_offset_sec", 0.0, "EPIC input this long before the start")
  flags.DEFINE_float("epic_target_fraction", 0.5, "EPIC target this far into the segment")
  for name in ("source", "annotations", "videos_dir", "out"):
    flags.mark_flag_as_required(name)
  return flags.FLAGS


def run(FLAGS) -> int:
  out = Path(FLAGS.out)
  split_paths = parse_split_paths(FLAGS.annotations, "--annotations")
  ids = parse_split_paths(FLAGS.ids, "--ids") if FLAGS.ids else {}
  pairs, skipped = load_annotations(
      FLAGS.source, split_paths, ids, ego4d_videos=FLAGS.ego4d_videos,
      ego4d_input=FLAGS.ego4d_input, ego4d_target=FLAGS.ego4d_target,
      epic_positions=FLAGS.epic_positions, epic_input_offset_sec=FLAGS.epic_input_offset_sec,
      epic_target_fraction=FLAGS.epic_target_fraction,
      descriptions=read_descriptions(FLAGS.descriptions))
  options = ExtractOptions(short_side=FLAGS.short_side, jpeg_quality=FLAGS.jpeg_quality,
                           min_similarity=FLAGS.min_similarity,
                           max_similarity=FLAGS.max_similarity,
                           decoder_threads=FLAGS.decoder_threads)
  reports, markers = extract(pairs, FLAGS.videos_dir, out, options=options,
                             workers=FLAGS.workers, lego_dir=FLAGS.lego_dir, skipped=skipped)
  print(format_report(reports))
  summary = {"splits": {s: dataclasses.asdict(r) for s, r in reports.items()}}
  if FLAGS.lego_dir:
    summary["lego"] = {k: str(v) for k, v in write_lego_release(FLAGS.lego_dir, markers).items()}
  records_dir = Path(FLAGS.records_dir) if FLAGS.records_dir else out / "records"
  summary["records"] = write_records(records_dir, markers, out / "work",
                                     num_shards=FLAGS.num_shards, workers=2)
  _write_atomic(out / "report.json", json.dumps(summary, indent=1, sort_keys=True).encode())
  for kind in ("pairs", "instruct"):
    info = summary["records"].get(kind)
    if info:
      counts = ", ".join(f"{s} {n}" for s, n in info["num_records"].items())
      print(f"{kind:9s} {'kept' if info['kept'] else 'written'}: {counts}  -> {info['path']}")
  print(f"report    {out / 'report.json'}")
  return 0


def main(argv: list[str] | None = None) -> None:
  from absl import app, logging

  FLAGS = _define_flags()

  def _main(_):
    logging.set_verbosity(logging.ERROR)
    from data_prep.lego_json import ConversionError, ConversionSettingsError

    try:
      return run(FLAGS)
    except (UsageError, ConversionSettingsError, FileNotFoundError) as e:
      print(f"data_prep.videos: error: {e}", file=sys.stderr)
      return 2
    except ConversionError as e:  # the annotation or metadata files: a data fault
      print(f"data_prep.videos: error: {e}", file=sys.stderr)
      return 1

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
