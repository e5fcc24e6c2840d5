"""Action-region scores on frames the synthetic generator renders (no model involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lego_jax.data import synthetic
from lego_jax.eval import action_region as ar

SIZE = 64


def _examples(count: int, seed: int = 3):
  """(example, scene, action) triples of the synthetic test split."""
  out = []
  index = 0
  while len(out) < count:
    rng = synthetic.scene_rng(seed, "test", index)
    scene = synthetic.sample_scene(rng)
    action = synthetic.sample_actions(scene, rng, 1)[0]
    out.append((synthetic.render_example(scene, action, SIZE), scene, action))
    index += 1
  return out


@pytest.fixture(scope="module")
def examples():
  return _examples(12)


def test_colour_match_ignores_brightness_but_not_hue():
  skin = (224, 172, 138)
  frame = np.array([[[round(0.8 * c) for c in skin], [round(1.1 * c) for c in skin],
                     list(skin), [44, 92, 206], [150, 150, 160]]], np.uint8)
  assert ar.colour_match(frame, skin, 22.0).tolist() == [[True, True, True, False, False]]


def test_region_psnr_counts_only_the_masked_pixels():
  ref = np.full((8, 8, 3), 100, np.uint8)
  gen = ref.copy()
  gen[:2] = 100 + 25          # inside the mask: error 25/255
  gen[6:] = 0                 # outside: ignored
  mask = np.zeros((8, 8), bool)
  mask[:4] = True
  mse = (25 / 255) ** 2 / 2   # half of the masked pixels are off by 25
  assert ar.region_psnr(gen, ref, mask) == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)
  assert ar.region_psnr(ref, ref, mask) == math.inf
  assert math.isnan(ar.region_psnr(gen, ref, np.zeros((8, 8), bool)))


def test_new_hand_pixels_of_the_ground_truth_lie_in_the_action_mask(examples):
  # The colour model must find the rendered hand: skin-coloured changed pixels, nearly all inside
  # the generator's own mask of changed pixels, and enough of them in every example.
  cfg = ar.PlacementConfig()
  for ex, _, _ in examples:
    hand = ar.new_pixels(ex.target, ex.input, ex.meta["hand_rgb"], cfg)
    mask = ex.mask > 127
    assert hand.sum() >= 15
    assert (hand & mask).sum() / hand.sum() > 0.95


def test_placement_is_perfect_for_the_truth_and_zero_for_a_copy(examples):
  for ex, _, _ in examples:
    truth = ar.placement_scores(ex.target, ex.target, ex.input, ex.meta)
    assert truth["placement"] == 1.0 and truth["hand_iou"] == 1.0
    assert truth["hand_hit"] == 1.0 and truth["hand_error"] == 0.0
    copy = ar.placement_scores(ex.input, ex.target, ex.input, ex.meta)
    assert copy["placement"] == 0.0 and copy["hand_iou"] == 0.0
    assert copy["hand_hit"] == 0.0 and copy["hand_error"] == pytest.approx(math.sqrt(2))


def test_placement_ranks_the_right_place_above_a_wrong_one():
  # The same scene acted on at another object: the hand goes elsewhere, the score must drop.
  compared = 0
  for index in range(40):
    rng = synthetic.scene_rng(5, "test", index)
    scene = synthetic.sample_scene(rng)
    if len(scene.objects) < 2:
      continue
    a, b = synthetic.sample_actions(scene, rng, 2)
    if scene.objects[a.target].column == scene.objects[b.target].column:
      continue
    right = synthetic.render_example(scene, a, SIZE)
    wrong = synthetic.render_example(scene, b, SIZE, frame=right.input)
    s = ar.placement_scores(wrong.target, right.target, right.input, right.meta)
    assert s["hand_iou"] < 0.5, (index, s)
    assert s["hand_error"] > 0.1, (index, s)
    compared += 1
  assert compared >= 5


def test_mask_box_is_square_inside_the_frame_and_covers_the_mask():
  mask = np.zeros((64, 64), bool)
  mask[2:6, 55:62] = True
  x0, y0, x1, y1 = ar.mask_box(mask, min_size=24)
  assert (x1 - x0, y1 - y0) == (24, 24)
  assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
  assert x0 <= 55 and x1 >= 62 and y0 <= 2 and y1 >= 6
  big = np.zeros((64, 64), bool)
  big[10:50, 5:20] = True
  assert ar.mask_box(big, 8) == (0, 10, 40, 50)
  crops = ar.region_crops([np.zeros((64, 64, 3), np.uint8)], [mask], size=32)
  assert crops.shape == (1, 32, 32, 3) and crops.dtype == np.float32


def test_score_set_means_counts_and_region_lpips(examples):
  frames = [(ex.target, ex.target, ex.input, ex.mask > 127, ex.meta) for ex, _, _ in examples]
  gen, ref, inp, masks, metas = map(list, zip(*frames))
  gen[0] = inp[0]  # one copy of the input among perfect frames
  seen = []

  def fake_lpips(a, b):
    seen.append((a.shape, b.shape))
    return np.abs(a - b).mean(axis=(1, 2, 3))

  summary, per = ar.score_set(gen, ref, inp, masks, metas, lpips_fn=fake_lpips)
  n = len(examples)
  assert seen == [((n, 64, 64, 3), (n, 64, 64, 3))]
  assert summary["placement_count"] == n and summary["hand_iou_count"] == n
  assert summary["placement"] == pytest.approx((n - 1) / n)
  assert summary["hand_hit"] == pytest.approx((n - 1) / n)
  # Identical regions have PSNR +inf; the mean caps them at 100 dB.
  assert summary["region_psnr"] == pytest.approx((per["region_psnr"][0] + 100.0 * (n - 1)) / n)
  assert per["region_psnr"][0] < 30
  # Outside the mask the copy of the input is the ground truth up to what the action moved
  # beyond its mask (nothing, in these scenes): equal pixels, +inf, capped like the region's.
  exp_outside = ar.region_psnr(inp[0], ref[0], ~masks[0])
  assert per["outside_psnr"][0] == exp_outside and per["outside_psnr"][1:] == [math.inf] * (n - 1)
  # Standard errors: sample std / sqrt(n) of the per-example values (inf capped at 100).
  hits = np.asarray(per["hand_hit"], np.float64)
  assert summary["hand_hit_se"] == pytest.approx(hits.std(ddof=1) / math.sqrt(n))
  capped = np.minimum(np.asarray(per["region_psnr"]), 100.0)
  assert summary["region_psnr_se"] == pytest.approx(capped.std(ddof=1) / math.sqrt(n))
  assert per["region_lpips"][0] > 0 and per["region_lpips"][1:] == [0.0] * (n - 1)
  # Object scores count only examples whose ground truth moves object-coloured pixels.
  assert 0 <= summary["object_iou_count"] <= n
