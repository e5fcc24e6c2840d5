"""EPIC-KITCHENS-100 action annotations -> LEGO pairs.

The annotation files are `EPIC_100_train.csv` / `EPIC_100_validation.csv` (columns documented in
github.com/epic-kitchens/epic-kitchens-100-annotations, README "EPIC_100_train.csv"):
narration_id, participant_id, video_id, narration_timestamp, start_timestamp, stop_timestamp
("HH:mm:ss.SS"), start_frame, stop_frame, narration, verb, verb_class, noun, noun_class,
all_nouns, all_noun_classes. The videos are `<video_id>.MP4` (e.g. P01/videos/P01_01.MP4).

EPIC has no critical frames, so the pair is chosen by rule:
  input  = the action's start, moved `input_offset_sec` earlier (0: the start frame itself);
  target = the frame `target_fraction` of the way from start to stop (0.5: the middle).
`positions="frames"` uses start_frame/stop_frame, which number the release's extracted
`frame_%010d.jpg` files from 1 at a fixed rate per video kind, NOT at the video's own rate:
60 fps for the EPIC-55 videos (PXX_YY, recorded at 59.94, 29.97, 47.95 or 90 fps) and 50 fps
for the EPIC-100 extension videos (PXX_1YY, all 50 fps). In the published CSVs start_frame /
start_sec is 59.92-60.00 on every row of an EPIC-55 video whatever its rate, 49.90-50.00 on
every extension row (docs/data-faults.md). So frame n is the time (n - 1) / rate, and the video
frame nearest it is taken; a video id of neither kind is skipped (unknown_video_kind: use
`positions="timestamps"` for it).
`positions="timestamps"` uses start/stop_timestamp and the video's own frame rate.
Labels are used verbatim (`narration`), as in LEGO.
"""

from __future__ import annotations

import collections
import csv
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterable

from data_prep.video_frames import PairSpec, Position

POSITIONS = ("frames", "timestamps")
REQUIRED = ("narration_id", "video_id", "start_timestamp", "stop_timestamp", "start_frame",
            "stop_frame", "narration")
META_COLUMNS = ("participant_id", "verb", "verb_class", "noun", "noun_class",
                "narration_timestamp")


# The rate start_frame / stop_frame count at, by video id (see the module doc).
ANNOTATION_FPS = ((re.compile(r"P\d{2,}_\d{2}"), 60), (re.compile(r"P\d{2,}_1\d{2}"), 50))


def annotation_fps(video_id: str) -> int | None:
  """60 for an EPIC-55 video id (P01_05), 50 for an extension one (P01_105), None otherwise."""
  for pattern, fps in ANNOTATION_FPS:
    if pattern.fullmatch(video_id):
      return fps
  return None


class AnnotationError(ValueError):
  """The annotation file as a whole is unusable (missing columns)."""


def parse_timestamp(text: str) -> float:
  """'HH:mm:ss.SS' (any number of decimals) -> seconds."""
  parts = text.strip().split(":")
  if len(parts) != 3:
    raise ValueError(f"timestamp {text!r} is not HH:mm:ss.SS")
  h, m, s = parts
  return int(h) * 3600 + int(m) * 60 + float(s)


def load_pairs(path: str | Path, *, positions: str = "frames", input_offset_sec: float = 0.0,
               target_fraction: float = 0.5, ids: Iterable[str] | None = None,
               ) -> tuple[list[PairSpec], collections.Counter]:
  """Reads an EPIC-KITCHENS-100 CSV -> (pairs in file order, {skip reason: count}).

  `ids` keeps only the listed video_ids. Skip reasons: bad_row (unparsable numbers/timestamps,
  stop before start), empty_action, not_in_ids, unknown_video_kind (positions="frames" and a
  video id whose frame numbering is not known).
  """
  if positions not in POSITIONS:
    raise ValueError(f"positions={positions!r}: expected one of {POSITIONS}")
  if not 0.0 <= target_fraction <= 1.0:
    raise ValueError(f"target_fraction={target_fraction} is not in [0, 1]")
  if input_offset_sec < 0:
    raise ValueError(f"input_offset_sec={input_offset_sec} must be >= 0 (seconds before start)")
  keep = set(ids) if ids is not None else None
  pairs: list[PairSpec] = []
  skipped: collections.Counter = collections.Counter()
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
      raise AnnotationError(f"{path}: missing column(s) {missing} (is this an EPIC-KITCHENS-100 "
                            "action CSV?)")
    for row in reader:
      if keep is not None and row["video_id"] not in keep:
        skipped["not_in_ids"] += 1
        continue
      try:
        start_f, stop_f = int(row["start_frame"]) - 1, int(row["stop_frame"]) - 1
        start_s = parse_timestamp(row["start_timestamp"])
        stop_s = parse_timestamp(row["stop_timestamp"])
      except ValueError:
        skipped["bad_row"] += 1
        continue
      if stop_f < start_f or stop_s < start_s or start_f < 0:
        skipped["bad_row"] += 1
        continue
      narration = (row["narration"] or "").strip()
      if not narration:
        skipped["empty_action"] += 1
        continue
      if positions == "frames":
        rate = annotation_fps(row["video_id"])
        if rate is None:
          skipped["unknown_video_kind"] += 1
          continue
        # Exact fractions: the frame's time, resolved to the video's own rate in the worker.
        first = Position(sec=Fraction(start_f, rate), offset_sec=-input_offset_sec)
        second = Position(sec=Fraction(start_f + round(target_fraction * (stop_f - start_f)),
                                       rate))
      else:
        first = Position(sec=start_s, offset_sec=-input_offset_sec)
        second = Position(sec=start_s + target_fraction * (stop_s - start_s))
      meta = (("source", "epic_kitchens_100"), ("positions", positions),
              *((("annotation_fps", rate),) if positions == "frames" else ()),
              ("start_frame", int(row["start_frame"])), ("stop_frame", int(row["stop_frame"])),
              ("start_sec", start_s), ("stop_sec", stop_s),
              ("input_offset_sec", input_offset_sec), ("target_fraction", target_fraction),
              *((c, row[c]) for c in META_COLUMNS if c in row))
      pairs.append(PairSpec(
          clip_id=row["video_id"], action_id=row["narration_id"], video_id=row["video_id"],
          input=first, target=second, raw_action=row["narration"], action=narration,
          meta=meta))
  return pairs, skipped
