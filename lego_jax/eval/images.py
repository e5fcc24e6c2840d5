"""Image reading, pairing and the exact resizes the reference metric code applies.

The published numbers come from PyTorch code that resizes with `F.interpolate` (bilinear or
bicubic, `align_corners=False`, no antialiasing) and torchvision's tensor `Resize`/`CenterCrop`.
`jax.image.resize` differs (Keys a=-0.5 cubic, antialiasing on downscale), so the interpolation
matrices here follow PyTorch's formulas and are applied as two matmuls (separable, exact).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageSetError(ValueError):
  """Generated / reference / input sets that do not line up, or images that cannot be read."""


def culprit_listing(title: str, items: Sequence[str], limit: int = 20) -> list[str]:
  """One line per culprit, capped: long listings end with a count of the rest."""
  if not items:
    return []
  lines = [f"{title} ({len(items)}):"]
  lines += [f"  {x}" for x in list(items)[:limit]]
  if len(items) > limit:
    lines.append(f"  ... and {len(items) - limit} more")
  return lines


def list_images(root: str | os.PathLike) -> dict[str, Path]:
  """Relative path WITHOUT suffix -> file, for every image under `root` (recursive).

  The key drops the suffix so a generated `x/y/0001.png` pairs with a reference `x/y/0001.jpg`.
  """
  root = Path(root)
  if not root.is_dir():
    raise ImageSetError(f"not a directory: {root}")
  out: dict[str, Path] = {}
  dupes = []
  for p in sorted(root.rglob("*")):
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
      key = p.relative_to(root).with_suffix("").as_posix()
      if key in out:
        dupes.append(f"{out[key].relative_to(root)} and {p.relative_to(root)}")
      out[key] = p
  if dupes:
    raise ImageSetError("\n".join(culprit_listing(
        f"{root}: several images share a name (differ only in suffix)", dupes)))
  return out


@dataclasses.dataclass(frozen=True)
class Pair:
  key: str                  # relative path without suffix
  generated: Path
  reference: Path
  input: Path | None = None  # the input frame (EgoVLP+), when an inputs directory is given


def release_inputs(inputs: dict[str, Path], reference: dict[str, Path]) -> dict[str, Path]:
  """Each reference key's input frame: the input of the same relative path when there is one
  (what `lego-jax generate` writes), else the release's rule (all_metrics_in_one.py, EgoVLP+):
  the first file, in sorted name order, of the input directory's <clip>/<action>/ folder that is
  not the action frame itself, so the release's `val/` folders (input and action frame side by
  side) serve as they are."""
  folders: dict[str, list[str]] = {}
  for k in sorted(inputs):
    parent, _, _ = k.rpartition("/")
    folders.setdefault(parent, []).append(k)
  out = {}
  for k in reference:
    if k in inputs:
      out[k] = inputs[k]
      continue
    if k.count("/") < 2:  # the rule is for <clip>/<action>/<frame> keys only
      continue
    parent, _, _ = k.rpartition("/")
    others = sorted((inputs[c] for c in folders.get(parent, []) if c != k), key=lambda p: p.name)
    if others:
      out[k] = others[0]
  return out


def match_sets(generated: str | os.PathLike, reference: str | os.PathLike,
               inputs: str | os.PathLike | None = None, allow_missing: bool = False,
               limit: int = 20) -> list[Pair]:
  """Pairs generated and reference images by relative path (suffix ignored).

  Every reference needs a generated image and vice versa; with `inputs`, every reference needs an
  input frame too. Mismatches raise ImageSetError listing each culprit (capped at `limit` per
  kind), unless `allow_missing`, which keeps the intersection.
  """
  gen, ref = list_images(generated), list_images(reference)
  inp = release_inputs(list_images(inputs), ref) if inputs else None
  missing = sorted(k for k in ref if k not in gen)
  extra = sorted(k for k in gen if k not in ref)
  no_input = sorted(k for k in ref if k in gen and inp is not None and k not in inp)
  if not ref:
    raise ImageSetError(f"no images in the reference directory {reference}")
  if (missing or extra or no_input) and not allow_missing:
    lines = [f"generated ({generated}) and reference ({reference}) sets do not match:"]
    lines += culprit_listing("references with no generated image", missing, limit)
    lines += culprit_listing("generated images with no reference", extra, limit)
    lines += culprit_listing(f"pairs with no input frame in {inputs}", no_input, limit)
    lines.append("(pass --allow_missing to score only the complete pairs)")
    raise ImageSetError("\n".join(lines))
  keys = [k for k in sorted(ref) if k in gen and (inp is None or k in inp)]
  if not keys:
    raise ImageSetError(f"no complete pairs between {generated} and {reference}")
  return [Pair(k, gen[k], ref[k], inp[k] if inp is not None else None) for k in keys]


def read_rgb(path: str | os.PathLike) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3); grey/alpha/palette images are converted to RGB."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # PIL raises many types for broken files; all mean "unreadable"
    raise ImageSetError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def to_unit(x: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1] (torchvision's ToTensor)."""
  return np.asarray(x, np.float32) / 255.0


# ---- PyTorch-exact interpolation (align_corners=False, no antialias) ----

def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def interp_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """(out_size, in_size) matrix M with out = M @ in along one axis, as torch computes it.

  Source coordinate (dst + 0.5) * in/out - 0.5; bilinear clamps it at 0 and the upper neighbour
  at the border; bicubic (a = -0.75) takes 4 taps with indices clamped into the image.
  """
  scale = np.float32(in_size / out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = (dst + np.float32(0.5)) * scale - np.float32(0.5)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if mode == "bilinear":
    src = np.maximum(src, 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float64)
    np.add.at(m, (rows, i0), 1 - w1)
    np.add.at(m, (rows, i1), w1)
  elif mode == "bicubic":
    i = np.floor(src).astype(np.int64)
    t = (src - i).astype(np.float64)
    for k, w in zip(range(-1, 3), (_cubic(t + 1), _cubic(t), _cubic(1 - t), _cubic(2 - t))):
      np.add.at(m, (rows, np.clip(i + k, 0, in_size - 1)), w)
  else:
    raise ValueError(f"unknown interpolation mode {mode!r}")
  return m.astype(np.float32)


def resize(x: jnp.ndarray, size: tuple[int, int], mode: str = "bilinear") -> jnp.ndarray:
  """torch `F.interpolate(x, size, mode, align_corners=False)` for NHWC (or HWC) arrays."""
  h, w = x.shape[-3], x.shape[-2]
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(interp_matrix(h, size[0], mode))
  mw = jnp.asarray(interp_matrix(w, size[1], mode))
  y = jnp.einsum("oh,...hwc->...owc", mh, x, precision="highest")
  return jnp.einsum("pw,...owc->...opc", mw, y, precision="highest")


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
  """torchvision `Resize(short)`: the short side becomes `short`, the long one truncates."""
  if w <= h:
    return int(short * h / w), short
  return short, int(short * w / h)


def center_crop(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """torchvision `CenterCrop(size)` on (..., H, W, C); offsets rounded like Python's round()."""
  h, w = x.shape[-3], x.shape[-2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return x[..., top:top + size, left:left + size, :]
