"""`lego-jax prepare-data`: the dataset as ArrayRecord, plus the tokenizer.

source="synthetic" (the embedded default): the scene generator writes the LEGO release's files
under WORKDIR/raw (annotation JSONs, LLaVA JSONs, metadata JSON, JPEG frames), and the SAME
converters that read a real release turn them into WORKDIR/records. source="lego_json": the
user's release files (cfg.data.annotation_*, frames_dir, metadata, llava_*). Then, unless
cfg.data.tokenizer_dir names a LLaMA tokenizer, a SentencePiece model is trained on the records'
text into WORKDIR/tokenizer. Every step writes to a temporary place and renames, and skips when
its complete output (from the same inputs) is already there: re-running is cheap and safe.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from absl import logging

from data_prep import llava_json, lego_json, tfds_builder
from data_prep.lego_json import ConversionError, ConversionSettingsError
from lego_jax.data import prompts, records, synthetic, tokenizer
from lego_jax.data.pipeline import records_dir_of

# Every key cfg.data may have; anything else is a typo that would silently do nothing.
# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data",)


DATA_KEYS = frozenset({
    "source", "dataset", "annotation_train", "annotation_val", "annotation_test", "frames_dir",
    "metadata", "llava_train", "llava_val", "llava_test", "records_dir", "num_shards",
    "max_bad_fraction", "image_size", "vllm_image_size", "hflip_prob", "num_workers",
    "synthetic", "tokenizer_dir", "clip_tokenizer_dir", "tokenizer_vocab_size", "instructions",
    "action_normalisation"})
SYNTHETIC_KEYS = frozenset({"num_train", "num_val", "num_test", "seed", "frame_size", "objects",
                            # the held-out-combinations world (synthetic.Options; default off)
                            "combination_rules", "holdout", "num_instruction", "hand_swap",
                            "push", "balance_poses"})
SOURCES = ("synthetic", "lego_json")
# Where the VLLM's training targets come from when a split has no LLaVA file: "gpt_curated"
# requires the GPT-curated file for train (the paper's instruction tuning); "released_vllm_outputs"
# builds them from the annotation's llava_forecast_finetune, the RELEASED VLLM's own descriptions
# (training on them distils that VLLM; the choice is recorded in the records and printed).
INSTRUCTIONS = ("gpt_curated", "released_vllm_outputs")
GPT_CURATED = {"ego4d": "ego4d_for_tuning_forecasting.json",
               "epickitchens": "epickitchen_for_tuning_forecasting.json"}


class DataConfigError(ValueError):
  pass


NORMALISATIONS = ("release", "project")


def text_rule(data) -> str:
  """The `dataset` argument of data_prep.ego4d_text.normalise_action for this config: Ego4D
  narrations by the release's rule ("ego4d_release", action_normalisation="release") or the
  project's broader one ("ego4d"); other datasets as they are."""
  if data.dataset == "ego4d" and _get(data, "action_normalisation", "project") == "release":
    return "ego4d_release"
  return data.dataset


def check_config(data) -> None:
  """Unknown keys and impossible values of cfg.data -> one message naming them."""
  unknown = sorted(set(data.keys()) - DATA_KEYS)
  if unknown:
    raise DataConfigError(f"unknown config key(s) cfg.data.{', cfg.data.'.join(unknown)} "
                          f"(known: {', '.join(sorted(DATA_KEYS))})")
  unknown = sorted(set(data.synthetic.keys()) - SYNTHETIC_KEYS)
  if unknown:
    raise DataConfigError(f"unknown config key(s) cfg.data.synthetic.{unknown[0]}"
                          + "".join(f", cfg.data.synthetic.{k}" for k in unknown[1:])
                          + f" (known: {', '.join(sorted(SYNTHETIC_KEYS))})")
  if data.source not in SOURCES:
    raise DataConfigError(f"cfg.data.source={data.source!r}: expected one of {SOURCES}")
  if data.dataset not in ("ego4d", "epickitchens"):
    raise DataConfigError(f"cfg.data.dataset={data.dataset!r}: expected 'ego4d' or "
                          "'epickitchens'")
  if _get(data, "action_normalisation", "project") not in NORMALISATIONS:
    raise DataConfigError(f"cfg.data.action_normalisation={data.action_normalisation!r}: "
                          f"expected one of {NORMALISATIONS}")
  if _get(data, "instructions", "gpt_curated") not in INSTRUCTIONS:
    raise DataConfigError(f"cfg.data.instructions={data.instructions!r}: expected one of "
                          f"{INSTRUCTIONS}")
  if not 0.0 <= data.max_bad_fraction <= 1.0:
    raise DataConfigError(f"cfg.data.max_bad_fraction={data.max_bad_fraction} is not in [0, 1]")
  if data.num_shards < 1:
    raise DataConfigError(f"cfg.data.num_shards={data.num_shards} must be at least 1")
  if data.source == "synthetic":
    synthetic_options(data.synthetic)
  if data.source == "synthetic" and not 16 <= data.synthetic.frame_size <= 1024:
    raise DataConfigError(f"cfg.data.synthetic.frame_size={data.synthetic.frame_size} is not "
                          "in [16, 1024]")
  if not data.tokenizer_dir and data.tokenizer_vocab_size < tokenizer.MIN_TRAINED_VOCAB:
    raise DataConfigError(f"cfg.data.tokenizer_vocab_size={data.tokenizer_vocab_size}: a trained "
                          f"tokenizer needs at least {tokenizer.MIN_TRAINED_VOCAB}")


