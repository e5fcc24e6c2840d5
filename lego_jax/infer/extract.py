"""`lego-jax extract`: the trained VLLM's enriched description R and its features H_i, H_t for
every example of every split, in record order, as the feature records the LDM stage reads
(format: lego_jax/data/features.py; WORKDIR/features/<split>/part-*.array_record + info.json).

Per example (as LEGO, Lai et al., ECCV 2024, arXiv 2312.03849, and its release
github.com/BolinLai/LEGO extract them with LLaVA's generate): the prompt `chat_prompt(human_turn(action))` with the input
frame's CLIP view; R sampled with the jitted KV-cache decoder (`lego_jax.infer.decode`: one
prefill of the right-padded batch, then the fixed-shape decode loop; every row stops at its own
EOS), `cfg.vllm_generate`: temperature 0.2, top-k/top-p, `greedy`, `max_new_tokens`, `seed`;
  H_i = the projector output for the frame (num_patches, hidden);
  H_t = per generation step the last layer's hidden state after the final norm at the position
        that predicted the step's token; row 0 = the last prompt position (the release's
        generate(output_hidden_states=True) stack), one row per generated token, EOS included.
Stored in `vllm_generate.feature_dtype` (float16 as the release, bfloat16 or float32).

Resumable and exact: records are grouped in parts of `part_size`, each written atomically; a
rerun skips the parts already there, and every batch draws its sample from a key derived from
(seed, split, first record index) alone, so an interrupted-then-resumed extraction writes what an
uninterrupted one does. info.json records the settings; a rerun with other settings is refused
rather than mixed. Multi-host: host h handles parts k with k % process_count == h, each host on a
mesh of its own devices; host 0 writes the final info.json once every part is there.

Splits whose pair records carry synthetic-scene metadata also get accuracy.json: how often the
descriptions name the right location, hand and object (`description_accuracy`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lego_jax.config import ConfigError
from lego_jax.errors import UserError
from lego_jax.data import features, images, pipeline, records
from lego_jax.data.prompts import human_turn
from lego_jax.data.tokenizer import Tokenizer
from lego_jax.infer import decode
from lego_jax.models.llava import Llava
from lego_jax.parallel import sharding
from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train import vllm

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "clip_vision", "llama", "llava", "vllm_train", "vllm_generate", "mesh")


FEATURES_DIR = "features"
PROMPT_BUCKET = 64  # prompts are padded to a multiple of this: few compilations, little waste


# --- generation -------------------------------------------------------------------------------


@dataclasses.dataclass
class Described:
  """One example's output. tokens (n,) int32 generated ids (EOS included when reached);
  h_img (num_patches, hidden) H_i; h_txt (n, hidden) H_t; n <= max_new_tokens."""
  description: str
  tokens: np.ndarray
  h_img: np.ndarray
  h_txt: np.ndarray


def sampling_config(cfg, tok: Tokenizer) -> decode.SamplingConfig:
  g = cfg.vllm_generate
  return decode.SamplingConfig.for_tokenizer(
      tok, max_new_tokens=int(g.max_new_tokens), greedy=bool(g.greedy),
      temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
      min_new_tokens=int(g.get("min_new_tokens", 0)),
      unstack_layers=bool(g.get("unstack_layers", True)))


@nnx.jit(static_argnames=("zero_image",))
def _prompt_embeds(model: Llava, ids: jax.Array, pixels: jax.Array, zero_image: bool):
  features_ = vllm.image_features(model, pixels, zero_image)
  return model.embed_inputs(ids, image_features=features_), features_


def batch_devices(mesh) -> int:
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


class Describer:
  """Batched generation at fixed shapes: `rows` rows per call (short batches are filled with
  copies of their first row, whose outputs are dropped), prompts right-padded to a multiple of
  PROMPT_BUCKET tokens. Runs on `mesh` (the batch split over its data x fsdp axes) when given."""

  def __init__(self, model: Llava, tok: Tokenizer, sampling: decode.SamplingConfig, *,
               rows: int, zero_image: bool = False, mesh=None):
    if rows % batch_devices(mesh):
      raise ValueError(f"{rows} rows do not split over {batch_devices(mesh)} devices")
    self.model, self.tok, self.sampling = model, tok, sampling
    self.rows, self.zero_image, self.mesh = rows, zero_image, mesh
    self.num_patches = model.config.num_patches

  def prompts(self, actions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (rows, T) right-padded with pad_id, lengths (rows,)."""
    seqs = [vllm.prompt_ids(self.tok, human_turn(a), self.num_patches) for a in actions]
    seqs += [seqs[0]] * (self.rows - len(seqs))
    t = PROMPT_BUCKET * math.ceil(max(len(s) for s in seqs) / PROMPT_BUCKET)
    ids = np.full((self.rows, t), self.tok.pad_id, np.int32)
    for i, s in enumerate(seqs):
      ids[i, :len(s)] = s
    return ids, np.asarray([len(s) for s in seqs], np.int32)

  def __call__(self, actions: Sequence[str], pixels: np.ndarray, key: jax.Array) -> list[Described]:
    """actions: n <= rows prompts; pixels (n, S, S, 3) CLIP-normalised; key: the batch's key."""
    n = len(actions)
    if not 0 < n <= self.rows:
      raise ValueError(f"{n} examples for a batch of {self.rows} rows")
    ids, lengths = self.prompts(actions)
    pixels = np.asarray(pixels, np.float32)
    pixels = np.concatenate([pixels, np.repeat(pixels[:1], self.rows - n, axis=0)])
    run = lambda: self._generate(ids, lengths, pixels, key)
    if self.mesh is None:
      gen, h_img = run()
    else:
      with sharding.use_mesh(self.mesh):
        gen, h_img = run()
    tokens, hidden, num, h_img = jax.device_get((gen.tokens, gen.hidden, gen.num_tokens, h_img))
    out = []
    for b in range(n):
      k = int(num[b])
      out.append(Described(self.tok.decode(tokens[b, :k]), np.asarray(tokens[b, :k], np.int32),
                           np.asarray(h_img[b]), np.asarray(hidden[b, :k])))
    return out

  def _generate(self, ids, lengths, pixels, key):
    embeds, h_img = _prompt_embeds(self.model, jnp.asarray(ids), jnp.asarray(pixels),
                                   self.zero_image)
    return decode.generate(self.model.lm, embeds, lengths, self.sampling, key), h_img


