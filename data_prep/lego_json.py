"""The LEGO release's annotation format -> pair records (schema in lego_jax/data/records.py).

Annotation JSON: {clip_id: {action_id: {"image_0": "<clip>/<action>/<frame>.jpg",
                                        "image_1": "<clip>/<action>/<frame>.jpg",
                                        "action": "#C C cuts the carrot",
                                        "llava_forecast_finetune": "<enriched description>"}}}
image_0 is the input frame, image_1 the action frame; paths are relative to the frames directory.
The optional metadata JSON is keyed by clip_id and gives the original "height"/"width". The
synthetic generator adds, per clip, "actions": {action_id: {"mask": <png path>, "meta": {...}}};
real metadata files have no such entry, and their records get an empty mask and meta "{}".

A key given twice in one JSON object is kept, every copy (`Repeated`), instead of json's silent
last-one-wins: a repeated clip id contributes the actions of all its copies, a repeated action id
becomes one entry per copy (the first written, the others counted as bad "duplicate id" by the
writer), a repeated field of a record makes the record bad. Text that cannot be stored as UTF-8
(a lone surrogate from a "\\ud800" escape) makes its record bad, named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.ego4d_text import normalise_action
from lego_jax.data import images
from lego_jax.errors import DataError

REQUIRED = ("image_0", "image_1", "action")
DESCRIPTION_KEY = "llava_forecast_finetune"


class RecordError(ValueError):
  """One bad annotation record; it is counted and skipped."""


class ConversionError(ValueError):
  """The input as a whole cannot be converted (unreadable file, empty split, too many bad): a
  fault in the data (exit 1 through the command line)."""


class ConversionSettingsError(ConversionError):
  """The conversion's settings or output directory are the problem, not the data (an allowance
  out of range, records of other inputs already in the output): exit 2."""


class Repeated(list):
  """The values of a key that one JSON object gives more than once, in file order."""


def _keep_repeated(pairs: list[tuple[str, Any]]) -> dict:
  out: dict = {}
  for key, value in pairs:
    if key not in out:
      out[key] = value
    elif isinstance(out[key], Repeated):
      out[key].append(value)
    else:
      out[key] = Repeated([out[key], value])
  return out


def copies(value: Any) -> list:
  """Every value given for a key (one, unless the key was repeated)."""
  return list(value) if isinstance(value, Repeated) else [value]


def repeated_fields(rid: str, fields: dict) -> None:
  """RecordError if the record gives a field twice (which one is meant is unknown)."""
  twice = sorted(k for k, v in fields.items() if isinstance(v, Repeated))
  if twice:
    raise RecordError(f"{rid}: field(s) {twice} given more than once")


def shown(value: str) -> str:
  """`value` printable and storable whatever it holds (surrogates as \\udXXX escapes)."""
  return value.encode("utf-8", "backslashreplace").decode("utf-8")


def text(rid: str, field: str, value: str) -> str:
  """`value` if it can be stored (UTF-8), else RecordError naming the record."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RecordError(f"{rid}: field {field!r} is not valid Unicode text ({e.reason} at "
                      f"position {e.start}: {value[max(0, e.start - 20):e.start]!r})") from None
  return value


def read_json(path: str | Path, what: str) -> Any:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found: {path}")
  try:
    return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_keep_repeated)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{what} {path} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class PairEntry:
  """One (clip, action) of an annotation file, not yet validated."""
  clip_id: str
  action_id: str
  fields: Any

  @property
  def id(self) -> str:
    return f"{self.clip_id}/{self.action_id}"


def pair_entries(annotation: Any, source: str) -> list[PairEntry]:
  """Flattens the annotation dict in file order. A clip whose value is not a dict becomes one
  entry that fails later, so it is counted as bad rather than stopping the conversion."""
  if not isinstance(annotation, dict):
    raise ConversionError(f"{source}: expected a JSON object {{clip_id: {{action_id: {{...}}}}}}, "
                          f"got {type(annotation).__name__}")
  out = []
  for clip_id, clip_copies in annotation.items():
    for actions in copies(clip_copies):
      if not isinstance(actions, dict):
        out.append(PairEntry(str(clip_id), "?", actions))
        continue
      out.extend(PairEntry(str(clip_id), str(a), fields)
                 for a, values in actions.items() for fields in copies(values))
  return out


def read_file(frames_dir: Path, rel: Any, record_id: str, field: str) -> bytes:
  if not isinstance(rel, str) or not rel:
    raise RecordError(f"{record_id}: field {field!r} is not a path: {rel!r}")
  path = frames_dir / rel
  try:
    return path.read_bytes()
  except FileNotFoundError:
    raise RecordError(f"{record_id}: {field} file missing: {path}") from None
  except (OSError, UnicodeEncodeError) as e:
    raise RecordError(f"{record_id}: {field} file unreadable: {path} ({e})") from None