def synthetic_options(s) -> synthetic.Options:
  """cfg.data.synthetic's held-out-combinations settings (absent keys: off)."""
  holdout = s.get("holdout", ())
  if isinstance(holdout, str):  # one combination given on the command line
    holdout = tuple(h.strip() for h in holdout.split(",") if h.strip())
  try:
    return synthetic.Options(combination_rules=bool(s.get("combination_rules", False)),
                             holdout=tuple(holdout),
                             num_instruction=int(s.get("num_instruction", 0)),
                             hand_swap=float(s.get("hand_swap", 0.0)),
                             push=bool(s.get("push", False)),
                             balance_poses=bool(s.get("balance_poses", False)))
  except ValueError as e:
    raise DataConfigError(f"cfg.data.synthetic: {e}") from None


def _get(data, key: str, default=""):
  return data[key] if key in data else default


def _file_digest(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()[:16]


def _release_inputs(data, workdir: Path) -> tuple[dict, dict, Path, str]:
  """-> ({split: annotation path}, {split: llava path or None}, frames_dir, metadata path)."""
  if data.source == "synthetic":
    s = data.synthetic
    counts = {"train": s.num_train, "val": s.num_val, "test": s.num_test}
    if not any(v > 0 for v in counts.values()):
      raise DataConfigError("cfg.data.synthetic asks for no examples (num_train, num_val and "
                            "num_test are all 0)")
    try:
      objects = synthetic.check_objects(s.get("objects", synthetic.OBJECTS))
    except ValueError as e:
      raise DataConfigError(f"cfg.data.synthetic.objects: {e}") from None
    files = synthetic.write_release(workdir / "raw", counts, s.seed, s.frame_size,
                                    objects=objects, options=synthetic_options(s))
    return (dict(files.annotations), dict(files.llava), files.frames_dir, str(files.metadata))
  annotations = {split: Path(_get(data, f"annotation_{split}"))
                 for split in records.SPLITS if _get(data, f"annotation_{split}")}
  if "train" not in annotations and "test" not in annotations:
    raise DataConfigError(
        "source='lego_json' needs the release's annotation files: set "
        "--config.data.annotation_train=PATH (and annotation_test / annotation_val)")
  if not data.frames_dir:
    raise DataConfigError("source='lego_json' needs --config.data.frames_dir=DIR (the release's "
                          "JPEG frames)")
  frames_dir = Path(data.frames_dir)
  if not frames_dir.is_dir():
    raise FileNotFoundError(f"frames directory not found: {frames_dir}")
  llava = {split: (Path(_get(data, f"llava_{split}")) if _get(data, f"llava_{split}") else None)
           for split in annotations}
  if ("train" in annotations and llava.get("train") is None
      and _get(data, "instructions", "gpt_curated") == "gpt_curated"):
    raise DataConfigError(
        "cfg.data.llava_train is empty: the paper instruction-tunes the VLLM on the GPT-curated "
        f"file {GPT_CURATED.get(data.dataset, GPT_CURATED['ego4d'])} (the release's "
        "scripts/download_gpt_curated_data.sh downloads it); set --config.data.llava_train=PATH, "
        "or --config.data.instructions=released_vllm_outputs to train on the annotation's "
        "llava_forecast_finetune (the released VLLM's own outputs: distillation, not the paper's "
        "instruction tuning)")
  return annotations, llava, frames_dir, data.metadata


def _fingerprint(data, kind: str, sources: dict[str, Path], frames_dir: Path,
                 metadata: str, workdir: Path) -> dict:
  """What decides the records' content (frame files are too many to hash; their directory is
  part of it, relative to the workdir when inside it so a moved workdir stays valid): a re-run
  with the same fingerprint is skipped."""
  frames = frames_dir.resolve()
  if frames.is_relative_to(workdir.resolve()):
    frames = frames.relative_to(workdir.resolve())
  return {
      "kind": kind, "dataset": text_rule(data), "frames_dir": str(frames),
      "metadata": _file_digest(Path(metadata)) if metadata else "",
      "sources": {s: _file_digest(p) for s, p in sorted(sources.items())},
      "num_shards": int(data.num_shards), "max_bad_fraction": float(data.max_bad_fraction),
  }


def convert_release(data, workdir: Path) -> dict[str, tfds_builder.ConvertResult]:
  """Both record kinds from release-format files (as written by the generator or a release)."""
  annotations, llava, frames_dir, metadata_path = _release_inputs(data, workdir)
  metadata = lego_json.read_metadata(metadata_path)
  records_dir = records_dir_of(data, workdir)
  workers = max(1, int(data.num_workers))

  pair_splits, instruct_splits = {}, {}
  rule = text_rule(data)
  for split, path in annotations.items():
    entries = lego_json.pair_entries(lego_json.read_json(path, f"{split} annotation JSON"),
                                     str(path))
    pair_splits[split] = tfds_builder.SplitInput(
        entries, lambda e: lego_json.load_pair(e, frames_dir, metadata, rule), str(path))
    if llava.get(split):
      conv = lego_json.read_json(llava[split], f"{split} LLaVA JSON")
      source = str(llava[split])
    else:
      conv, source = llava_json.from_annotation(entries, rule), f"{path} (derived)"
    instruct_splits[split] = tfds_builder.SplitInput(
        llava_json.instruct_entries(conv, source),
        lambda e: llava_json.load_instruct(e, frames_dir), source)

  common = dict(num_shards=int(data.num_shards), workers=workers,
                max_bad_fraction=float(data.max_bad_fraction))
  return {
      records.PAIRS: tfds_builder.convert(
          records_dir, records.PAIRS, pair_splits,
          fingerprint=_fingerprint(data, records.PAIRS, annotations, frames_dir, metadata_path,
                                   workdir),
          **common),
      records.INSTRUCT: tfds_builder.convert(
          records_dir, records.INSTRUCT, instruct_splits,
          # Derived instructions change with their annotation file.
          fingerprint={**_fingerprint(data, records.INSTRUCT,
                                      {s: llava.get(s) or p for s, p in annotations.items()},
                                      frames_dir, metadata_path, workdir),
                       "derived": sorted(s for s in annotations if not llava.get(s))},
          **common),
  }


def _training_splits(records_dir: Path, kind: str) -> list[str]:
  """The train split (held-out text stays out of the vocabulary), else whatever there is."""
  names = records.split_names(records_dir, kind)
  return ["train"] if "train" in names else names


def corpus(records_dir: Path) -> list[str]:
  """The text the tokenizer must cover, as often as the models will see it: every instruction
  in its full chat template with its answer (so the long system prompt becomes few tokens),
  every action and description."""
  lines = []
  for split in _training_splits(records_dir, records.PAIRS):
    src = records.open_split(records_dir, split, records.PAIRS)
    for i in range(len(src)):
      r = records.to_python(src[i])
      lines += [r["action"], r["description"]]
  for split in _training_splits(records_dir, records.INSTRUCT):
    src = records.open_split(records_dir, split, records.INSTRUCT)
    for i in range(len(src)):
      r = records.to_python(src[i])
      lines.append(f"{prompts.chat_prompt(r['prompt'])} {r['answer']}")
  return [line for line in lines if line]


def prepare_tokenizer(data, workdir: Path, records_dir: Path) -> Path:
  """The configured LLaMA tokenizer (checked), or one trained on the records' text."""
  if data.tokenizer_dir:
    return tokenizer.load_tokenizer(data.tokenizer_dir).path
  out = tokenizer.tokenizer_dir(data, workdir)
  stamp = out / "trained_from.json"
  want = {"records": records.build_metadata(records_dir, records.PAIRS).get("fingerprint"),
          "vocab_size": int(data.tokenizer_vocab_size)}
  if (out / tokenizer.MODEL_FILE).exists() and stamp.exists() and \
      json.loads(stamp.read_text()) == want:
    return out / tokenizer.MODEL_FILE
  tok = tokenizer.train_tokenizer(corpus(records_dir), out, int(data.tokenizer_vocab_size))
  stamp.write_text(json.dumps(want, sort_keys=True))
  return tok.path


def prepare(cfg, workdir: str | Path) -> dict:
  """Runs every step; returns a summary (also written to WORKDIR/records/prepare_summary.json)."""
  data = cfg.data
  check_config(data)
  workdir = Path(workdir)
  records_dir = records_dir_of(data, workdir)
  results = convert_release(data, workdir)
  tok_path = prepare_tokenizer(data, workdir, records_dir)
  derived = records.build_metadata(records_dir, records.INSTRUCT).get("fingerprint", {}).get(
      "derived", [])
  summary = {
      "records_dir": str(records_dir), "tokenizer": str(tok_path),
      "instructions": _get(data, "instructions", "gpt_curated"),
      "targets_from_released_vllm": derived,
      "tokenizer_trained": not data.tokenizer_dir,
      **{kind: {"path": str(r.path), "skipped": r.skipped, "num_records": r.num_records,
                "num_bad": r.num_bad, "bad": r.bad} for kind, r in results.items()},
  }
  (records_dir / "prepare_summary.json").write_text(json.dumps(summary, indent=1))
  return summary


def _print_summary(summary: dict) -> None:
  for kind in records.KINDS:
    s = summary[kind]
    state = "kept (already complete)" if s["skipped"] else "written"
    counts = ", ".join(f"{k} {v}" for k, v in s["num_records"].items())
    bad = sum(s["num_bad"].values())
    print(f"{kind:9s} {state}: {counts}" + (f"; {bad} bad record(s) skipped" if bad else "")
          + f"  -> {s['path']}")
    for split, msgs in s["bad"].items():
      for m in msgs[:5]:
        print(f"    bad ({split}): {m}")
  if summary.get("targets_from_released_vllm"):
    print(f"instruct  targets of {', '.join(summary['targets_from_released_vllm'])}: the "
          "annotation's llava_forecast_finetune, the released VLLM's outputs (no LLaVA file; "
          f"cfg.data.instructions={summary['instructions']})")
  how = ("trained on the records' text" if summary["tokenizer_trained"]
         else "from cfg.data.tokenizer_dir")
  print(f"tokenizer {summary['tokenizer']} ({how})")


def main(cfg, workdir: Path) -> int:
  from lego_jax.errors import DataError, UserError

  logging.set_verbosity(logging.ERROR)  # bad records are listed in the summary instead
  try:
    summary = prepare(cfg, workdir)
  except (ConversionSettingsError, DataConfigError, tokenizer.TokenizerError,
          FileExistsError) as e:
    raise UserError(str(e)) from None
  except ConversionError as e:  # the annotation files themselves: a data fault
    raise DataError(str(e)) from None
  except (OSError, RuntimeError) as e:
    full = _disk_error(e, workdir)
    if full is None:
      raise
    # What was being written lies in a step's staging directory; the finished steps stay. The
    # staging directories go, so the space comes back (a re-run would replace them anyway).
    for staging in Path(workdir).glob("*.incomplete"):
      shutil.rmtree(staging, ignore_errors=True)
    raise full from None
  _print_summary(summary)
  return 0


# What the writers say when the disk refuses: ArrayRecord / Riegeli give only a RuntimeError's
# text ("write() failed: No space left on device; writing PATH; at byte N").
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _disk_error(e: BaseException, workdir: Path) -> OSError | None:
  """A full or read-only disk met while writing, as an OSError naming the file (or the workdir),
  which the CLI reports in one line with exit 1; None for any other error."""
  if isinstance(e, OSError):
    if e.errno not in _DISK_ERRNOS:
      return None
    return e if e.filename else OSError(e.errno, e.strerror, str(workdir))
  text = str(e)
  for code in _DISK_ERRNOS:
    if os.strerror(code) in text:
      where = re.search(r"writing (\S+?);", text)
      return OSError(code, os.strerror(code), where.group(1) if where else str(workdir))
  return None