def describer_for(cfg, model: Llava, tok: Tokenizer, mesh=None, rows: int | None = None) -> Describer:
  """The configured Describer: vllm_generate.batch_size rows (rounded up to the mesh)."""
  per = batch_devices(mesh)
  rows = int(rows or cfg.vllm_generate.batch_size)
  return Describer(model, tok, sampling_config(cfg, tok), rows=per * math.ceil(rows / per),
                   zero_image=bool(cfg.vllm_train.zero_image), mesh=mesh)


def batch_key(seed: int, split: str, first_index: int) -> jax.Array:
  """The sampling key of the batch starting at record `first_index` of `split`."""
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(split.encode()) % (2**31))
  return jax.random.fold_in(key, first_index)


def local_mesh(cfg):
  """This host's devices as a mesh: the config's shape when it fits them, else all of them on
  the fsdp axis (a model too big for one device is split, the batch too)."""
  devices = jax.local_devices()
  try:
    return sharding.make_mesh(cfg.mesh.shape, devices=devices)
  except ValueError:
    return sharding.make_mesh((1, -1, 1), devices=devices)


# --- scoring against the synthetic scenes' ground truth ---------------------------------------

_LOCATION = re.compile(r"\b(left side|middle|right side) of the table\b")
_HAND = re.compile(r"\b(left|right) hand\b")
_LOCATION_WORD = {"left side": "left", "middle": "middle", "right side": "right"}


def named_location(text: str) -> str | None:
  """'left' / 'middle' / 'right' from the first "<place> of the table" of a description."""
  m = _LOCATION.search(text)
  return _LOCATION_WORD[m.group(1)] if m else None


def named_hand(text: str) -> str | None:
  m = _HAND.search(text)
  return m.group(1) if m else None


def description_accuracy(descriptions: Sequence[str], metas: Sequence[Mapping],
                         references: Sequence[str] | None = None) -> dict | None:
  """Rates over the examples whose metadata (lego_jax/data/synthetic.py) names the target:
  location: the first "<left side|middle|right side> of the table" is the object's column;
  hand: the first "<left|right> hand" is the acting hand; object: "<colour> <kind>" appears.
  With `references` also `exact` (the description equals the ground-truth one). None when no
  example has metadata (real data)."""
  rows = [(i, d, m) for i, (d, m) in enumerate(zip(descriptions, metas))
          if all(k in m for k in ("location", "hand", "colour", "target"))]
  if not rows:
    return None
  rate = lambda hits: float(np.mean(hits))
  out = {
      "location": rate([named_location(d) == m["location"] for _, d, m in rows]),
      "hand": rate([named_hand(d) == m["hand"] for _, d, m in rows]),
      "object": rate([re.search(rf"\b{re.escape(m['colour'])} {re.escape(m['target'])}\b", d)
                      is not None for _, d, m in rows]),
      "num": len(rows),
  }
  if references is not None:
    out["exact"] = rate([d.strip() == references[i].strip() for i, d, _ in rows])
  return out


