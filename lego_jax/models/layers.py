"""Layer builders the models share, with the partitioning names the sharding rule table reads.

Each builder is a plain flax layer with PyTorch's conventions where they differ from flax's
(explicit conv padding, two-pass norm variance where parity needs it); `ResnetBlock` is the
GroupNorm-SiLU-conv block of the SD autoencoder and UNet, its PyTorch names (`resnet_table`)
beside it as data.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.parallel.sharding import constrain
from lego_jax.weights.keymap import TableRow, norm_rows, param_rows
from lego_jax.weights.mapping import Kind

Array = jax.Array
IMAGE_AXES = ("batch", "height", "width", None)


def as_dtype(d):
  """Config dtypes may arrive as strings ("bfloat16") from config files."""
  return jnp.dtype(d) if isinstance(d, str) else d


def attention_impl(choice: str | None, dtype, head_dim: int) -> str | None:
  """The `implementation` for jax.nn.dot_product_attention: "auto" -> cuDNN where it applies.

  jax runs XLA's attention when `implementation` is None; cuDNN's fused (flash) kernel must be
  asked for, and only takes half precision with head sizes that are multiples of 8 up to 128.
  """
  if choice != "auto":
    return choice
  if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return None


def conv2d(cin: int, cout: int, kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs,
           stride: int = 1, padding: Any = None) -> nnx.Conv:
  """A PyTorch-style Conv2d on NHWC: explicit symmetric padding k//2 unless given.

  Explicit padding matters: flax's "SAME" pads stride-2 convs (0, 1), PyTorch's padding=1 (1, 1).
  """
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nnx.Conv(
      cin, cout, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                        (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
      rngs=rngs)


def dense(din: int, dout: int, names: tuple[str | None, str | None], *, dtype, param_dtype,
          rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
      rngs=rngs)


def group_norm(channels: int, groups: int, eps: float, *, dtype, param_dtype,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance: E[x^2]-E[x]^2 loses digits on large activations and breaks 1e-4 parity.
  return nnx.GroupNorm(
      channels, num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
      rngs=rngs)


def layer_norm(dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs,
               fast_variance: bool = True) -> nnx.LayerNorm:
  """fast_variance=False: the two-pass variance (the UNet's parity on large activations needs it;
  the CLIP towers and the conditioner were matched with flax's default one-pass form)."""
  return nnx.LayerNorm(
      dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=fast_variance,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
      rngs=rngs)


def resize_nearest(x: Array, height: int, width: int) -> Array:
  """PyTorch `interpolate(mode="nearest")` to (height, width): source index floor(i * in / out).

  For an exact 2x this is a repeat; other sizes occur in the UNet when a latent side is not a
  multiple of 2**downsamplings (the upsampled map must match its skip connection).
  """
  _, h, w, _ = x.shape
  if (height, width) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.floor(np.arange(height) * (h / height)).astype(np.int32)
  cols = np.floor(np.arange(width) * (w / width)).astype(np.int32)
  return x[:, rows][:, :, cols]


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv3x3 twice, an optional time-embedding add, a 1x1 shortcut if widths differ.

  (B, H, W, cin) [, temb (B, temb_dim)] -> (B, H, W, cout)
  """

  def __init__(self, cin: int, cout: int, *, groups: int, eps: float, temb_dim: int | None,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = group_norm(cin, groups, eps, **kw)
    self.conv1 = conv2d(cin, cout, 3, **kw)
    self.time_emb_proj = dense(temb_dim, cout, ("embed", "conv_out"), **kw) if temb_dim else None
    self.norm2 = group_norm(cout, groups, eps, **kw)
    self.conv2 = conv2d(cout, cout, 3, **kw)
    self.conv_shortcut = conv2d(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x: Array, temb: Array | None = None) -> Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return constrain(skip + h, IMAGE_AXES)


def resnet_table(compvis: dict[str, str], shortcut: bool, time: bool) -> list[TableRow]:
  """A ResnetBlock's key-map rows; `compvis` names its norm1/conv1/norm2/conv2/shortcut/time
  layers (the VAE and the UNet name them differently there; diffusers names them as we do)."""
  rows = []
  for name in ("norm1", "norm2"):
    rows += norm_rows(name, {"diffusers": name, "compvis": compvis[name]})
  for name in ("conv1", "conv2"):
    rows += param_rows(name, {"diffusers": name, "compvis": compvis[name]}, Kind.CONV2D)
  if time:
    rows += param_rows("time_emb_proj", {"diffusers": "time_emb_proj", "compvis": compvis["time"]},
                       Kind.LINEAR)
  if shortcut:
    rows += param_rows("conv_shortcut", {"diffusers": "conv_shortcut",
                                         "compvis": compvis["shortcut"]}, Kind.CONV2D)
  return rows
