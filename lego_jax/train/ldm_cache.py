"""train-ldm's frozen-encoder cache (`ldm_train.cache_frozen=True`): what the frozen VAE and CLIP
text encoder give for each training example, computed once before training instead of in every
step (the release computes them in the step: the default).

What a step needs from the frozen encoders is deterministic given the example, except the target
latent, which is a fresh posterior SAMPLE each step: so the cache holds the posterior itself.
Record i of WORKDIR/ldm_cache/<split>/ belongs to pair i of the split (as the VLLM features):
  input_mean     (h, w, c)   VAE posterior mean of the input frame (its MODE: the input latent)
  target_mean, target_logvar (h, w, c)   the target frame's posterior
  text           (L, D)      CLIP text hidden states of the example's text (ldm_train.text_source)
and, when data.hflip_prob > 0, the three latents of the horizontally flipped frames
(flipped_input_mean, ...): the pipeline's joint flip then picks a variant without re-encoding.
Stored float32. Same part layout and atomic part writes as lego_jax/data/features.py (an
interrupted build resumes at the first missing part); info.json holds a fingerprint of the
frozen weights and settings, and a cache built from other weights or settings is rebuilt.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import grain
import jax
import msgpack
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lego_jax.data import features as store
from lego_jax.data import images, pipeline, records
from lego_jax.models import lego_ldm

CACHE_DIR = "ldm_cache"
LATENTS = lego_ldm.CACHED_LATENTS
PART_SIZE = 256


def cache_dir(workdir: str | Path) -> Path:
  return Path(workdir) / CACHE_DIR


def fingerprint(frozen_params, settings: dict) -> str:
  """sha256 over the frozen encoders' weights (every leaf's bytes, in tree order) and settings."""
  h = hashlib.sha256(repr(sorted(settings.items())).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(frozen_params):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def settings_of(cfg, num_records: int, workdir: Path) -> dict:
  source = lego_ldm.train_text_source(cfg)
  s = {"image_size": int(cfg.data.image_size), "text_source": source,
       "flips": bool(cfg.data.hflip_prob > 0), "num_records": int(num_records)}
  if source == "generated":  # the text is the VLLM's: tie the cache to that extraction
    s["features"] = store.read_info(Path(workdir) / "features", "train").get("settings")
  return s


def encode(blobs: dict[str, np.ndarray], index: int) -> bytes:
  out = {"index": int(index)}
  for k, v in blobs.items():
    v = np.asarray(v, np.float32)
    out[k] = {"shape": list(v.shape), "data": v.tobytes()}
  return msgpack.packb(out, use_bin_type=True)


def decode(blob: bytes) -> dict:
  r = msgpack.unpackb(blob, raw=False)
  out = {"index": r.pop("index")}
  for k, v in r.items():
    out[k] = np.frombuffer(v["data"], np.float32).reshape(v["shape"])
  return out


def make_encoder(graphdefs):
  """jitted (frozen params, uint8 input, uint8 target, text ids, flip?) -> the cached arrays."""
  def encode_frames(frozen, inputs, targets, ids, with_flips: bool):
    vae = nnx.merge(graphdefs["vae"], frozen["vae"])
    clip_text = nnx.merge(graphdefs["clip_text"], frozen["clip_text"])
    out = {"text": clip_text(ids)}
    variants = [("", inputs, targets)]
    if with_flips:  # the pipeline's flip mirrors the width axis of NHWC frames
      variants.append(("flipped_", inputs[:, :, ::-1], targets[:, :, ::-1]))
    for prefix, x, y in variants:
      out[prefix + "input_mean"], _ = vae.encode(images.frames_to_unit_range(x))
      out[prefix + "target_mean"], out[prefix + "target_logvar"] = vae.encode(
          images.frames_to_unit_range(y))
    return out

  return jax.jit(encode_frames, static_argnames="with_flips")


def build(cfg, workdir: Path, graphdefs, frozen, text_ids, split: str = "train",
          batch_size: int = 16) -> dict:
  """Builds (or keeps, or resumes) WORKDIR/ldm_cache/<split>; returns its info. Every process
  encodes its own parts (part k on process k % count) and waits for the others."""
  directory = cache_dir(workdir)
  n = len(records.open_split(pipeline.records_dir_of(cfg.data, workdir), split, records.PAIRS))
  settings = settings_of(cfg, n, workdir)
  frozen = local_copy(frozen)
  info = {"split": split, "complete": False, "num_records": n, "part_size": PART_SIZE,
          "num_parts": math.ceil(n / PART_SIZE), "settings": settings,
          "fingerprint": fingerprint(frozen, settings)}
  try:
    previous = store.read_info(directory, split)
  except FileNotFoundError:
    previous = None
  if previous is not None and previous.get("fingerprint") != info["fingerprint"]:
    if jax.process_index() == 0:
      print(f"train-ldm: {store.split_dir(directory, split)} was built from other frozen weights "
            "or settings: rebuilding it")
      shutil.rmtree(store.split_dir(directory, split))
    previous = None
    _sync(f"lego_ldm_cache_clear_{split}")
  if previous is not None and store.is_complete(directory, split):
    return dict(previous, kept=True)
  if previous is None and jax.process_index() == 0:
    store.write_info(directory, split, info)

  encoder = make_encoder(graphdefs)
  done = store.done_parts(directory, split)
  count, me = jax.process_count(), jax.process_index()
  mine = [k for k in range(info["num_parts"]) if k % count == me and k not in done]
  with tqdm(total=sum(min(PART_SIZE, n - k * PART_SIZE) for k in mine), unit="ex",
            desc=f"ldm cache {split}", dynamic_ncols=True, disable=me != 0) as bar:
    for k in mine:
      lo, hi = k * PART_SIZE, min(n, (k + 1) * PART_SIZE)
      blobs = []
      for batch in _batches(cfg, workdir, split, lo, hi, batch_size):
        # Short batches padded to one shape: one compiled encoder for the whole build.
        pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - len(a), axis=0)])
        out = jax.device_get(encoder(frozen, pad(batch["input"]), pad(batch["target"]),
                                     pad(text_ids(batch)), with_flips=settings["flips"]))
        for row, index in enumerate(batch["index"]):
          blobs.append(encode({key: v[row] for key, v in out.items()}, int(index)))
        bar.update(len(batch["index"]))
      store.write_part(directory, split, k, blobs)
  _sync(f"lego_ldm_cache_{split}")
  if me == 0:
    total = sum(store.part_path(directory, split, k).stat().st_size
                for k in range(info["num_parts"]))
    info = dict(info, complete=True, total_bytes=total, bytes_per_example=total / max(n, 1))
    store.write_info(directory, split, info)
  _sync(f"lego_ldm_cache_done_{split}")
  return store.read_info(directory, split)


def _batches(cfg, workdir, split, lo, hi, batch_size):
  """Ordered, unflipped batches of examples [lo, hi) of the split, made by the training
  pipeline's own operations (frames and texts exactly as a training step would see them)."""
  extras, extra_ops = lego_ldm.feature_extras(cfg, workdir, split)
  source = pipeline.ZippedSource(
      records.open_split(pipeline.records_dir_of(cfg.data, workdir), split, records.PAIRS), extras)
  ds = grain.MapDataset.source(source)[lo:hi]
  for op in [pipeline.DecodePair(), pipeline.ResizePair(int(cfg.data.image_size), None),
             pipeline.ToArrays()] + list(extra_ops):
    ds = ds.map(op)
  yield from ds.batch(batch_size, drop_remainder=False)


