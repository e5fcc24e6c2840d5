"""The Stable Diffusion 1.x UNet (the LDM noise predictor) in Flax NNX, NHWC.

    x (B, H, W, in) , timesteps (B,) , context (B, S, context_dim) -> eps (B, H, W, out)

conv_in, then per level `layers_per_block` ResNet blocks (time embedding added), each followed by a
spatial transformer where `attention_levels` says so, and a stride-2 conv between levels; a mid
block (ResNet, transformer, ResNet); the mirrored up path with `layers_per_block + 1` ResNet blocks
per level fed by the skip connections, nearest-2x upsampling + conv; GroupNorm-SiLU-conv out.
A spatial transformer is GroupNorm, a 1x1 projection, `transformer_depth` blocks of
(LN -> self-attention, LN -> cross-attention on the context, LN -> GEGLU feed-forward), a 1x1
projection back and a residual add. LEGO uses it with 8 input channels (noisy latent ++ the input
frame's latent); `widen_input` turns SD-1.5's 4-channel conv_in into that, new channels zeroed.

Identical transformer blocks are stacked (`nnx.vmap`) and run with `nnx.scan`; their parameters
have a leading "layers" axis. Weights load from diffusers `UNet2DConditionModel` and from CompVis
single files (`model.diffusion_model.*`, also LitEma's `model_ema.*` copy); the key maps are data
computed from the config (`unet_rules`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.models.layers import (IMAGE_AXES, ResnetBlock, as_dtype, conv2d, dense, group_norm,
                                    layer_norm, resize_nearest, resnet_table)
from lego_jax.parallel.sharding import constrain
from lego_jax.weights import io as weight_io
from lego_jax.weights import pretrained
from lego_jax.weights.keymap import (CONV_TABLE, NORM_TABLE, Block, TableRow, block_rules,
                                     export_mapped, find_prefix, load_mapped, norm_rows,
                                     param_rows, same)
from lego_jax.weights.mapping import Kind, KeyMappingError, Rule
from lego_jax.weights.state import load_params

Array = jax.Array
TOKEN_AXES = ("batch", "length", None)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 8
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  attention_levels: tuple[bool, ...] = (True, True, True, False)
  layers_per_block: int = 2
  # Heads of every level's transformers: one int for all levels (SD-1.x: 8, head size width / 8)
  # or one per level of block_out_channels (diffusers' tuple attention_head_dim; SD-2.x's
  # 64-wide heads). The mid block has the deepest level's.
  num_heads: int | tuple[int, ...] = 8
  transformer_depth: int = 1
  context_dim: int = 768
  norm_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  # None: head-major XLA products (see `attention`); "xla" / "cudnn": jax.nn.dot_product_attention
  # with that implementation ("cudnn": GPUs, bf16/fp16, head sizes <= 128 only).
  attention_impl: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
    object.__setattr__(self, "dtype", as_dtype(self.dtype))
    object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))
    if len(self.attention_levels) != len(self.block_out_channels):
      raise ValueError(f"attention_levels {self.attention_levels} needs one entry per level of "
                       f"block_out_channels {self.block_out_channels}")
    if not isinstance(self.num_heads, int):
      object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
      if len(self.num_heads) != len(self.block_out_channels):
        raise ValueError(f"num_heads {self.num_heads} needs one entry per level of "
                         f"block_out_channels {self.block_out_channels}")
    # Only levels with transformers (and the deepest, the mid block's) use their head count.
    attends = self.attention_levels[:-1] + (True,)
    bad = [(c, h) for c, h, a in zip(self.block_out_channels, self.level_heads, attends)
           if (a and c % h) or c % self.norm_groups]
    if bad:
      raise ValueError(f"widths {[c for c, _ in bad]} are not divisible by their num_heads "
                       f"{[h for _, h in bad]} and norm_groups={self.norm_groups}")

  @property
  def level_heads(self) -> tuple[int, ...]:
    """Attention heads of each level (down level b and the up level of the same width)."""
    if isinstance(self.num_heads, int):
      return (self.num_heads,) * len(self.block_out_channels)
    return self.num_heads

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.0) -> Array:
  """SD's sinusoidal embedding, cosines first (diffusers flip_sin_to_cos=True, freq_shift=0).

  timesteps (B,) (integer or fractional) -> (B, dim) float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _maybe_remat(fn, enabled: bool):
  return nnx.remat(fn) if enabled else fn


