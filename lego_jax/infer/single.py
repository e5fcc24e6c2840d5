"""`lego-jax generate --image=FRAME --action="cut the carrot" [--out=DIR]`: one frame, end to end.

The trained VLLM writes the enriched description R and gives H_i / H_t; the LDM then generates
the action frame, decoded and resized back to the input's size. Inputs are checked before any
model is loaded (unreadable image, wrong extension, tiny or huge images, empty action): one line
on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from lego_jax.data import images
from lego_jax.errors import UserError
from lego_jax.infer import describe as describe_lib
from lego_jax.infer import extract
from lego_jax.infer import ldm as ldm_infer
from lego_jax.models import lego_ldm
from lego_jax.train import vllm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_SIDE, MAX_SIDE = 16, 8192


def check_frame(path: str | None) -> np.ndarray:
  if path and Path(path).suffix.lower() not in IMAGE_SUFFIXES:
    raise UserError(f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
  return check_size(describe_lib.read_frame(path), path)


def check_size(frame: np.ndarray, name: str) -> np.ndarray:
  """`frame` (H, W, 3) when both sides are within MIN_SIDE..MAX_SIDE, else UserError."""
  h, w = frame.shape[:2]
  if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
    raise UserError(f"{name}: {w}x{h} pixels is outside the supported {MIN_SIDE}..{MAX_SIDE} "
                    "pixels per side")
  return frame


def generate_frame(cfg, models, text_ids, frame: np.ndarray, described, action: str, key, *,
                   text_scale=None, image_scale=None, num_steps: int | None = None) -> np.ndarray:
  """One frame (H, W, 3) uint8, its VLLM output `described` and the action -> the LDM's frame
  (S, S, 3) uint8 at the model's size S. `models`, `text_ids`: infer.ldm.load_trained /
  lego_ldm.TextIds of the run the config describes (its text_source picks the description or the action); the
  sampler settings default to cfg.sampler's (run_batch)."""
  text = {"generated": described.description, "annotation": described.description,
          "action": action}[cfg.ldm_train.text_source]
  size = int(cfg.data.image_size)
  batch = {
      "input": images.to_unit_range(images.squash(frame, size))[None],
      "h_img": described.h_img.astype(np.float32)[None],
      "h_txt": _pad(described.h_txt.astype(np.float32), cfg.conditioner.text_len)[None],
  }
  decoded = ldm_infer.run_batch(models, batch, text_ids.tokenize([text]), text_ids.empty(),
                                cfg, key, text_scale=text_scale, image_scale=image_scale,
                                num_steps=num_steps)
  return ldm_infer.to_uint8(np.asarray(decoded), cfg.sampler.output_norm)[0]


def generate_one(cfg, workdir: Path, image: str | None, action: str | None,
                 out: str | None) -> int:
  frame = check_frame(image)
  action = describe_lib.check_action(action)
  out_dir = Path(out) if out else Path(workdir) / "generated" / "single"

  mesh = extract.local_mesh(cfg)
  model, tok = vllm.load_trained(cfg, workdir, dtype=cfg.vllm_generate.compute_dtype, mesh=mesh)
  described = describe_lib.describe(cfg, model, tok, frame, action, mesh)
  del model

  models = ldm_infer.load_trained(cfg, workdir, use_ema=cfg.sampler.use_ema)
  gen = generate_frame(cfg, models, lego_ldm.TextIds(cfg, workdir), frame, described, action,
                       jax.random.key(cfg.sampler.seed))
  h, w = frame.shape[:2]
  out_dir.mkdir(parents=True, exist_ok=True)
  name = Path(image).stem
  Image.fromarray(gen).resize((w, h), Image.BICUBIC).save(out_dir / f"{name}_action.png")
  (out_dir / f"{name}_action.json").write_text(json.dumps(
      {"image": str(image), "action": action, "description": described.description}, indent=2))
  print(f"description: {described.description}")
  print(f"generate: {out_dir / f'{name}_action.png'}")
  return 0


def _pad(h: np.ndarray, length: int) -> np.ndarray:
  out = np.zeros((length, h.shape[1]), np.float32)
  n = min(length, h.shape[0])
  out[:n] = h[:n]
  return out
