"""Scores that look where the action happens, for the synthetic scenes (the demo's evidence).

Whole-frame PSNR rewards copying the input frame: input and action frame share most pixels. These
scores use what the synthetic generator knows about every held-out example (its action MASK and
the scene metadata: skin colour of the hands, colour of the target object) to ask instead:

  region PSNR    PSNR over the mask's pixels only (the pixels the action changes);
  outside PSNR   PSNR over every other pixel (where nothing changes: is the scene kept?);
  region LPIPS   LPIPS of the crops around the mask (needs the LPIPS weights, see eval/lpips.py);
  placement      is the hand (and the acted-on object) drawn where the ground truth has it?
                 "New" hand pixels of a frame are pixels that are skin-coloured and differ from
                 the input frame; the same for the target object's colour. Per example:
                   hand_iou    IoU of the generated frame's new hand pixels with the ground truth's;
                   hand_hit    1 when the centroid of the generated new hand pixels lies within
                               `hit_radius` (fraction of the frame width) of the ground truth's;
                   hand_error  that centroid distance in frame widths, sqrt(2) (the diagonal,
                               the worst possible) when the generated frame has no new hand;
                   object_iou  as hand_iou for the target object's colour;
                   placement   IoU of the union of both (new hand or new object pixels): the one
                               "is the action where it should be" number.
                 An example whose ground truth has fewer than `min_pixels` such pixels (a skin
                 tone close to the table's, say) does not count for that score; the counts say
                 how many did.

Colour matching is brightness-invariant (the scenes are lit differently, shaded fingers are
darker): a pixel p matches colour c when |p - s c| < tol for the best scale s in [0.7, 1.3].
Everything is numpy on uint8 (H, W, 3) frames; values are per example, then averaged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

SCALE_RANGE = (0.7, 1.3)


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
  colour_tol: float = 22.0     # max distance to the (rescaled) reference colour, 0-255 units
  change_tol: float = 24.0     # a pixel "differs from the input" above this max-channel change
  min_pixels: int = 6          # ground truths with fewer new pixels do not count
  hit_radius: float = 0.125    # centroid within this fraction of the width: a hit


def colour_match(frame: np.ndarray, rgb: Sequence[float], tol: float) -> np.ndarray:
  """(H, W, 3) uint8, an RGB colour -> (H, W) bool: pixels of that colour under any brightness
  in SCALE_RANGE."""
  p = frame.astype(np.float32)
  c = np.asarray(rgb, np.float32)
  s = np.clip(p @ c / max(float(c @ c), 1e-6), *SCALE_RANGE)
  return np.linalg.norm(p - s[..., None] * c, axis=-1) < tol


def changed(frame: np.ndarray, input_frame: np.ndarray, tol: float) -> np.ndarray:
  """(H, W) bool: pixels whose largest channel difference from the input frame exceeds `tol`."""
  return np.abs(frame.astype(np.int16) - input_frame.astype(np.int16)).max(-1) > tol


def new_pixels(frame: np.ndarray, input_frame: np.ndarray, rgb: Sequence[float],
               cfg: PlacementConfig) -> np.ndarray:
  """Pixels of colour `rgb` that were not there in the input frame."""
  return colour_match(frame, rgb, cfg.colour_tol) & changed(frame, input_frame, cfg.change_tol)


def iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.count_nonzero(a | b)
  return float(np.count_nonzero(a & b) / union) if union else 1.0


def centroid(mask: np.ndarray) -> np.ndarray | None:
  """(x, y) in fractions of the width, or None for an empty mask."""
  ys, xs = np.nonzero(mask)
  if not len(xs):
    return None
  return np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / mask.shape[1]


def region_psnr(generated: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
  """PSNR (data range 1) over the masked pixels of (H, W, 3) uint8 frames; mask (H, W) bool.
  NaN for an empty mask, +inf for identical pixels."""
  m = mask.astype(bool)
  if not m.any():
    return float("nan")
  diff = (generated.astype(np.float64) - reference.astype(np.float64))[m] / 255.0
  mse = float(np.mean(np.square(diff)))
  return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def mask_box(mask: np.ndarray, min_size: int) -> tuple[int, int, int, int]:
  """A square (x0, y0, x1, y1) around the mask's pixels, at least `min_size` wide (clipped to
  the frame, shifted inside it rather than shrunk)."""
  h, w = mask.shape
  ys, xs = np.nonzero(mask)
  if not len(xs):
    return 0, 0, w, h
  cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
  side = int(min(max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min(), min_size), h, w))
  x0 = int(min(max(round(cx - side / 2), 0), w - side))
  y0 = int(min(max(round(cy - side / 2), 0), h - side))
  return x0, y0, x0 + side, y0 + side


def region_crops(frames: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int = 64,
                 min_size: int = 24) -> np.ndarray:
  """The square box around each mask, cut from each frame and resized to size x size (bilinear):
  (N, size, size, 3) float32 in [0, 1], what region LPIPS compares."""
  out = []
  for frame, mask in zip(frames, masks):
    x0, y0, x1, y1 = mask_box(mask, min_size)
    crop = Image.fromarray(frame).crop((x0, y0, x1, y1)).resize((size, size), Image.BILINEAR)
    out.append(np.asarray(crop, np.float32) / 255.0)
  return np.stack(out)


def placement_scores(generated: np.ndarray, reference: np.ndarray, input_frame: np.ndarray,
                     meta: Mapping, cfg: PlacementConfig = PlacementConfig()) -> dict[str, float]:
  """One example's placement scores (module doc); a score is NaN when its ground truth has fewer
  than cfg.min_pixels new pixels. meta: the synthetic scene's, with hand_rgb and colour_rgb."""
  nan = float("nan")
  hand_g = new_pixels(generated, input_frame, meta["hand_rgb"], cfg)
  hand_r = new_pixels(reference, input_frame, meta["hand_rgb"], cfg)
  obj_g = new_pixels(generated, input_frame, meta["colour_rgb"], cfg)
  obj_r = new_pixels(reference, input_frame, meta["colour_rgb"], cfg)
  out = {"hand_iou": nan, "hand_hit": nan, "hand_error": nan, "object_iou": nan, "placement": nan}
  if np.count_nonzero(hand_r) >= cfg.min_pixels:
    out["hand_iou"] = iou(hand_g, hand_r)
    cg, cr = centroid(hand_g), centroid(hand_r)
    err = math.sqrt(2.0) if cg is None else float(np.linalg.norm(cg - cr))
    out["hand_error"] = err
    out["hand_hit"] = float(err <= cfg.hit_radius)
  if np.count_nonzero(obj_r) >= cfg.min_pixels:
    out["object_iou"] = iou(obj_g, obj_r)
  if np.count_nonzero(hand_r | obj_r) >= cfg.min_pixels:
    out["placement"] = iou(hand_g | obj_g, hand_r | obj_r)
  return out


