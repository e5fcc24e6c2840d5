"""sampler.colour_match="median": each decoded frame shifted onto the input frame's colour by the
per-channel median of (input - frame) (lego_jax/infer/ldm.py, match_colour)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax.config import ConfigError
from lego_jax.infer import sampler
from lego_jax.infer.ldm import match_colour


def test_match_colour_removes_a_whole_frame_tint_and_keeps_the_edit():
  rng = np.random.default_rng(0)
  inputs = rng.uniform(-1, 1, (3, 16, 12, 3)).astype(np.float32)
  tint = np.array([[0.2, -0.1, 0.05], [-0.3, 0.0, 0.1], [0.0, 0.25, -0.2]], np.float32)
  frames = inputs - tint[:, None, None, :]
  edit = rng.uniform(-1, 1, (3, 5, 6, 3)).astype(np.float32)   # 30 of 192 pixels drawn anew
  frames[:, 2:7, 3:9] = edit
  got = np.asarray(match_colour(jnp.asarray(frames), jnp.asarray(inputs)))
  keep = np.ones((16, 12), bool)
  keep[2:7, 3:9] = False
  np.testing.assert_allclose(got[:, keep], inputs[:, keep], atol=1e-6)   # the tint is gone
  np.testing.assert_allclose(got[:, 2:7, 3:9], edit + tint[:, None, None, :], atol=1e-6)
  # against NumPy's median on frames with no structure at all
  a = rng.normal(size=(2, 7, 5, 3)).astype(np.float32)
  b = rng.normal(size=(2, 7, 5, 3)).astype(np.float32)
  want = a + np.median((b - a).reshape(2, -1, 3), axis=1)[:, None, None, :]
  np.testing.assert_allclose(np.asarray(match_colour(jnp.asarray(a), jnp.asarray(b))), want,
                             atol=1e-6)


def test_colour_match_setting_is_checked():
  sampler.check_settings({"colour_match": "none"})
  sampler.check_settings({"colour_match": "median"})
  for bad in ("mean", "", True):
    with pytest.raises(ConfigError, match="cfg.sampler.colour_match"):
      sampler.check_settings({"colour_match": bad})