# --- extraction -------------------------------------------------------------------------------


def settings_of(cfg, describer: Describer, model_source: str) -> dict:
  """Everything that decides the written bytes: a resumed run must match it exactly."""
  g = cfg.vllm_generate
  return {"model": model_source, "max_new_tokens": int(g.max_new_tokens),
          "greedy": bool(g.greedy), "temperature": float(g.temperature), "top_p": float(g.top_p),
          "top_k": int(g.top_k), "seed": int(g.seed), "rows": describer.rows,
          "compute_dtype": str(g.compute_dtype), "feature_dtype": str(g.feature_dtype),
          "part_size": int(g.part_size), "zero_image": bool(cfg.vllm_train.zero_image)}


def _example(src, i: int, split: str, size: int) -> dict:
  r = records.to_python(src[i])
  try:
    frame = images.decode_rgb(r["input_jpeg"])
  except images.ImageError as e:
    raise UserError(f"{split} record {i} ({r['id']}): input frame: {e}; nothing was written for "
                    "its part") from None
  return {"index": i, "id": r["id"], "action": r["action"],
          "pixels": images.clip_view(frame, size)}


def _part_records(features_dir: Path, split: str, num_parts: int):
  paths = [str(features.part_path(features_dir, split, k)) for k in range(num_parts)]
  return grain.sources.ArrayRecordDataSource(paths) if paths else []


def finish_split(cfg, workdir: Path, split: str, info: dict) -> dict:
  """Marks a split complete in info.json (size per example included) and scores it."""
  features_dir = Path(workdir) / FEATURES_DIR
  num_parts = info["num_parts"]
  total = sum(features.part_path(features_dir, split, k).stat().st_size for k in range(num_parts))
  n = info["num_records"]
  info = dict(info, complete=True, total_bytes=total,
              bytes_per_example=total / n if n else 0.0)
  features.write_info(features_dir, split, info)
  src = records.open_split(pipeline.records_dir_of(cfg.data, workdir), split, records.PAIRS)
  stored = _part_records(features_dir, split, num_parts)
  descriptions, metas, references = [], [], []
  for i in range(n):
    r = features.decode(stored[i])
    if r["index"] != i:
      raise RuntimeError(f"feature record {i} of {split} holds example {r['index']}")
    descriptions.append(r["description"])
    pair = records.to_python(src[i])
    metas.append(records.read_meta(pair))
    references.append(pair["description"])
  accuracy = description_accuracy(descriptions, metas, references)
  if accuracy is not None:
    ckpt_lib.dump_json(accuracy, features.split_dir(features_dir, split) / "accuracy.json")
  return dict(info, accuracy=accuracy)