PER_EXAMPLE = ("region_psnr", "outside_psnr", "hand_iou", "hand_hit", "hand_error", "object_iou", "placement")


def score_set(generated: Sequence[np.ndarray], references: Sequence[np.ndarray],
              inputs: Sequence[np.ndarray], masks: Sequence[np.ndarray],
              metas: Sequence[Mapping], cfg: PlacementConfig = PlacementConfig(),
              lpips_fn=None) -> tuple[dict[str, float], dict[str, list[float]]]:
  """Every example's scores and their means. All frames (H, W, 3) uint8 of one size, masks
  (H, W) bool. `lpips_fn(a, b)` ((N, S, S, 3) in [0, 1] each -> (N,) distances), when given,
  adds region_lpips over the mask crops.

  Returns (summary, per-example columns): summary[k] is the mean of the examples where k is
  defined, summary[k + "_count"] how many those were, summary[k + "_se"] the standard error of
  that mean (sample standard deviation / sqrt(count); NaN below two examples)."""
  per: dict[str, list[float]] = {k: [] for k in PER_EXAMPLE}
  for g, r, i, m, meta in zip(generated, references, inputs, masks, metas):
    per["region_psnr"].append(region_psnr(g, r, m))
    per["outside_psnr"].append(region_psnr(g, r, ~m.astype(bool)))
    for k, v in placement_scores(g, r, i, meta, cfg).items():
      per[k].append(v)
  if lpips_fn is not None:
    per["region_lpips"] = [float(v) for v in np.asarray(
        lpips_fn(region_crops(generated, masks), region_crops(references, masks)))]
  return summarize(per), per


def _capped(values: Sequence[float]) -> np.ndarray:
  # A region identical to the ground truth has PSNR +inf: the set mean caps it at 100 dB.
  v = np.asarray(values, np.float64)
  return np.where(np.isposinf(v), 100.0, v)


def _mean_se(v: np.ndarray, k: str) -> dict[str, float]:
  ok = v[~np.isnan(v)]
  return {k: float(ok.mean()) if len(ok) else float("nan"), f"{k}_count": int(len(ok)),
          f"{k}_se": float(ok.std(ddof=1) / math.sqrt(len(ok))) if len(ok) > 1 else float("nan")}


def summarize(per: Mapping[str, Sequence[float]],
              select: Sequence[bool] | None = None) -> dict[str, float]:
  """score_set's summary of per-example columns, over the examples `select` marks (all when
  None): per metric its mean, `_count` and `_se`."""
  summary: dict[str, float] = {}
  for k, values in per.items():
    v = _capped(values)
    summary.update(_mean_se(v if select is None else v[np.asarray(select, bool)], k))
  return summary


def paired_differences(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                       select: Sequence[bool] | None = None) -> dict[str, float]:
  """Method a minus method b on the same examples: per metric both have, the mean of the
  per-example differences where both are defined, its `_count` and `_se` (the standard error of
  a paired difference: smaller than either method's own when their errors go together)."""
  out: dict[str, float] = {}
  for k in a:
    if k in b:
      d = _capped(a[k]) - _capped(b[k])
      out.update(_mean_se(d if select is None else d[np.asarray(select, bool)], k))
  return out