def local_copy(tree):
  """The frozen parameters whole on this process's first device: each process encodes its own
  parts, so the encoder must not be a program spanning every process's devices."""

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.device_put(jax.tree.map(fetch, tree), jax.local_devices()[0])


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def open_source(workdir: Path, split: str = "train"):
  directory = cache_dir(workdir)
  if not store.is_complete(directory, split):
    raise FileNotFoundError(f"the frozen-encoder cache {store.split_dir(directory, split)} is "
                            "incomplete: train-ldm builds it before training")
  info = store.read_info(directory, split)
  paths = [str(store.part_path(directory, split, k)) for k in range(info["num_parts"])]
  records.check_files(paths, redo=f"delete {directory} and train-ldm builds it again")
  return grain.sources.ArrayRecordDataSource(paths)


class DecodeCache(grain.transforms.Map):
  """Zipped "cache" bytes -> input_mean, target_mean, target_logvar (the flipped variants when
  the pipeline's joint flip flipped this example) and text."""

  def map(self, ex: dict) -> dict:
    r = decode(ex.pop("cache"))
    if r["index"] != ex["index"]:
      raise ValueError(f"cache record {r['index']} zipped with pair {ex['index']}: the cache was "
                       "built from a different ordering of the split")
    prefix = "flipped_" if bool(ex.get("flipped", False)) else ""
    if prefix and "flipped_input_mean" not in r:
      raise ValueError("the frozen-encoder cache holds no flipped latents but the pipeline "
                       "flipped an example: it was built with data.hflip_prob=0")
    for k in LATENTS:
      ex[k] = r[prefix + k]
    ex["text"] = r["text"]
    return ex
