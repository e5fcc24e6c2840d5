"""The metric-side image ops against PyTorch (interpolation) and set pairing / bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lego_jax.eval import images as im
from lego_jax.eval.psnr import psnr


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("src,dst", [((37, 53), (299, 299)), ((256, 456), (224, 398)),
                                     ((40, 30), (17, 64)), ((9, 9), (9, 9))])
def test_resize_matches_torch_interpolate(mode, src, dst):
  x = np.random.default_rng(0).uniform(0, 1, (2,) + src + (3,)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=dst, mode=mode,
                       align_corners=False).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(im.resize(x, dst, mode))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_short_side_resize_and_center_crop_like_torchvision():
  # torchvision Resize(224): short side 224, long side truncated; CenterCrop rounds the offset.
  assert im.short_side_size(256, 456, 224) == (224, 399)  # 224 * 456 / 256 = 399.0
  assert im.short_side_size(256, 455, 224) == (224, 398)  # 398.1 truncated
  assert im.short_side_size(456, 256, 224) == (399, 224)
  assert im.short_side_size(225, 225, 224) == (224, 224)
  x = np.arange(5 * 8).reshape(1, 5, 8, 1)
  c = np.asarray(im.center_crop(x, 3))
  # top = round(1.0) = 1, left = round(2.5) = 2 (Python rounds half to even)
  np.testing.assert_array_equal(c[0, :, :, 0], x[0, 1:4, 2:5, 0])


def test_psnr_formula():
  a = np.zeros((2, 4, 4, 3), np.float32)
  b = a.copy()
  b[0] += 0.1
  b[1, 0, 0, 0] = 1.0
  got = np.asarray(psnr(b, a))
  np.testing.assert_allclose(got[0], 20.0, rtol=1e-5)                       # mse 0.01
  np.testing.assert_allclose(got[1], 10 * np.log10(48.0), rtol=1e-5)        # mse 1/48


def _write(path, size=(8, 6), color=(10, 20, 30), mode="RGB"):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def test_match_sets_pairs_by_relative_path_ignoring_suffix(tmp_path):
  _write(tmp_path / "ref/c1/a1/0001.jpg")
  _write(tmp_path / "ref/c1/a2/0001.jpg")
  _write(tmp_path / "gen/c1/a1/0001.png")
  _write(tmp_path / "gen/c1/a2/0001.png")
  _write(tmp_path / "inp/c1/a1/0001.jpg")
  _write(tmp_path / "inp/c1/a2/0001.jpg")
  pairs = im.match_sets(tmp_path / "gen", tmp_path / "ref", tmp_path / "inp")
  assert [p.key for p in pairs] == ["c1/a1/0001", "c1/a2/0001"]
  assert pairs[0].generated.suffix == ".png" and pairs[0].input.parent.name == "a1"


def test_mismatched_sets_list_every_culprit_capped(tmp_path):
  for i in range(30):
    _write(tmp_path / f"ref/{i:03d}.jpg")
  for i in range(5, 32):
    _write(tmp_path / f"gen/{i:03d}.png")
  with pytest.raises(im.ImageSetError) as e:
    im.match_sets(tmp_path / "gen", tmp_path / "ref", limit=3)
  msg = str(e.value).splitlines()
  assert "references with no generated image (5):" in msg
  assert "  000" in msg and "  002" in msg and "  003" not in msg and "  ... and 2 more" in msg
  assert "generated images with no reference (2):" in msg and "  031" in msg
  pairs = im.match_sets(tmp_path / "gen", tmp_path / "ref", allow_missing=True)
  assert len(pairs) == 25


def test_unreadable_and_grey_images(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  with pytest.raises(im.ImageSetError, match="bad.png: unreadable image"):
    im.read_rgb(bad)
  _write(tmp_path / "g.png", mode="L", color=(77,))
  g = im.read_rgb(tmp_path / "g.png")
  assert g.shape == (6, 8, 3) and g.dtype == np.uint8 and np.all(g == 77)