def attention(q: Array, k: Array, v: Array, impl: str | None = None) -> Array:
  """softmax(q k^T / sqrt(D)) v per head: q (B, T, N, D), k and v (B, S, N, D) -> (B, T, N, D).

  With `impl` ("xla", "cudnn") this is jax.nn.dot_product_attention with that implementation.
  With None the products run head-major (B, N, T, D), logits and softmax in float32: the
  arithmetic of dot_product_attention's XLA path without the transposes its (B, T, N, D)
  einsums cost XLA:CPU (lego_jax/bench/README.md has the measurement).
  """
  if impl == "cudnn" and (q.shape[-1] > 128 or q.shape[-1] % 8):
    impl = None  # cuDNN's fused kernel takes head sizes up to 128 (SD's 1280-wide level: 160)
  if impl is not None:
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  logits = jnp.einsum("bntd,bnsd->bnts", qh, kh, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * jnp.float32(q.shape[-1] ** -0.5), axis=-1)
  out = jnp.einsum("bnts,bnsd->bntd", probs.astype(v.dtype), vh)
  return jnp.swapaxes(out, 1, 2)


class Attention(nnx.Module):
  """Multi-head attention; keys/values from `context` (cross) or from x itself (self).

  x (B, T, dim), context (B, S, context_dim) -> (B, T, dim)
  """

  def __init__(self, dim: int, context_dim: int, heads: int, *, dtype, param_dtype,
               rngs: nnx.Rngs, impl: str | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.impl = impl
    self.to_q = dense(dim, dim, ("embed", "heads"), use_bias=False, **kw)
    self.to_k = dense(context_dim, dim, ("embed", "heads"), use_bias=False, **kw)
    self.to_v = dense(context_dim, dim, ("embed", "heads"), use_bias=False, **kw)
    self.to_out = dense(dim, dim, ("heads", "embed"), **kw)

  def __call__(self, x: Array, context: Array | None = None) -> Array:
    context = x if context is None else context
    b, t, dim = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, dim // self.heads)  # noqa: E731
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    o = attention(q, k, v, self.impl).reshape(b, t, dim)
    return self.to_out(o)


class FeedForward(nnx.Module):
  """GEGLU: (B, T, dim) -> proj (B, T, 2*4*dim) -> a * gelu(gate) -> (B, T, dim)."""

  def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = dense(dim, 8 * dim, ("embed", "mlp"), **kw)
    self.out = dense(4 * dim, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: Array) -> Array:
    a, gate = jnp.split(self.proj(x), 2, axis=-1)
    return self.out(a * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nnx.Module):
  """(B, T, dim), context (B, S, context_dim) -> (B, T, dim); pre-LN, residual after each part."""

  def __init__(self, dim: int, context_dim: int, heads: int, *, dtype, param_dtype,
               rngs: nnx.Rngs, attention_impl: str | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layer_norm(dim, 1e-5, fast_variance=False, **kw)
    self.attn1 = Attention(dim, dim, heads, impl=attention_impl, **kw)
    self.norm2 = layer_norm(dim, 1e-5, fast_variance=False, **kw)
    self.attn2 = Attention(dim, context_dim, heads, impl=attention_impl, **kw)
    self.norm3 = layer_norm(dim, 1e-5, fast_variance=False, **kw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x: Array, context: Array) -> Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    x = x + self.ff(self.norm3(x))
    return constrain(x, TOKEN_AXES)


class SpatialTransformer(nnx.Module):
  """(B, H, W, C), context (B, S, context_dim) -> (B, H, W, C).

  proj_in/proj_out are dense layers on the channel axis: a 1x1 conv (SD-1.x) and a linear
  (SD-2.x `use_linear_projection`) are the same map here, only their checkpoint shapes differ.
  """

  def __init__(self, channels: int, heads: int, cfg: UNetConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.remat = cfg.remat
    self.norm = group_norm(channels, cfg.norm_groups, 1e-6, **kw)
    self.proj_in = dense(channels, channels, ("conv_in", "embed"), **kw)

    @nnx.split_rngs(splits=cfg.transformer_depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return TransformerBlock(channels, cfg.context_dim, heads, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs,
                              attention_impl=cfg.attention_impl)

    self.transformer_blocks = make_blocks(rngs)
    self.proj_out = dense(channels, channels, ("embed", "conv_out"), **kw)

  def __call__(self, x: Array, context: Array) -> Array:
    b, h, w, c = x.shape
    t = self.proj_in(self.norm(x).reshape(b, h * w, c))
    # A plain lax.scan over the blocks' split state, not nnx.scan: the sampler calls the UNet
    # inside its own lax.scan over steps, where nnx.scan refuses variables that hold tracers of
    # the enclosing jit ("Cannot extract graph node from different trace level").
    graphdef, stacked = nnx.split(self.transformer_blocks)

    def block(state, t, ctx):
      return nnx.merge(graphdef, state)(t, ctx)

    if self.remat:
      block = jax.checkpoint(block)
    t, _ = jax.lax.scan(lambda t, state: (block(state, t, context), None), t, stacked)
    return x + self.proj_out(t).reshape(b, h, w, c)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Channel widths of every ResNet block, derived once from the config (model and key map)."""
  down: tuple[tuple[tuple[int, int], ...], ...]  # per level: (cin, cout) per resnet
  up: tuple[tuple[tuple[int, int], ...], ...]    # per up level (deepest first)


def _plan(cfg: UNetConfig) -> _Plan:
  ch = cfg.block_out_channels
  skips = [ch[0]]  # conv_in's output is the first skip connection
  down, cur = [], ch[0]
  for b, cout in enumerate(ch):
    level = []
    for _ in range(cfg.layers_per_block):
      level.append((cur, cout))
      cur = cout
      skips.append(cur)
    if b < len(ch) - 1:
      skips.append(cur)  # the downsampled map
    down.append(tuple(level))
  up = []
  for i in range(len(ch)):
    cout = ch[len(ch) - 1 - i]
    level = []
    for _ in range(cfg.layers_per_block + 1):
      level.append((cur + skips.pop(), cout))
      cur = cout
    up.append(tuple(level))
  return _Plan(tuple(down), tuple(up))


class Level(nnx.Module):
  """One resolution of the down or up path: ResNet (+ transformer) blocks, then resampling."""

  def __init__(self, resnets: tuple[tuple[int, int], ...], attention: bool, heads: int,
               resample: str | None, cfg: UNetConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.remat = cfg.remat
    self.resnets = nnx.List([
        ResnetBlock(cin, cout, groups=cfg.norm_groups, eps=1e-5, temb_dim=cfg.time_embed_dim, **kw)
        for cin, cout in resnets])
    cout = resnets[-1][1]
    self.attentions = (nnx.List([SpatialTransformer(cout, heads, cfg, rngs) for _ in resnets])
                       if attention else None)
    # The UNet pads stride-2 convs symmetrically (1, 1), unlike the VAE.
    self.downsample = conv2d(cout, cout, 3, stride=2, **kw) if resample == "down" else None
    self.upsample = conv2d(cout, cout, 3, **kw) if resample == "up" else None

  def block(self, i: int, x: Array, temb: Array, context: Array) -> Array:
    x = _maybe_remat(lambda m, x, t: m(x, t), self.remat)(self.resnets[i], x, temb)
    if self.attentions is not None:
      x = self.attentions[i](x, context)
    return constrain(x, IMAGE_AXES)


class MidBlock(nnx.Module):
  """ResNet, transformer, ResNet at the lowest resolution (SD always attends here)."""

  def __init__(self, channels: int, cfg: UNetConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.remat = cfg.remat
    self.resnets = nnx.List([
        ResnetBlock(channels, channels, groups=cfg.norm_groups, eps=1e-5,
                    temb_dim=cfg.time_embed_dim, **kw) for _ in range(2)])
    self.attentions = nnx.List([SpatialTransformer(channels, cfg.level_heads[-1], cfg, rngs)])

  def __call__(self, x: Array, temb: Array, context: Array) -> Array:
    resnet = _maybe_remat(lambda m, x, t: m(x, t), self.remat)
    x = self.attentions[0](resnet(self.resnets[0], x, temb), context)
    return constrain(resnet(self.resnets[1], x, temb), IMAGE_AXES)


class TimeEmbedding(nnx.Module):
  def __init__(self, dim: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = dense(dim, embed_dim, ("embed", "mlp"), **kw)
    self.linear_2 = dense(embed_dim, embed_dim, ("mlp", "embed"), **kw)

  def __call__(self, t_emb: Array) -> Array:
    return self.linear_2(jax.nn.silu(self.linear_1(t_emb)))


class UNet(nnx.Module):
  """SD-1.x UNet (LEGO: 8 input channels). See the module docstring."""

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    ch = cfg.block_out_channels
    n = len(ch)
    plan = _plan(cfg)
    self.conv_in = conv2d(cfg.in_channels, ch[0], 3, **kw)
    self.time_embedding = TimeEmbedding(ch[0], cfg.time_embed_dim, **kw)
    self.down_blocks = nnx.List([
        Level(plan.down[b], cfg.attention_levels[b], cfg.level_heads[b],
              "down" if b < n - 1 else None, cfg, rngs)
        for b in range(n)])
    self.mid_block = MidBlock(ch[-1], cfg, rngs)
    self.up_blocks = nnx.List([
        Level(plan.up[i], cfg.attention_levels[n - 1 - i], cfg.level_heads[n - 1 - i],
              "up" if i < n - 1 else None, cfg, rngs)
        for i in range(n)])
    self.conv_norm_out = group_norm(ch[0], cfg.norm_groups, 1e-5, **kw)
    self.conv_out = conv2d(ch[0], cfg.out_channels, 3, **kw)

  def __call__(self, x: Array, timesteps: Array, context: Array) -> Array:
    """x (B, H, W, in), timesteps (B,) or scalar, context (B, S, context_dim) -> eps (B, H, W, out).

    The output is float32 whatever the compute dtype. H and W need not be multiples of
    2**(levels-1): upsampled maps take their skip connection's size.
    """
    cfg = self.config
    dt = cfg.dtype
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (x.shape[0],))
    x = constrain(x.astype(dt), IMAGE_AXES)
    context = constrain(context.astype(dt), ("batch", "kv_length", None))
    temb = self.time_embedding(
        timestep_embedding(timesteps, cfg.block_out_channels[0]).astype(dt))

    x = self.conv_in(x)
    skips = [x]
    for level in self.down_blocks:
      for i in range(len(level.resnets)):
        x = level.block(i, x, temb, context)
        skips.append(x)
      if level.downsample is not None:
        x = level.downsample(x)
        skips.append(x)

    x = self.mid_block(x, temb, context)

    for level in self.up_blocks:
      for i in range(len(level.resnets)):
        x = level.block(i, jnp.concatenate([x, skips.pop()], axis=-1), temb, context)
      if level.upsample is not None:
        _, h, w, _ = skips[-1].shape
        x = level.upsample(resize_nearest(x, h, w))

    x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
    return x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# 4 -> 8 input channels (LEGO's init from SD-1.5)


def _widen_kernel(kernel: np.ndarray, new_in: int) -> np.ndarray:
  kh, kw, cin, cout = kernel.shape
  if new_in < cin:
    raise ValueError(f"conv_in has {cin} input channels; cannot narrow it to {new_in}")
  pad = np.zeros((kh, kw, new_in - cin, cout), dtype=np.asarray(kernel).dtype)
  return np.concatenate([np.asarray(kernel), pad], axis=2)


def widen_input(params_or_model: UNet | Mapping[str, Any], new_in_channels: int = 8):
  """Gives conv_in `new_in_channels` inputs; the added ones start at zero (LEGO from SD-1.5).

  With zero weights on the new channels the widened UNet computes exactly what the original does
  on the first channels, whatever the extra channels hold.

  Args:
    params_or_model: a `UNet` (changed in place: new conv_in, config.in_channels updated) or a
      flat {NNX path: array} dict (a widened copy is returned).
    new_in_channels: the input width wanted, >= the current one.
  Returns:
    The widened model, or the widened params dict.
  """
  if isinstance(params_or_model, UNet):
    model = params_or_model
    cfg = model.config
    kernel = np.asarray(jax.device_get(model.conv_in.kernel.get_value()))
    bias = model.conv_in.bias.get_value()
    conv = nnx.eval_shape(lambda: conv2d(new_in_channels, cfg.block_out_channels[0], 3,
                                         dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                         rngs=nnx.Rngs(0)))
    conv.kernel.set_value(jnp.asarray(_widen_kernel(kernel, new_in_channels), cfg.param_dtype))
    conv.bias.set_value(bias)
    model.conv_in = conv
    model.config = dataclasses.replace(cfg, in_channels=new_in_channels)
    return model
  params = dict(params_or_model)
  params["conv_in.kernel"] = _widen_kernel(params["conv_in.kernel"], new_in_channels)
  return params


# ---------------------------------------------------------------------------------------------
# Key maps as data (the table/walk scheme: lego_jax.weights.keymap)

UNET_RESNET_COMPVIS = dict(norm1="in_layers.0", conv1="in_layers.2", norm2="out_layers.0",
                           conv2="out_layers.3", time="emb_layers.1", shortcut="skip_connection")


def _attention_rows(name: str) -> list[TableRow]:
  rows = []
  for proj in ("to_q", "to_k", "to_v"):
    rows += param_rows(f"{name}.{proj}", same(f"{name}.{proj}"), Kind.LINEAR, bias=False)
  return rows + param_rows(f"{name}.to_out", same(f"{name}.to_out.0"), Kind.LINEAR)


# One transformer block, stacked over depth (the "{d}" placeholder); names agree in both layouts.
TRANSFORMER_BLOCK_TABLE: list[TableRow] = (
    [row for n in ("norm1", "norm2", "norm3") for row in norm_rows(n, same(n))]
    + _attention_rows("attn1") + _attention_rows("attn2")
    + param_rows("ff.proj", same("ff.net.0.proj"), Kind.LINEAR)
    + param_rows("ff.out", same("ff.net.2"), Kind.LINEAR))


def _transformer_blocks(jax_prefix: str, torch_prefixes: dict[str, str],
                        linear_projection: bool) -> Iterator[Block]:
  proj = Kind.LINEAR if linear_projection else Kind.CONV1X1_LINEAR
  outer = (norm_rows("norm", same("norm")) + param_rows("proj_in", same("proj_in"), proj)
           + param_rows("proj_out", same("proj_out"), proj))
  yield jax_prefix, torch_prefixes, outer, None
  yield (f"{jax_prefix}.transformer_blocks",
         {k: f"{v}.transformer_blocks.{{d}}" for k, v in torch_prefixes.items()},
         TRANSFORMER_BLOCK_TABLE, "d")


def _unet_blocks(cfg: UNetConfig, linear_projection: bool) -> Iterator[Block]:
  n, per = len(cfg.block_out_channels), cfg.layers_per_block
  plan = _plan(cfg)

  def resnet(cin_cout):
    return resnet_table(UNET_RESNET_COMPVIS, shortcut=cin_cout[0] != cin_cout[1], time=True)

  yield "conv_in", {"diffusers": "conv_in", "compvis": "input_blocks.0.0"}, CONV_TABLE, None
  for i, c in ((1, 0), (2, 2)):
    yield (f"time_embedding.linear_{i}",
           {"diffusers": f"time_embedding.linear_{i}", "compvis": f"time_embed.{c}"},
           param_rows("", same(""), Kind.LINEAR), None)
  # CompVis numbers the down path's blocks consecutively: input_blocks.k holds one resnet
  # (+ its transformer) or one downsampling conv, k = 1 + level * (per + 1) + index.
  for b in range(n):
    for r in range(per):
      k = 1 + b * (per + 1) + r
      dprefix = f"down_blocks.{b}"
      yield (f"{dprefix}.resnets.{r}",
             {"diffusers": f"{dprefix}.resnets.{r}", "compvis": f"input_blocks.{k}.0"},
             resnet(plan.down[b][r]), None)
      if cfg.attention_levels[b]:
        yield from _transformer_blocks(
            f"{dprefix}.attentions.{r}",
            {"diffusers": f"{dprefix}.attentions.{r}", "compvis": f"input_blocks.{k}.1"},
            linear_projection)
    if b < n - 1:
      yield (f"down_blocks.{b}.downsample",
             {"diffusers": f"down_blocks.{b}.downsamplers.0.conv",
              "compvis": f"input_blocks.{1 + b * (per + 1) + per}.0.op"}, CONV_TABLE, None)
  mid = cfg.block_out_channels[-1]
  for r, k in ((0, 0), (1, 2)):
    yield (f"mid_block.resnets.{r}",
           {"diffusers": f"mid_block.resnets.{r}", "compvis": f"middle_block.{k}"},
           resnet((mid, mid)), None)
  yield from _transformer_blocks(
      "mid_block.attentions.0",
      {"diffusers": "mid_block.attentions.0", "compvis": "middle_block.1"}, linear_projection)
  # output_blocks.k: resnet at .0, transformer at .1, the level's upsampling conv after them.
  for i in range(n):
    attention = cfg.attention_levels[n - 1 - i]
    for r in range(per + 1):
      k = i * (per + 1) + r
      uprefix = f"up_blocks.{i}"
      yield (f"{uprefix}.resnets.{r}",
             {"diffusers": f"{uprefix}.resnets.{r}", "compvis": f"output_blocks.{k}.0"},
             resnet(plan.up[i][r]), None)
      if attention:
        yield from _transformer_blocks(
            f"{uprefix}.attentions.{r}",
            {"diffusers": f"{uprefix}.attentions.{r}", "compvis": f"output_blocks.{k}.1"},
            linear_projection)
    if i < n - 1:
      k = i * (per + 1) + per
      yield (f"up_blocks.{i}.upsample",
             {"diffusers": f"up_blocks.{i}.upsamplers.0.conv",
              "compvis": f"output_blocks.{k}.{2 if attention else 1}.conv"}, CONV_TABLE, None)
  yield "conv_norm_out", {"diffusers": "conv_norm_out", "compvis": "out.0"}, NORM_TABLE, None
  yield "conv_out", {"diffusers": "conv_out", "compvis": "out.2"}, CONV_TABLE, None


def unet_rules(cfg: UNetConfig, layout: str = "diffusers", linear_projection: bool = False,
               ema: bool = False) -> list[Rule]:
  """The full key map of a UNet of this config.

  Args:
    layout: "diffusers" (UNet2DConditionModel) or "compvis" (ldm's UNetModel, as in SD files).
    linear_projection: the transformers' proj_in/proj_out are Linear (SD-2.x) rather than 1x1
      Conv2d (SD-1.x).
    ema: CompVis only: names of LitEma's copy (`diffusion_model` + the key without dots, to be
      read under the `model_ema.` prefix).
  """
  rules = block_rules(list(_unet_blocks(cfg, linear_projection)), layout)
  if ema:
    if layout != "compvis":
      raise ValueError("EMA copies (LitEma) exist only in the CompVis layout")
    rules = [dataclasses.replace(r, torch="diffusion_model" + r.torch.replace(".", ""))
             for r in rules]
  return rules


UNET_PREFIX = {"diffusers": "", "compvis": "model.diffusion_model."}
_ANCHORS = {"diffusers": "time_embedding.linear_1.weight", "compvis": "time_embed.0.weight"}
_EMA_ANCHOR = "diffusion_modeltime_embed0weight"
# LitEma's bookkeeping buffers live beside the averaged weights.
_EMA_IGNORE = (r"^num_updates$", r"^decay$")


def load_unet(model: UNet, state_dict: Mapping[str, Any] | str | os.PathLike,
              layout: str = "auto", prefix: str | None = None, ema: bool = False,
              widen_input_channels: bool = False) -> UNet:
  """Fills `model` from a diffusers or CompVis UNet state dict (or a file/folder path).

  Args:
    model: a UNet whose config matches the checkpoint (may come from `nnx.eval_shape`, which skips
      the random init).
    state_dict: PyTorch names -> arrays, or a path for `read_state_dict`.
    layout: "diffusers", "compvis" or "auto" (told apart by their key names).
    prefix: the UNet's key prefix ("" for a diffusers `unet/` folder, "model.diffusion_model."
      in an SD single file); found automatically when None.
    ema: read LitEma's averaged copy (`model_ema.*`, CompVis single files) instead of the weights.
    widen_input_channels: accept a checkpoint whose conv_in has fewer input channels than the
      model (SD-1.5's 4 into LEGO's 8) and zero the added ones, as LEGO's init does.
  Raises:
    KeyMappingError listing unexpected, missing and mis-shaped keys.
  """
  sd, _ = weight_io.as_state_dict(state_dict)
  if ema:
    if layout not in ("auto", "compvis"):
      raise ValueError("ema=True reads CompVis single files (LitEma); layout must be compvis")
    layout, prefix = find_prefix(sd, {"compvis": _EMA_ANCHOR}, prefix, "EMA UNet")
    ignore = _EMA_IGNORE
  else:
    anchors = _ANCHORS if layout == "auto" else {layout: _ANCHORS[layout]}
    layout, prefix = find_prefix(sd, anchors, prefix, "UNet")
    ignore = ()
  # SD-1.x stores the transformers' proj_in as 1x1 convs, SD-2.x as linears: read which.
  proj_dims = {np.ndim(v) for k, v in sd.items()
               if k.startswith(prefix) and k.endswith(("proj_in.weight", "proj_inweight"))}
  if len(proj_dims) > 1:
    raise KeyMappingError(f"UNet checkpoint mixes linear and conv proj_in weights ({proj_dims})")
  rules = unet_rules(model.config, layout, linear_projection=proj_dims == {2}, ema=ema)

  overrides = {}
  target_in = model.config.in_channels
  if widen_input_channels:
    conv_in_rule = next(r for r in rules if r.jax == "conv_in.kernel")
    source = sd.get(prefix + conv_in_rule.torch)
    if source is not None and source.shape[1] < target_in:
      h, w = source.shape[2:]
      overrides["conv_in.kernel"] = (h, w, source.shape[1], model.config.block_out_channels[0])
  params = load_mapped(model, sd, rules, prefix, ignore, f"{layout} UNet checkpoint",
                       shape_overrides=overrides)
  if overrides:
    params = widen_input(params, target_in)
  return load_params(model, params)


def unet_to_torch(model: UNet, layout: str = "diffusers", prefix: str | None = None,
                  linear_projection: bool = False) -> dict[str, np.ndarray]:
  """The model's weights under PyTorch names of `layout` (CompVis: `model.diffusion_model.`)."""
  prefix = UNET_PREFIX[layout] if prefix is None else prefix
  return export_mapped(model, unet_rules(model.config, layout, linear_projection), prefix)


# ---------------------------------------------------------------------------------------------
# Building from a diffusers directory or a CompVis yaml (see lego_jax/weights/pretrained.py)

_CROSS_DOWN, _CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"


def _attention_levels(c: Mapping[str, Any]) -> tuple[bool, ...]:
  down = tuple(c.get("down_block_types") or (_CROSS_DOWN,) * 3 + ("DownBlock2D",))
  up = tuple(c.get("up_block_types") or ("UpBlock2D",) + (_CROSS_UP,) * 3)
  known = {_CROSS_DOWN: True, "DownBlock2D": False}
  if any(t not in known for t in down):
    raise pretrained.PretrainedConfigError(
        f"down_block_types={list(down)} is not supported (this model implements {sorted(known)})")
  levels = tuple(known[t] for t in down)
  mirrored = tuple(_CROSS_UP if a else "UpBlock2D" for a in reversed(levels))
  if up != mirrored:
    raise pretrained.PretrainedConfigError(
        f"up_block_types={list(up)} is not supported (this model mirrors the down path: "
        f"{list(mirrored)})")
  return levels


def _diffusers_heads(c: Mapping[str, Any]) -> int | tuple[int, ...]:
  # diffusers' legacy naming (UNet2DConditionModel.__init__): `num_attention_heads` must be
  # null and `attention_head_dim` is the NUMBER of heads, one int or one per down block.
  if c.get("num_attention_heads") is not None:
    raise pretrained.PretrainedConfigError(
        "num_attention_heads is set; diffusers' UNet2DConditionModel refuses it too (the number "
        "of heads is given as attention_head_dim)")
  heads = c.get("attention_head_dim", 8)
  return heads if isinstance(heads, int) else tuple(heads)


def _single(c: Mapping[str, Any], key: str, default: int) -> int:
  value = c.get(key, default)
  value = default if value is None else value
  if not isinstance(value, int):
    if len(set(value)) != 1:
      raise pretrained.PretrainedConfigError(
          f"{key}={list(value)} is not supported (this model has one value for every level)")
    value = value[0]
  return value


# diffusers' UNet2DConditionModel config.json -> UNetConfig: our field -> their key (with
# diffusers' default where a file may leave it out), or a function of their config.
HF_CONFIG: dict[str, Any] = {
    "in_channels": ("in_channels", 4),
    "out_channels": ("out_channels", 4),
    "block_out_channels": ("block_out_channels", (320, 640, 1280, 1280)),
    "attention_levels": pretrained.named("down_block_types", _attention_levels),
    "layers_per_block": pretrained.named("layers_per_block",
                                         lambda c: _single(c, "layers_per_block", 2)),
    # diffusers' legacy naming: attention_head_dim holds the number of heads (see below)
    "num_heads": pretrained.named("attention_head_dim", _diffusers_heads),
    "transformer_depth": pretrained.named(
        "transformer_layers_per_block", lambda c: _single(c, "transformer_layers_per_block", 1)),
    "context_dim": pretrained.named("cross_attention_dim",
                                    lambda c: _single(c, "cross_attention_dim", 1280)),
    "norm_groups": ("norm_num_groups", 32),
}
# Settings this model implements one way only: their key -> (diffusers' default, also allowed).
HF_REQUIRE: dict[str, tuple] = {
    "act_fn": ("silu",), "norm_eps": (1e-5,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_cond_proj_dim": (None,), "timestep_post_act": (None,), "encoder_hid_dim": (None,),
    "resnet_time_scale_shift": ("default",), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "downsample_padding": (1,), "attention_type": ("default",), "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "reverse_transformer_layers_per_block": (None,), "mid_block_only_cross_attention": (None,),
}


def _compvis_levels(c: Mapping[str, Any]) -> tuple[bool, ...]:
  # ldm's UNetModel attends at the levels whose downsampling rate (1, 2, 4, ...) is listed.
  rates = set(c.get("attention_resolutions") or ())
  return tuple(2 ** b in rates for b in range(len(c["channel_mult"])))


def _compvis_heads(c: Mapping[str, Any]) -> int | tuple[int, ...]:
  # num_head_channels (SD-2.x: 64) fixes the head SIZE, so each level has width / size heads.
  size = c.get("num_head_channels", -1)
  if size not in (-1, None):
    return tuple(c["model_channels"] * m // size for m in c["channel_mult"])
  return c.get("num_heads", -1)


# ldm's UNetModel in a CompVis yaml (model.params.unet_config.params) -> UNetConfig. ldm's
# GroupNorm32 is not in the yaml: norm_groups keeps its default, 32.
COMPVIS_CONFIG: dict[str, Any] = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "block_out_channels": pretrained.named(
        "model_channels", lambda c: tuple(c["model_channels"] * m for m in c["channel_mult"])),
    "attention_levels": pretrained.named("attention_resolutions", _compvis_levels),
    "layers_per_block": "num_res_blocks",
    "num_heads": pretrained.named("num_heads", _compvis_heads),
    "transformer_depth": ("transformer_depth", 1),
    "context_dim": "context_dim",
}
COMPVIS_REQUIRE: dict[str, tuple] = {"use_spatial_transformer": (True,), "conv_resample": (True,),
                                     "dims": (2,), "num_classes": (None,),
                                     "resblock_updown": (False,), "use_scale_shift_norm": (False,)}


def unet_weight_facts(prefix: str = "") -> dict[str, Any]:
  """Config fields read off a diffusers-layout UNet's weights."""
  p = prefix

  def levels(sd, f):
    return pretrained.count(f"{p}down_blocks.")(sd, f)

  def attn_levels(sd, f):
    return tuple(any(k.startswith(f"{p}down_blocks.{i}.attentions.") for k in sd)
                 for i in range(levels(sd, f)))

  mid_attn = f"{p}mid_block.attentions.0.transformer_blocks."
  return {
      "in_channels": pretrained.dim(f"{p}conv_in.weight", 1),
      "out_channels": pretrained.dim(f"{p}conv_out.weight", 0),
      "block_out_channels": lambda sd, f: tuple(
          int(np.shape(sd[f"{p}down_blocks.{i}.resnets.0.conv2.weight"])[0])
          for i in range(levels(sd, f))),
      "attention_levels": attn_levels,
      "layers_per_block": pretrained.count(f"{p}down_blocks.0.resnets."),
      "transformer_depth": pretrained.count(mid_attn),
      "context_dim": pretrained.dim(f"{mid_attn}0.attn2.to_k.weight", 1),
  }


def unet_config_from_hf(config: Mapping[str, Any], source: str = "config.json",
                        **overrides) -> UNetConfig:
  """UNetConfig from a diffusers UNet2DConditionModel config dict; `overrides` of fields it
  states must agree, the others (dtype, remat, attention_impl) are taken."""
  stated = pretrained.translate(config, HF_CONFIG, HF_REQUIRE, source)
  return UNetConfig(**pretrained.settle(stated, overrides, source, HF_CONFIG))


def unet_config_from_compvis(params: Mapping[str, Any], source: str = "yaml",
                             **overrides) -> UNetConfig:
  """UNetConfig from a CompVis yaml's unet_config.params."""
  stated = pretrained.translate(params, COMPVIS_CONFIG, COMPVIS_REQUIRE, source)
  return UNetConfig(**pretrained.settle(stated, overrides, source, COMPVIS_CONFIG))


def from_pretrained(path: str | os.PathLike, widen_input_channels: int | None = None,
                    **overrides) -> UNet:
  """A diffusers UNet2DConditionModel directory (config.json + weights, e.g. SD's unet/) -> a
  filled UNet with the sizes (and per-level heads) of its config.json.

  widen_input_channels: when the file's conv_in is narrower than this, it is widened to it with
  the added input channels at zero (SD-1.5's 4 -> LEGO's 8).
  """
  cfg_path = pretrained.require_config(path, "UNet")
  config = unet_config_from_hf(pretrained.read_json(cfg_path), str(cfg_path), **overrides)
  state_dict = weight_io.read_state_dict(path)
  pretrained.check_weights(dataclasses.asdict(config), state_dict, unet_weight_facts(),
                           str(path))
  widen = widen_input_channels is not None and widen_input_channels > config.in_channels
  if widen:
    config = dataclasses.replace(config, in_channels=widen_input_channels)
  return load_unet(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), state_dict,
                   widen_input_channels=widen)
