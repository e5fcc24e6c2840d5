"""The Stable Diffusion KL-f8 autoencoder (AutoencoderKL) in Flax NNX, NHWC.

    x (B, H, W, 3) in [-1, 1] --encoder--> (B, H/f, W/f, 2*latent) --quant_conv--> mean, logvar
    z (B, H/f, W/f, latent) --post_quant_conv--> --decoder--> image (B, H, W, 3)

with f = 2 ** (len(block_out_channels) - 1) (8 for SD). The encoder/decoder are the LDM ones:
ResNet blocks (GroupNorm + SiLU), a mid block (ResNet, single-head spatial self-attention, ResNet),
strided downsampling with SD's asymmetric (0, 1, 0, 1) zero padding, nearest-2x upsampling.

Weights load from both layouts users hold (diffusers `AutoencoderKL` and the CompVis single-file
`first_stage_model.*`); the key maps are data computed from the config (`vae_rules`).

The building blocks it shares with the UNet (`conv2d`, `group_norm`, `ResnetBlock`,
`resize_nearest`) are in models/layers.py; the key-map helpers (`block_rules`, `load_mapped`,
`export_mapped`) in weights/keymap.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.models.layers import (IMAGE_AXES, ResnetBlock, as_dtype, conv2d, dense, group_norm,
                                    resize_nearest, resnet_table)
from lego_jax.parallel.sharding import constrain
from lego_jax.weights import io as weight_io
from lego_jax.weights import pretrained
from lego_jax.weights.keymap import (CONV_TABLE, NORM_TABLE, Block, TableRow, block_rules,
                                     export_mapped, find_prefix, load_mapped, norm_rows,
                                     param_rows, same)
from lego_jax.weights.mapping import Kind, Rule
from lego_jax.weights.state import load_params

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_groups: int = 32
  scaling_factor: float = 0.18215
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    object.__setattr__(self, "dtype", as_dtype(self.dtype))
    object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# The autoencoder's own blocks (the shared ones are in layers.py)


class SpatialSelfAttention(nnx.Module):
  """The VAE mid-block attention: GroupNorm, one head over all H*W positions, residual add.

  (B, H, W, C) -> (B, H, W, C)
  """

  def __init__(self, channels: int, *, groups: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.group_norm = group_norm(channels, groups, 1e-6, **kw)
    self.to_q = dense(channels, channels, ("embed", "heads"), **kw)
    self.to_k = dense(channels, channels, ("embed", "heads"), **kw)
    self.to_v = dense(channels, channels, ("embed", "heads"), **kw)
    self.to_out = dense(channels, channels, ("heads", "embed"), **kw)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = (proj(t)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
    o = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
    return x + self.to_out(o).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """ResNet, attention, ResNet at the lowest resolution."""

  def __init__(self, channels: int, *, groups: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups=groups, eps=1e-6,
                                         temb_dim=None, **kw) for _ in range(2)])
    self.attention = SpatialSelfAttention(channels, groups=groups, **kw)

  def __call__(self, x: Array) -> Array:
    return self.resnets[1](self.attention(self.resnets[0](x)))


class EncoderLevel(nnx.Module):
  def __init__(self, cin: int, cout: int, *, num_layers: int, downsample: bool, groups: int,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups=groups, eps=1e-6,
                                         temb_dim=None, **kw) for i in range(num_layers)])
    # SD pads only bottom/right before a VALID stride-2 conv (not the UNet's symmetric padding).
    self.downsample = (conv2d(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
                       if downsample else None)

  def __call__(self, x: Array) -> Array:
    for r in self.resnets:
      x = r(x)
    return self.downsample(x) if self.downsample is not None else x


class DecoderLevel(nnx.Module):
  def __init__(self, cin: int, cout: int, *, num_layers: int, upsample: bool, groups: int,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups=groups, eps=1e-6,
                                         temb_dim=None, **kw) for i in range(num_layers)])
    self.upsample = conv2d(cout, cout, 3, **kw) if upsample else None

  def __call__(self, x: Array) -> Array:
    for r in self.resnets:
      x = r(x)
    if self.upsample is not None:
      x = self.upsample(resize_nearest(x, 2 * x.shape[1], 2 * x.shape[2]))
    return x


class Encoder(nnx.Module):
  """(B, H, W, in) -> (B, H/f, W/f, 2*latent)."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    ch = cfg.block_out_channels
    self.conv_in = conv2d(cfg.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        EncoderLevel(ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block,
                     downsample=i < len(ch) - 1, groups=cfg.norm_groups, **kw)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], groups=cfg.norm_groups, **kw)
    self.conv_norm_out = group_norm(ch[-1], cfg.norm_groups, 1e-6, **kw)
    self.conv_out = conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x: Array) -> Array:
    x = self.conv_in(x)
    for level in self.down_blocks:
      x = level(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """(B, h, w, latent) -> (B, h*f, w*f, in)."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    rev = cfg.block_out_channels[::-1]
    self.conv_in = conv2d(cfg.latent_channels, rev[0], 3, **kw)
    self.mid_block = MidBlock(rev[0], groups=cfg.norm_groups, **kw)
    self.up_blocks = nnx.List([
        DecoderLevel(rev[max(i - 1, 0)], rev[i], num_layers=cfg.layers_per_block + 1,
                     upsample=i < len(rev) - 1, groups=cfg.norm_groups, **kw)
        for i in range(len(rev))])
    self.conv_norm_out = group_norm(rev[-1], cfg.norm_groups, 1e-6, **kw)
    self.conv_out = conv2d(rev[-1], cfg.in_channels, 3, **kw)

  def __call__(self, z: Array) -> Array:
    x = self.mid_block(self.conv_in(z))
    for level in self.up_blocks:
      x = level(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class VAE(nnx.Module):
  """SD's AutoencoderKL. Images NHWC in [-1, 1]; latents NHWC, NOT scaled by `scaling_factor`."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    two_l = 2 * config.latent_channels
    self.encoder = Encoder(config, rngs)
    self.quant_conv = conv2d(two_l, two_l, 1, **kw)
    self.post_quant_conv = conv2d(config.latent_channels, config.latent_channels, 1, **kw)
    self.decoder = Decoder(config, rngs)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """x (B, H, W, in) -> posterior mean, logvar, each (B, H/f, W/f, latent), float32.

    logvar is clamped to [-30, 20] as in CompVis/diffusers' DiagonalGaussianDistribution.
    """
    moments = self.quant_conv(self.encoder(constrain(x, IMAGE_AXES))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def mode(self, x: Array) -> Array:
    """The posterior mode (= mean) of x's latent: (B, H/f, W/f, latent)."""
    return self.encode(x)[0]

  def sample(self, x: Array, rng: Array) -> Array:
    """One posterior sample mean + exp(logvar/2) * N(0, 1): (B, H/f, W/f, latent)."""
    mean, logvar = self.encode(x)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

  def decode(self, z: Array) -> Array:
    """z (B, h, w, latent) (unscaled) -> image (B, h*f, w*f, in), float32, not clamped."""
    z = z.astype(self.config.dtype)
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction through the posterior mode: (B, H, W, in) -> (B, H, W, in)."""
    return self.decode(self.mode(x))


# ---------------------------------------------------------------------------------------------
# Key maps as data (the table/walk scheme: lego_jax.weights.keymap)

VAE_RESNET_COMPVIS = dict(norm1="norm1", conv1="conv1", norm2="norm2", conv2="conv2",
                          shortcut="nin_shortcut")

# CompVis keeps the VAE attention projections as 1x1 convs; diffusers as linears.
VAE_ATTENTION_TABLE: list[TableRow] = (
    norm_rows("group_norm", {"diffusers": "group_norm", "compvis": "norm"})
    + [row for jax_name, d, c in (("to_q", "to_q", "q"), ("to_k", "to_k", "k"),
                                  ("to_v", "to_v", "v"), ("to_out", "to_out.0", "proj_out"))
       for row in param_rows(jax_name, {"diffusers": d, "compvis": c},
                             {"diffusers": Kind.LINEAR, "compvis": Kind.CONV1X1_LINEAR})])

def _vae_blocks(cfg: VAEConfig) -> Iterator[Block]:
  ch = cfg.block_out_channels
  n = len(ch)

  def mid(part: str) -> Iterator[Block]:
    for r in range(2):
      yield (f"{part}.mid_block.resnets.{r}",
             {"diffusers": f"{part}.mid_block.resnets.{r}", "compvis": f"{part}.mid.block_{r + 1}"},
             resnet_table(VAE_RESNET_COMPVIS, shortcut=False, time=False), None)
    yield (f"{part}.mid_block.attention",
           {"diffusers": f"{part}.mid_block.attentions.0", "compvis": f"{part}.mid.attn_1"},
           VAE_ATTENTION_TABLE, None)

  def ends(part: str) -> Iterator[Block]:
    yield f"{part}.conv_in", same(f"{part}.conv_in"), CONV_TABLE, None
    yield (f"{part}.conv_norm_out",
           {"diffusers": f"{part}.conv_norm_out", "compvis": f"{part}.norm_out"}, NORM_TABLE, None)
    yield f"{part}.conv_out", same(f"{part}.conv_out"), CONV_TABLE, None

  yield from ends("encoder")
  for b in range(n):
    cin = ch[max(b - 1, 0)]
    for r in range(cfg.layers_per_block):
      yield (f"encoder.down_blocks.{b}.resnets.{r}",
             {"diffusers": f"encoder.down_blocks.{b}.resnets.{r}",
              "compvis": f"encoder.down.{b}.block.{r}"},
             resnet_table(VAE_RESNET_COMPVIS, shortcut=(r == 0 and cin != ch[b]), time=False), None)
    if b < n - 1:
      yield (f"encoder.down_blocks.{b}.downsample",
             {"diffusers": f"encoder.down_blocks.{b}.downsamplers.0.conv",
              "compvis": f"encoder.down.{b}.downsample.conv"}, CONV_TABLE, None)
  yield from mid("encoder")
  yield "quant_conv", same("quant_conv"), CONV_TABLE, None
  yield "post_quant_conv", same("post_quant_conv"), CONV_TABLE, None
  yield from ends("decoder")
  yield from mid("decoder")
  rev = ch[::-1]
  for i in range(n):
    cin = rev[max(i - 1, 0)]
    level = n - 1 - i  # CompVis numbers decoder levels from the highest resolution
    for r in range(cfg.layers_per_block + 1):
      yield (f"decoder.up_blocks.{i}.resnets.{r}",
             {"diffusers": f"decoder.up_blocks.{i}.resnets.{r}",
              "compvis": f"decoder.up.{level}.block.{r}"},
             resnet_table(VAE_RESNET_COMPVIS, shortcut=(r == 0 and cin != rev[i]), time=False),
             None)
    if i < n - 1:
      yield (f"decoder.up_blocks.{i}.upsample",
             {"diffusers": f"decoder.up_blocks.{i}.upsamplers.0.conv",
              "compvis": f"decoder.up.{level}.upsample.conv"}, CONV_TABLE, None)


def vae_rules(cfg: VAEConfig, layout: str = "diffusers") -> list[Rule]:
  """The full key map of a VAE of this config, in `layout` ("diffusers" or "compvis")."""
  return block_rules(list(_vae_blocks(cfg)), layout)


# Single-file SD checkpoints may carry the autoencoder's training-loss modules (LPIPS net,
# discriminator); they are not part of the model.
VAE_IGNORE = {"diffusers": (), "compvis": (r"^loss\.",)}
VAE_PREFIX = {"diffusers": "", "compvis": "first_stage_model."}


# ---------------------------------------------------------------------------------------------
# Loading and export


def load_vae(model: VAE, state_dict: Mapping[str, Any] | str | os.PathLike,
             layout: str = "auto", prefix: str | None = None) -> VAE:
  """Fills `model` from a diffusers `AutoencoderKL` or CompVis (`first_stage_model.*`) state dict.

  Args:
    model: a VAE whose config matches the checkpoint.
    state_dict: PyTorch names -> arrays, or a path for `read_state_dict`.
    layout: "diffusers", "compvis" or "auto" (told apart by their key names).
    prefix: the key prefix of the autoencoder ("" for a diffusers `vae/` folder,
      "first_stage_model." in a single-file SD checkpoint); found automatically when None.
  Raises:
    KeyMappingError listing unexpected, missing and mis-shaped keys.
  """
  sd, _ = weight_io.as_state_dict(state_dict)
  anchors = {"diffusers": "encoder.down_blocks.0.resnets.0.conv1.weight",
             "compvis": "encoder.down.0.block.0.conv1.weight"}
  if layout != "auto":
    anchors = {layout: anchors[layout]}
  layout, prefix = find_prefix(sd, anchors, prefix, "autoencoder")
  params = load_mapped(model, sd, vae_rules(model.config, layout), prefix, VAE_IGNORE[layout],
                       f"{layout} VAE checkpoint")
  return load_params(model, params)


def vae_to_torch(model: VAE, layout: str = "diffusers",
                 prefix: str | None = None) -> dict[str, np.ndarray]:
  """The model's weights under PyTorch names of `layout` (CompVis: `first_stage_model.` prefix)."""
  prefix = VAE_PREFIX[layout] if prefix is None else prefix
  return export_mapped(model, vae_rules(model.config, layout), prefix)



# ---------------------------------------------------------------------------------------------
# Building from a diffusers directory or a CompVis yaml (see lego_jax/weights/pretrained.py)


def _vae_channels(c: Mapping[str, Any]) -> tuple[int, ...]:
  channels = tuple(c.get("block_out_channels", (64,)))
  for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    types = tuple(c.get(key) or (kind,) * len(channels))
    if types != (kind,) * len(channels):
      raise pretrained.PretrainedConfigError(
          f"{key}={list(types)} is not supported (this model implements {len(channels)} x {kind})")
  return channels


def _same_channels(c: Mapping[str, Any], theirs: str, ours: str, default: int) -> int:
  value = c.get(ours, default)
  if c.get(theirs, default) != value:
    raise pretrained.PretrainedConfigError(
        f"{theirs}={c.get(theirs)!r} is not supported (this model has {theirs} = {ours} = {value})")
  return value


# diffusers' AutoencoderKL config.json -> VAEConfig: our field -> their key (with diffusers'
# default where a file may leave it out), or a function of their config.
HF_CONFIG: dict[str, Any] = {
    "in_channels": lambda c: _same_channels(c, "out_channels", "in_channels", 3),
    "latent_channels": ("latent_channels", 4),
    "block_out_channels": _vae_channels,
    "layers_per_block": ("layers_per_block", 1),
    "norm_groups": ("norm_num_groups", 32),
    "scaling_factor": ("scaling_factor", 0.18215),
}
HF_REQUIRE: dict[str, tuple] = {"act_fn": ("silu",), "use_quant_conv": (True,),
                                "use_post_quant_conv": (True,),
                                "mid_block_add_attention": (True,), "shift_factor": (None,)}

# ldm's AutoencoderKL in a CompVis yaml: first_stage_config.params (ddconfig flattened into it,
# with the LDM's scale_factor) -> VAEConfig. ldm's Normalize (32 groups) is not in the yaml:
# norm_groups keeps its default, 32.
COMPVIS_CONFIG: dict[str, Any] = {
    "in_channels": lambda c: _same_channels(c, "out_ch", "in_channels", 3),
    "latent_channels": lambda c: _same_channels(c, "embed_dim", "z_channels", 4),
    "block_out_channels": lambda c: tuple(c["ch"] * m for m in c["ch_mult"]),
    "layers_per_block": "num_res_blocks",
    "scaling_factor": ("scale_factor", 1.0),
}
COMPVIS_REQUIRE: dict[str, tuple] = {"double_z": (True,), "attn_resolutions": ((),)}


def vae_weight_facts(prefix: str = "") -> dict[str, Any]:
  """Config fields read off a diffusers-layout VAE's weights."""
  p = prefix

  def channels(sd, f):
    n = pretrained.count(f"{p}encoder.down_blocks.")(sd, f)
    return tuple(int(np.shape(sd[f"{p}encoder.down_blocks.{i}.resnets.0.conv2.weight"])[0])
                 for i in range(n))

  return {
      "in_channels": pretrained.dim(f"{p}encoder.conv_in.weight", 1),
      "latent_channels": pretrained.dim(f"{p}decoder.conv_in.weight", 1),
      "block_out_channels": channels,
      "layers_per_block": pretrained.count(f"{p}encoder.down_blocks.0.resnets."),
  }


def vae_config_from_hf(config: Mapping[str, Any], source: str = "config.json",
                       **overrides) -> VAEConfig:
  """VAEConfig from a diffusers AutoencoderKL config dict; `overrides` of fields it states must
  agree, the others (dtype, param_dtype) are taken."""
  stated = pretrained.translate(config, HF_CONFIG, HF_REQUIRE, source)
  return VAEConfig(**pretrained.settle(stated, overrides, source, HF_CONFIG))


def vae_config_from_compvis(params: Mapping[str, Any], scale_factor: float,
                            source: str = "yaml", **overrides) -> VAEConfig:
  """VAEConfig from a CompVis yaml's first_stage_config.params and the LDM's scale_factor."""
  flat = {**params, **(params.get("ddconfig") or {}), "scale_factor": scale_factor}
  flat["attn_resolutions"] = tuple(flat.get("attn_resolutions") or ())
  stated = pretrained.translate(flat, COMPVIS_CONFIG, COMPVIS_REQUIRE, source)
  return VAEConfig(**pretrained.settle(stated, overrides, source, COMPVIS_CONFIG))


def from_pretrained(path: str | os.PathLike, **overrides) -> VAE:
  """A diffusers AutoencoderKL directory (config.json + weights, e.g. SD's vae/) -> a filled VAE
  with the sizes of its config.json."""
  cfg_path = pretrained.require_config(path, "VAE")
  config = vae_config_from_hf(pretrained.read_json(cfg_path), str(cfg_path), **overrides)
  state_dict = weight_io.read_state_dict(path)
  pretrained.check_weights(dataclasses.asdict(config), state_dict, vae_weight_facts(), str(path))
  return load_vae(nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(0))), state_dict)
