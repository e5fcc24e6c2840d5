"""Ego4D Forecasting Hands & Objects (FHO) annotations -> LEGO pairs (input = pre-condition
frame, target = point-of-no-return frame).

The annotation file is `fho_main.json` ("Forecasting Hands & Objects Master File", schema in the
Ego4D docs, https://ego4d-data.org/docs/data/annotations-schemas/ ; fields read here):

    videos[]:
      video_uid                      the canonical video, `<video_uid>.mp4` in v1/full_scale/
      video_metadata{fps, width, height, num_frames, ...}
      annotated_intervals[]:
        clip_uid                     the canonical clip, `<clip_uid>.mp4` in v1/clips/ (may be null)
        narrated_actions[]:
          uid                        the narrated action's id (may be null)
          narration_text             "#C C cuts the carrot"
          is_valid_action, is_rejected, is_invalid_annotation    annotation quality flags
          critical_frames            {pre_45, pre_30, pre_15, pre_frame, contact_frame,
                                      pnr_frame, post_frame}: frame numbers in the VIDEO
          clip_critical_frames       the same keys: frame numbers in the CLIP
          structured_verb, freeform_verb, start_frame, end_frame, ...

`critical_frames` is null for actions without critical-frame annotation (skipped, counted).
Other FHO files (the per-benchmark `fho_hands_<split>.json`, older releases) give a critical
frame as an object ({"frame": n, "clip_frame": n} or {"frame_number": n}); both forms are read.
The narration is normalised with `data_prep.ego4d_text` ("#C C cuts the carrot" -> "cut the
carrot"); the raw text is kept as `raw_action`.

Video files: `videos="full_scale"` pairs `<video_uid>.mp4` with `critical_frames`;
`videos="clips"` pairs `<clip_uid>.mp4` with `clip_critical_frames` (clips are 8-minute cuts,
much smaller downloads). Either way the LEGO clip id is the clip_uid (the video_uid when an
interval has none) and the action id the narrated action's uid (else "<interval>_<action>").
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Iterable

from data_prep.ego4d_text import normalise_action
from data_prep.video_frames import PairSpec, Position

VIDEO_MODES = ("full_scale", "clips")
CRITICAL_KEYS = ("pre_45", "pre_30", "pre_15", "pre_frame", "contact_frame", "pnr_frame",
                 "post_frame")


class AnnotationError(ValueError):
  """The annotation file as a whole is unusable (not JSON, not the FHO layout)."""


def _frame_number(value: Any, clip: bool) -> int | None:
  """A critical frame as stored: an int, or an object with frame / clip_frame / frame_number."""
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return int(value)
  if isinstance(value, dict):
    keys = ("clip_frame", "frame_number") if clip else ("frame", "frame_number")
    for k in keys:
      if isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool):
        return int(value[k])
  return None


def load_pairs(path: str | Path, *, videos: str = "full_scale", input_key: str = "pre_frame",
               target_key: str = "pnr_frame", ids: Iterable[str] | None = None,
               ) -> tuple[list[PairSpec], collections.Counter]:
  """Reads fho_main.json -> (pairs in file order, {skip reason: count}).

  `ids` keeps only intervals whose clip_uid or video_uid is listed (a split's clips).
  Skip reasons: rejected, invalid (is_invalid_annotation or not is_valid_action),
  no_critical_frames (null / missing input_key or target_key), no_clip_uid (videos="clips"),
  input_after_target, empty_action, not_in_ids (whole intervals outside `ids`).
  """
  if videos not in VIDEO_MODES:
    raise ValueError(f"videos={videos!r}: expected one of {VIDEO_MODES}")
  for key in (input_key, target_key):
    if key not in CRITICAL_KEYS:
      raise ValueError(f"critical frame {key!r} is not one of {CRITICAL_KEYS}")
  path = Path(path)
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise AnnotationError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
    raise AnnotationError(f"{path}: expected the fho_main.json layout {{'videos': [...]}}")
  keep = set(ids) if ids is not None else None
  clip_mode = videos == "clips"
  field = "clip_critical_frames" if clip_mode else "critical_frames"
  pairs: list[PairSpec] = []
  skipped: collections.Counter = collections.Counter()
  for video in data["videos"]:
    video_uid = str(video.get("video_uid"))
    fps = (video.get("video_metadata") or {}).get("fps")
    for i, interval in enumerate(video.get("annotated_intervals") or []):
      clip_uid = interval.get("clip_uid")
      actions = interval.get("narrated_actions") or []
      if keep is not None and video_uid not in keep and clip_uid not in keep:
        skipped["not_in_ids"] += len(actions)
        continue
      for j, action in enumerate(actions):
        if action.get("is_rejected"):
          skipped["rejected"] += 1
          continue
        if action.get("is_invalid_annotation") or action.get("is_valid_action") is False:
          skipped["invalid"] += 1
          continue
        if clip_mode and not clip_uid:
          skipped["no_clip_uid"] += 1
          continue
        critical = action.get(field) or {}
        first = _frame_number(critical.get(input_key), clip_mode)
        second = _frame_number(critical.get(target_key), clip_mode)
        if first is None or second is None:
          skipped["no_critical_frames"] += 1
          continue
        if first > second:
          skipped["input_after_target"] += 1
          continue
        raw = str(action.get("narration_text") or "")
        text = normalise_action(raw, "ego4d") if raw.strip() else ""
        if not text:
          skipped["empty_action"] += 1
          continue
        meta = (("source", "ego4d_fho"), ("video_uid", video_uid), ("clip_uid", clip_uid),
                ("narration_uid", action.get("uid")), ("critical_frames", field),
                ("input_key", input_key), ("target_key", target_key),
                ("structured_verb", action.get("structured_verb")),
                ("annotation_fps", fps))
        pairs.append(PairSpec(
            clip_id=str(clip_uid or video_uid),
            action_id=str(action.get("uid") or f"{i}_{j}"),
            video_id=str(clip_uid) if clip_mode else video_uid,
            input=Position(frame=first), target=Position(frame=second),
            raw_action=raw, action=text, meta=meta))
  return pairs, skipped