def read_image(frames_dir: Path, rel: Any, record_id: str, field: str) -> tuple[bytes, int, int]:
  data = read_file(frames_dir, rel, record_id, field)
  try:
    return images.normalise_jpeg(data)
  except images.ImageError as e:
    raise RecordError(f"{record_id}: {field} {frames_dir / rel}: {e}") from None


def _clip_size(metadata: dict, clip_id: str, record_id: str) -> tuple[int, int] | None:
  info = metadata.get(clip_id)
  if info is None:
    return None
  try:
    h, w = int(info["height"]), int(info["width"])
  except (TypeError, KeyError, ValueError):
    raise RecordError(f"{record_id}: metadata of clip {clip_id!r} has no integer height/width: "
                      f"{info!r}"[:300]) from None
  if h <= 0 or w <= 0:
    raise RecordError(f"{record_id}: metadata of clip {clip_id!r} has size {h}x{w}")
  return h, w


def load_pair(entry: PairEntry, frames_dir: Path, metadata: dict, dataset: str) -> dict:
  """Reads and validates one annotation record -> a pair record (raises RecordError)."""
  rid, fields = entry.id, entry.fields
  if not isinstance(fields, dict):
    raise RecordError(f"{shown(rid)}: expected an object with {REQUIRED}, got "
                      f"{type(fields).__name__}")
  text(shown(rid), "id", rid)
  repeated_fields(rid, fields)
  missing = [k for k in REQUIRED if k not in fields]
  if missing:
    raise RecordError(f"{rid}: missing field(s) {missing}")
  raw_action = fields["action"]
  if not isinstance(raw_action, str) or not raw_action.strip():
    raise RecordError(f"{rid}: field 'action' is empty or not a string: {raw_action!r}")
  raw_action = text(rid, "action", raw_action)
  description = fields.get(DESCRIPTION_KEY) or ""
  if not isinstance(description, str):
    raise RecordError(f"{rid}: field {DESCRIPTION_KEY!r} is not a string")
  description = text(rid, DESCRIPTION_KEY, description)
  action = normalise_action(raw_action, dataset)
  if not action:
    raise RecordError(f"{rid}: action {raw_action!r} is empty after normalisation")

  input_jpeg, h, w = read_image(frames_dir, fields["image_0"], rid, "image_0")
  target_jpeg, _, _ = read_image(frames_dir, fields["image_1"], rid, "image_1")
  size = _clip_size(metadata, entry.clip_id, rid)
  if size is not None:
    h, w = size

  mask_png, meta = b"", "{}"
  extra = metadata.get(entry.clip_id, {}).get("actions", {}).get(entry.action_id) \
      if isinstance(metadata.get(entry.clip_id), dict) else None
  if isinstance(extra, dict):
    if "mask" in extra:
      data = read_file(frames_dir, extra["mask"], rid, "mask")
      try:
        mask_png = images.normalise_mask_png(data)
      except images.ImageError as e:
        raise RecordError(f"{rid}: mask {frames_dir / extra['mask']}: {e}") from None
    if "meta" in extra:
      meta = json.dumps(extra["meta"], sort_keys=True)
  return dict(id=rid, input_jpeg=input_jpeg, target_jpeg=target_jpeg, action=action,
              raw_action=raw_action, description=description, height=h, width=w,
              mask_png=mask_png, meta=meta)


def read_metadata(path: str | Path | None) -> dict:
  """The optional metadata JSON; "" or None means none. A clip given twice, or a field of a clip
  given twice, is a DataError: which size is meant is unknown, and every record of the clip
  would otherwise fail on its own with the copies printed."""
  if not path:
    return {}
  meta = read_json(path, "metadata JSON")
  if not isinstance(meta, dict):
    raise ConversionError(f"metadata JSON {path}: expected an object keyed by clip_id")
  for clip_id, info in meta.items():
    if isinstance(info, Repeated):
      raise DataError(f"metadata JSON {path}: clip {shown(clip_id)!r} is given {len(info)} times "
                      "(one entry per clip)")
    twice = sorted(k for k, v in info.items() if isinstance(v, Repeated)) \
        if isinstance(info, dict) else []
    if twice:
      raise DataError(f"metadata JSON {path}: clip {shown(clip_id)!r} gives {shown(twice[0])!r} "
                      "more than once")
  return meta
