"""The one FLOP counter (lego_jax/bench/flops.py), used by `lego-jax bench` and `lego-jax plan`:
matmuls, convolutions, scans times their length, gradients and remat, the bytes of the counted
products; on the UNet it equals PyTorch's FlopCounterMode exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from diffusers.models.attention_processor import AttnProcessor
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

from lego_jax import config as config_lib
from lego_jax.bench import flops, torch_baseline
from lego_jax.models.unet import UNet, UNetConfig


def test_matmuls_convolutions_scans_gradients_and_bytes():
  def layer(x, w):
    return jnp.tanh(x @ w)

  def model(x, w, k):
    y, _ = jax.lax.scan(lambda c, _: (layer(c, w), None), x, None, length=5)
    img = jax.lax.conv_general_dilated(y[None, :, :, None], k, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(img)

  x, w, k = jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones((3, 3, 1, 2))
  matmul = 2 * 4 * 8 * 8
  conv = 2 * (4 * 8 * 2) * 1 * 9
  counted = flops.count_jaxpr(jax.make_jaxpr(model)(x, w, k))
  assert (counted.total, counted.matmul, counted.conv) == (5 * matmul + conv, 5 * matmul, conv)
  # Bytes: each matmul reads x and w and writes its result, each convolution its image, kernel
  # and output (float32), the scanned one 5 times.
  matmul_bytes, conv_bytes = 4 * (4 * 8 + 8 * 8 + 4 * 8), 4 * (4 * 8 + 3 * 3 * 2 + 4 * 8 * 2)
  assert counted.bytes == 5 * matmul_bytes + conv_bytes
  assert counted.loops == [("scan", 5)]
  # Gradients w.r.t. x and w: forward, then two matmuls per layer and two convolutions back.
  grads = jax.make_jaxpr(jax.grad(model, argnums=(0, 1)))(x, w, k)
  assert flops.count_jaxpr(grads).total == 3 * 5 * matmul + conv + conv
  # A rematerialised layer runs its forward twice.
  loss = lambda f: lambda x, w: jnp.sum(f(x, w))  # noqa: E731
  plain = flops.count_flops(jax.grad(loss(layer), argnums=(0, 1)), x, w)
  remat = flops.count_flops(jax.grad(loss(jax.checkpoint(layer)), argnums=(0, 1)), x, w)
  assert (plain.total, remat.total) == (3 * matmul, 4 * matmul)


def test_strided_convolution_gradient_counts_real_products_only():
  """The input gradient of a stride-2 convolution dilates its input by 2 in each side; the
  inserted zeros are not multiplied (PyTorch's counter's convention, and the real work)."""
  k = jnp.ones((3, 3, 4, 4))
  conv = lambda x: jnp.sum(jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
  x = jnp.ones((1, 8, 8, 4))
  forward = 2 * (4 * 4 * 4) * 4 * 9
  assert flops.count_flops(conv, x).total == forward
  assert flops.count_flops(jax.grad(conv), x).total == 2 * forward


def test_unet_flop_count_equals_torch_flop_counter():
  """Forward + backward of the UNet: our jaxpr count = PyTorch FlopCounterMode on diffusers'
  UNet at the same shapes (attention through bmm, which the counter sees)."""
  cfg = config_lib.load("tiny")
  with cfg.unlocked():  # one level: seconds to trace and to run in torch
    cfg.unet.update(block_out_channels=(16,), attention_levels=(True,), num_heads=2,
                    context_dim=16, norm_groups=8)
  b, size, ctx = 2, 8, 11
  model = nnx.eval_shape(lambda: UNet(UNetConfig(**cfg.unet), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  sds = jax.ShapeDtypeStruct
  loss = lambda st, x, t, c: jnp.mean(nnx.merge(graphdef, st)(x, t, c) ** 2)  # noqa: E731
  ours = flops.count_flops(jax.value_and_grad(loss), state, sds((b, size, size, 8), jnp.float32),
                           sds((b,), jnp.float32), sds((b, ctx, 16), jnp.float32))
  ref = torch_baseline.diffusers_unet(cfg)
  ref.set_attn_processor(AttnProcessor())
  with FlopCounterMode(display=False) as counter:
    out = ref(torch.randn(b, 8, size, size), torch.tensor([3.0, 500.0]),
              torch.randn(b, ctx, 16)).sample
    (out ** 2).mean().backward()
  assert ours.total == counter.get_total_flops()
  # 4 spatial transformers (down, mid, 2 up), each a scan over its 1 block, forward and backward
  assert ours.conv > 0 and ours.matmul > 0 and ours.loops == [("scan", 1)] * 8


def test_loops_count_their_trips():
  w = jnp.ones((8, 8))

  def scanned(x):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  def looped(x):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

  one = 2 * 4 * 8 * 8
  x = jnp.ones((4, 8))
  assert flops.count_flops(scanned, x).total == 5 * one
  assert flops.count_flops(looped, x, while_trips=3).total == 3 * one
  # XLA's estimate counts a loop body once: why the bench counts from the jaxpr.
  assert flops.xla_flops(jax.jit(scanned).lower(x).compile()) < 2 * one
