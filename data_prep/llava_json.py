"""LLaVA conversation JSON -> instruction records (schema in lego_jax/data/records.py).

One LLaVA record: {"id": ..., "image": "<clip>/<action>/<frame>.jpg",
                   "conversations": [{"from": "human", "value": "<image>\\nHow does ..."},
                                     {"from": "gpt", "value": "<enriched description>"}]}
LEGO's data has exactly one human turn (carrying the <image> placeholder) and one gpt turn; other
shapes are counted as bad records. When a release ships no LLaVA file for a split, the same
records are derived from its LEGO annotation JSON (question template from the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.ego4d_text import normalise_action
from data_prep.lego_json import (ConversionError, PairEntry, Repeated, RecordError, read_image,
                                 repeated_fields, shown, text)
from lego_jax.data.prompts import IMAGE_PLACEHOLDER, human_turn


@dataclass(frozen=True)
class InstructEntry:
  index: int
  fields: Any

  @property
  def id(self) -> str:
    if isinstance(self.fields, dict) and "id" in self.fields:
      if isinstance(self.fields["id"], Repeated):
        return f"#{self.index}"
      return str(self.fields["id"])
    return f"#{self.index}"


def instruct_entries(conversations: Any, source: str) -> list[InstructEntry]:
  if not isinstance(conversations, list):
    raise ConversionError(f"{source}: expected a JSON list of LLaVA records, "
                          f"got {type(conversations).__name__}")
  return [InstructEntry(i, r) for i, r in enumerate(conversations)]


def load_instruct(entry: InstructEntry, frames_dir: Path) -> dict:
  """Reads and validates one LLaVA record -> an instruction record (raises RecordError)."""
  rid, fields = entry.id, entry.fields
  if not isinstance(fields, dict):
    raise RecordError(f"record {shown(rid)}: expected an object, got {type(fields).__name__}")
  repeated_fields(f"record {shown(rid)}", fields)
  text(f"record {shown(rid)}", "id", rid)
  missing = [k for k in ("id", "image", "conversations") if k not in fields]
  if missing:
    raise RecordError(f"record {rid}: missing field(s) {missing}")
  turns = fields["conversations"]
  if (not isinstance(turns, list) or len(turns) != 2
      or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)
      or [t.get("from") for t in turns] != ["human", "gpt"]):
    raise RecordError(f"record {rid}: 'conversations' must be one human turn then one gpt turn, "
                      "each with a string 'value' (each field once)")
  prompt = text(f"record {rid}", "conversations[0].value", turns[0]["value"])
  answer = text(f"record {rid}", "conversations[1].value", turns[1]["value"])
  if IMAGE_PLACEHOLDER not in prompt:
    raise RecordError(f"record {rid}: human turn has no {IMAGE_PLACEHOLDER} placeholder")
  if not answer.strip():
    raise RecordError(f"record {rid}: gpt turn is empty")
  image_jpeg, _, _ = read_image(frames_dir, fields["image"], rid, "image")
  return dict(id=rid, image_jpeg=image_jpeg, prompt=prompt, answer=answer)


def from_annotation(entries: list[PairEntry], dataset: str) -> list[dict]:
  """LLaVA records for the annotated actions that have an enriched description.

  Records the pair converter rejects for their fields become stubs that `load_instruct` rejects
  too, so a broken annotation is counted as bad in both record kinds.
  """
  out = []
  for e in entries:
    f = e.fields
    if (not isinstance(f, dict) or not isinstance(f.get("action"), str) or "image_0" not in f
        or any(isinstance(v, Repeated) for v in f.values())):
      out.append({"id": e.id})  # fails validation in load_instruct
      continue
    description = f.get("llava_forecast_finetune") or ""
    if not isinstance(description, str) or not description.strip():
      continue  # no instruction example without an answer; not an error
    out.append({"id": e.id, "image": f["image_0"], "conversations": [
        {"from": "human", "value": human_turn(normalise_action(f["action"], dataset))},
        {"from": "gpt", "value": description}]})
  return out