def extract_split(cfg, workdir: Path, split: str, describer: Describer, settings: dict, *,
                  stop_after_parts: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> dict:
  """Extracts this host's missing parts of `split`; returns the split's info (+ accuracy) once
  it is complete, else {"complete": False, ...} (interrupted, or other hosts still at work)."""
  g = cfg.vllm_generate
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  features_dir = Path(workdir) / FEATURES_DIR
  src = records.open_split(pipeline.records_dir_of(cfg.data, workdir), split, records.PAIRS)
  n, part_size = len(src), int(g.part_size)
  num_parts = math.ceil(n / part_size)
  info = {"split": split, "complete": False, "num_parts": num_parts, "num_records": n,
          "part_size": part_size, "dtype": str(g.feature_dtype),
          "dim": int(describer.model.config.text_hidden), "n_img": describer.num_patches,
          "settings": settings}
  try:
    previous = features.read_info(features_dir, split)
  except FileNotFoundError:
    previous = None
  if previous is not None and (previous.get("settings") != settings
                               or previous.get("num_records") != n):
    changed = sorted(k for k in set(settings) | set(previous.get("settings", {}))
                     if settings.get(k) != previous.get("settings", {}).get(k))
    raise ConfigError(
        f"{features.split_dir(features_dir, split)} holds features extracted with other settings "
        f"(differing: {', '.join(changed) or 'num_records'}); delete that directory to extract "
        "again, or rerun with the settings it was written with")
  if previous is not None and previous.get("complete") and features.is_complete(features_dir, split):
    return dict(previous, kept=True)
  if previous is None and index == 0:
    features.write_info(features_dir, split, info)

  done = features.done_parts(features_dir, split)
  mine = [k for k in range(num_parts) if k % count == index and k not in done]
  finished = sum(min(part_size, n - k * part_size) for k in done if k < num_parts)
  size = int(cfg.data.vllm_image_size)
  written = 0
  with tqdm(total=n, initial=finished, desc=f"extract {split}", unit="ex", dynamic_ncols=True,
            disable=index != 0) as bar:
    for k in mine:
      start, end = k * part_size, min(n, (k + 1) * part_size)
      blobs = []
      for b0 in range(start, end, describer.rows):
        chunk = [_example(src, i, split, size) for i in range(b0, min(end, b0 + describer.rows))]
        outs = describer([e["action"] for e in chunk], np.stack([e["pixels"] for e in chunk]),
                         batch_key(int(g.seed), split, b0))
        blobs += [features.encode(e["index"], e["id"], o.description, o.tokens, o.h_img, o.h_txt,
                                  str(g.feature_dtype)) for e, o in zip(chunk, outs)]
        bar.update(len(chunk))
      features.write_part(features_dir, split, k, blobs)
      written += 1
      if stop_after_parts is not None and written >= stop_after_parts:
        return dict(info, parts_written=written)
  if count > 1 and process_count is None:
    multihost_utils.sync_global_devices(f"lego_extract_{split}")
  if index != 0 or features.done_parts(features_dir, split) != set(range(num_parts)):
    return dict(info, parts_written=written)
  return dict(finish_split(cfg, workdir, split, info), parts_written=written)


def extract(cfg, workdir: Path, model: Llava, tok: Tokenizer, *, mesh=None, model_source: str,
            splits: Sequence[str] | None = None, **kwargs) -> dict[str, dict]:
  """Every split (or `splits`) of the pair records -> WORKDIR/features/<split>; returns each
  split's info. `kwargs` go to `extract_split` (interruption and multi-host tests)."""
  g = cfg.vllm_generate
  if g.feature_dtype not in features.DTYPES:
    raise ConfigError(f"vllm_generate.feature_dtype={g.feature_dtype!r}: one of "
                      f"{sorted(features.DTYPES)}")
  if int(g.part_size) < 1:
    raise ConfigError(f"vllm_generate.part_size={g.part_size} must be at least 1")
  records_dir = pipeline.records_dir_of(cfg.data, workdir)
  describer = describer_for(cfg, model, tok, mesh)
  settings = settings_of(cfg, describer, model_source)
  splits = list(splits) if splits else records.split_names(records_dir, records.PAIRS)
  return {s: extract_split(cfg, Path(workdir), s, describer, settings, **kwargs) for s in splits}


def main(cfg, workdir: Path) -> int:
  workdir = Path(workdir)
  mesh = local_mesh(cfg)
  source = vllm.trained_source(cfg, workdir)
  model, tok = vllm.load_trained(cfg, workdir, dtype=cfg.vllm_generate.compute_dtype, mesh=mesh)
  summary = extract(cfg, workdir, model, tok, mesh=mesh, model_source=source)
  for split, info in summary.items():
    if not info.get("complete"):
      print(f"extract {split}: this host's parts are written; host 0 finishes the split")
      continue
    state = "kept (already complete)" if info.get("kept") else "written"
    print(f"extract {split}: {info['num_records']} examples {state}, "
          f"{info['bytes_per_example'] / 1024:.1f} KiB per example ({info['dtype']}) -> "
          f"{features.split_dir(workdir / FEATURES_DIR, split)}")
    acc = info.get("accuracy") or _stored_accuracy(workdir, split)
    if acc:
      print(f"  descriptions name the right location {acc['location']:.1%}, hand "
            f"{acc['hand']:.1%}, object {acc['object']:.1%} (of {acc['num']})")
  return 0


def _stored_accuracy(workdir: Path, split: str) -> dict | None:
  p = features.split_dir(Path(workdir) / FEATURES_DIR, split) / "accuracy.json"
  return json.loads(p.read_text()) if p.exists() else None
