"""`lego-jax describe --image=FRAME --action="cut the carrot"`: the trained VLLM's enriched
description of one frame, printed (the same prompt, view and sampling as `lego-jax extract`).

The inputs are checked before any model is loaded: a missing or unreadable image or an empty
action ends in one line on stderr and exit code 2; nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from lego_jax.errors import UserError
from lego_jax.data import images
from lego_jax.infer import extract
from lego_jax.train import vllm


# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "clip_vision", "llama", "llava", "vllm_train", "vllm_generate")
CLI_FLAGS = ("image", "action")


def read_frame(path: str | None) -> np.ndarray:
  """The frame at `path` as (H, W, 3) uint8; FileNotFoundError / UserError when it is not one."""
  if not path:
    raise UserError("give the input frame: --image=PATH (a JPEG or PNG)")
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"image not found: {p}")
  try:
    return images.decode_rgb(p.read_bytes())
  except images.ImageError as e:
    raise UserError(f"cannot read image {p}: {e}") from None


def check_action(text: str | None) -> str:
  action = (text or "").strip()
  if not action:
    raise UserError("the action is empty: give it as --action=\"cut the carrot\"")
  return action


def describe(cfg, model, tok, frame: np.ndarray, action: str, mesh=None) -> extract.Described:
  """One frame (H, W, 3) uint8 + action -> the description with its tokens, H_i and H_t."""
  describer = extract.describer_for(cfg, model, tok, mesh, rows=1)
  pixels = images.clip_view(frame, int(cfg.data.vllm_image_size))[None]
  return describer([action], pixels, extract.batch_key(int(cfg.vllm_generate.seed), "describe", 0))[0]


def main(cfg, workdir: Path) -> int:
  frame = read_frame(flags.FLAGS["image"].value)
  action = check_action(flags.FLAGS["action"].value)
  mesh = extract.local_mesh(cfg)
  model, tok = vllm.load_trained(cfg, workdir, dtype=cfg.vllm_generate.compute_dtype, mesh=mesh)
  print(describe(cfg, model, tok, frame, action, mesh).description)
  return 0
