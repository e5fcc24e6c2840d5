"""PSNR with data range 1.0 on [0, 1] images, one value per image (then averaged over the set).

The release computes torchmetrics' PSNR(data_range=1.0) on each pair: 10 log10(1 / MSE), the MSE
over all pixels and channels of that one pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def psnr(generated: jnp.ndarray, reference: jnp.ndarray) -> jnp.ndarray:
  """Per-image PSNR in dB.

  Args:
    generated, reference: (B, H, W, C) float in [0, 1], same shape.
  Returns:
    (B,) float32; +inf where the images are identical.
  """
  diff = generated.astype(jnp.float32) - reference.astype(jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / mse)
