"""LEGO's conditioner: VLLM embeddings -> extra cross-attention context for the diffusion UNet.

    context = concat([CLIP_text(R)            (B, text_len, C),
                      proj_img(H_i)           (B, 256, C),
                      mix(proj_txt(pad(H_t))) (B, text_len, C)], axis=1)

`proj_img`, `proj_txt` are Linear(llm_dim -> C); `mix` is a pre-LayerNorm transformer encoder,
the same computation as `torch.nn.TransformerEncoder(TransformerEncoderLayer(C, num_heads, ffn_dim,
dropout, activation=relu, batch_first=True, norm_first=True), num_layers)` with no final norm and
no mask. H_t is zero padded / truncated to `text_len` rows and the padded rows are attended to
like any other (the release does so).

Ablation switches leave blocks out of the context (the LDM ablation configs rely on these lengths):
  use_image and use_text: text_len + 256 + text_len  (410 at full size)
  use_image only:         text_len + 256              (333)
  use_text only:          text_len + text_len         (154)
  neither:                text_len                    (77, InstructPix2Pix with the description)

The PyTorch-name map for the LEGO release (CompVis single-file checkpoints, where these modules
sit at the top level as `projection_img`, `projection_txt`, `self_attn_mix`) is `CONDITIONER_RULES`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.models.layers import layer_norm
from lego_jax.parallel.sharding import constrain
from lego_jax.weights import io as weights_io
from lego_jax.weights.mapping import Kind, Rule, jax_to_torch, torch_to_jax
from lego_jax.weights.state import flat_params, load_params, param_shapes

LAYER_NORM_EPS = 1e-5  # torch.nn.TransformerEncoderLayer's default


@dataclasses.dataclass(frozen=True)
class ConditionerConfig:
  llm_dim: int = 5120
  context_dim: int = 768
  text_len: int = 77
  num_heads: int = 8
  ffn_dim: int = 2048
  num_layers: int = 2
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


# Initialisers that reproduce PyTorch's, so a model trained with `train_projections=False` (the
# release, where these layers stay at their random init) sees the same weight distribution.
def _torch_linear_kernel():
  """nn.Linear's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _linear(cfg: ConditionerConfig, n_in: int, n_out: int, names: tuple[str | None, str | None],
            *, rngs: nnx.Rngs, kernel_init=None, bias_init=None) -> nnx.Linear:
  return nnx.Linear(
      n_in, n_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=nnx.with_partitioning(kernel_init or _torch_linear_kernel(), names),
      bias_init=nnx.with_partitioning(bias_init or _torch_linear_bias(n_in), (names[1],)),
      rngs=rngs)


def _layer_norm(cfg: ConditionerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layer_norm(cfg.context_dim, LAYER_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    rngs=rngs)


def _dropout(x: jax.Array, rate: float, key: jax.Array, deterministic: bool) -> jax.Array:
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def pad_text_features(h_txt: jax.Array, length: int) -> jax.Array:
  """(B, T, D) -> (B, length, D): rows past T are zeros, rows past `length` are dropped."""
  t = h_txt.shape[1]
  if t >= length:
    return h_txt[:, :length]
  return jnp.pad(h_txt, ((0, 0), (0, length - t), (0, 0)))


class MultiHeadSelfAttention(nnx.Module):
  """torch.nn.MultiheadAttention(batch_first=True) as self-attention, q/k/v in one packed kernel.

  The packed (C, 3C) kernel is torch's `in_proj_weight` (3C, C) transposed, so the key map needs
  no split; columns are [q | k | v], each head-major.
  """

  def __init__(self, cfg: ConditionerConfig, *, rngs: nnx.Rngs):
    c = cfg.context_dim
    if c % cfg.num_heads:
      raise ValueError(f"context_dim {c} is not divisible by num_heads {cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.dropout = cfg.dropout
    # torch: xavier_uniform over the packed (3C, C) weight, zero biases (also for out_proj).
    self.qkv = _linear(cfg, c, 3 * c, ("embed", None), rngs=rngs,
                       kernel_init=nnx.initializers.xavier_uniform(),
                       bias_init=nnx.initializers.zeros_init())
    self.out = _linear(cfg, c, c, (None, "embed"), rngs=rngs,
                       bias_init=nnx.initializers.zeros_init())

  def __call__(self, x: jax.Array, key: jax.Array, deterministic: bool) -> jax.Array:
    """x (B, L, C) -> (B, L, C)."""
    b, length, c = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(b, length, 3, h, c // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if deterministic or self.dropout == 0.0:
      y = jax.nn.dot_product_attention(q, k, v)
    else:
      # torch drops attention probabilities in training; the fused kernels cannot, and at 77
      # tokens the explicit softmax costs nothing.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // h)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      probs = _dropout(probs, self.dropout, key, deterministic=False)
      y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.out(y.reshape(b, length, c))


class EncoderLayer(nnx.Module):
  """One pre-LN layer: x += drop(attn(norm1(x))); x += drop(W2 drop(relu(W1 norm2(x))))."""

  def __init__(self, cfg: ConditionerConfig, *, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.norm1 = _layer_norm(cfg, rngs)
    self.attn = MultiHeadSelfAttention(cfg, rngs=rngs)
    self.norm2 = _layer_norm(cfg, rngs)
    self.ffn_in = _linear(cfg, cfg.context_dim, cfg.ffn_dim, ("embed", "mlp"), rngs=rngs)
    self.ffn_out = _linear(cfg, cfg.ffn_dim, cfg.context_dim, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x: jax.Array, key: jax.Array, deterministic: bool) -> jax.Array:
    """x (B, L, C) -> (B, L, C)."""
    k_attn, k_res1, k_ffn, k_res2 = jax.random.split(key, 4)
    x = x + _dropout(self.attn(self.norm1(x), k_attn, deterministic), self.dropout, k_res1,
                     deterministic)
    h = jax.nn.relu(self.ffn_in(self.norm2(x)))
    h = self.ffn_out(_dropout(h, self.dropout, k_ffn, deterministic))
    x = x + _dropout(h, self.dropout, k_res2, deterministic)
    return constrain(x, ("batch", "length", "embed"))


class TextMixer(nnx.Module):
  """`num_layers` identical EncoderLayers, stacked (leading "layers" axis) and scanned."""

  def __init__(self, cfg: ConditionerConfig, *, rngs: nnx.Rngs):
    self.num_layers = cfg.num_layers

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> EncoderLayer:
      return EncoderLayer(cfg, rngs=rngs)

    self.layers = make(rngs)

  def __call__(self, x: jax.Array, key: jax.Array, deterministic: bool) -> jax.Array:
    """x (B, L, C) -> (B, L, C); `key` feeds dropout (one subkey per layer)."""
    keys = jax.random.split(key, self.num_layers)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run(x, layer, k):
      return layer(x, k, deterministic)

    return run(x, self.layers, keys)


class Conditioner(nnx.Module):
  """proj_img, proj_txt and the text mixer; builds the UNet's cross-attention context."""

  def __init__(self, cfg: ConditionerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.proj_img = _linear(cfg, cfg.llm_dim, cfg.context_dim, ("mlp", "embed"), rngs=rngs)
    self.proj_txt = _linear(cfg, cfg.llm_dim, cfg.context_dim, ("mlp", "embed"), rngs=rngs)
    self.mix = TextMixer(cfg, rngs=rngs)

  def context_length(self, num_image_tokens: int = 256, *, use_image: bool = True,
                     use_text: bool = True) -> int:
    n = self.cfg.text_len
    return n + (num_image_tokens if use_image else 0) + (self.cfg.text_len if use_text else 0)

  def image_tokens(self, h_img: jax.Array) -> jax.Array:
    """H_i (B, N, llm_dim) -> (B, N, C)."""
    return self.proj_img(h_img.astype(self.cfg.dtype))

  def text_tokens(self, h_txt: jax.Array, *, deterministic: bool = True,
                  rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """H_t (B, T, llm_dim), any T -> (B, text_len, C)."""
    x = self.proj_txt(pad_text_features(h_txt, self.cfg.text_len).astype(self.cfg.dtype))
    x = constrain(x, ("batch", "length", "embed"))
    return self.mix(x, _dropout_key(rngs, deterministic), deterministic)

  def __call__(self, clip_text: jax.Array, h_img: jax.Array, h_txt: jax.Array, *,
               use_image: bool = True, use_text: bool = True, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """The conditional context.

    Args:
      clip_text: (B, text_len, C) CLIP text encoder output for the description.
      h_img: (B, 256, llm_dim) VLLM image embeddings H_i (any float dtype; cast to `dtype`).
      h_txt: (B, T, llm_dim) VLLM text embeddings H_t, T arbitrary (padded / truncated here).
      use_image, use_text: ablation switches; a switched-off block is left out (see module doc).
      deterministic: False turns dropout on in the mixer; it then needs `rngs` (an nnx.Rngs,
        whose `dropout` stream is used, or a JAX key).
    Returns:
      (B, text_len + 256*use_image + text_len*use_text, C) in `dtype`.
    """
    parts = [clip_text.astype(self.cfg.dtype)]
    if use_image:
      parts.append(self.image_tokens(h_img))
    if use_text:
      parts.append(self.text_tokens(h_txt, deterministic=deterministic, rngs=rngs))
    return constrain(jnp.concatenate(parts, axis=1), ("batch", "length", "embed"))

  def unconditional(self, clip_empty: jax.Array, num_image_tokens: int = 256, *,
                    use_image: bool = True, use_text: bool = True) -> jax.Array:
    """The guidance-free context: [CLIP(""), zeros, zeros] (the release zeroes the PROJECTED
    tokens, so the projections' biases do not leak in). clip_empty (B, text_len, C)."""
    b, _, c = clip_empty.shape
    n = (num_image_tokens if use_image else 0) + (self.cfg.text_len if use_text else 0)
    zeros = jnp.zeros((b, n, c), self.cfg.dtype)
    return jnp.concatenate([clip_empty.astype(self.cfg.dtype), zeros], axis=1)


def _dropout_key(rngs: nnx.Rngs | jax.Array | None, deterministic: bool) -> jax.Array:
  if deterministic:
    return jax.random.key(0)  # unused; only fills the scan's key slot
  if rngs is None:
    raise ValueError("deterministic=False needs rngs (nnx.Rngs or a JAX key) for dropout")
  if isinstance(rngs, nnx.Rngs):
    return rngs.dropout()
  return rngs


def num_params(cfg: ConditionerConfig) -> int:
  """Closed form: two projections + num_layers encoder layers (packed qkv, out, FFN, 2 norms)."""
  c, f = cfg.context_dim, cfg.ffn_dim
  proj = 2 * (cfg.llm_dim * c + c)
  layer = (3 * c * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c) + 2 * (2 * c)
  return proj + cfg.num_layers * layer


# --- PyTorch names of the LEGO release ---------------------------------------------------------

_MIX = "self_attn_mix.layers.{l}."
CONDITIONER_RULES: tuple[Rule, ...] = (
    Rule("projection_img.weight", "proj_img.kernel", Kind.LINEAR),
    Rule("projection_img.bias", "proj_img.bias"),
    Rule("projection_txt.weight", "proj_txt.kernel", Kind.LINEAR),
    Rule("projection_txt.bias", "proj_txt.bias"),
    Rule(_MIX + "self_attn.in_proj_weight", "mix.layers.attn.qkv.kernel", Kind.LINEAR, stack="l"),
    Rule(_MIX + "self_attn.in_proj_bias", "mix.layers.attn.qkv.bias", stack="l"),
    Rule(_MIX + "self_attn.out_proj.weight", "mix.layers.attn.out.kernel", Kind.LINEAR, stack="l"),
    Rule(_MIX + "self_attn.out_proj.bias", "mix.layers.attn.out.bias", stack="l"),
    Rule(_MIX + "linear1.weight", "mix.layers.ffn_in.kernel", Kind.LINEAR, stack="l"),
    Rule(_MIX + "linear1.bias", "mix.layers.ffn_in.bias", stack="l"),
    Rule(_MIX + "linear2.weight", "mix.layers.ffn_out.kernel", Kind.LINEAR, stack="l"),
    Rule(_MIX + "linear2.bias", "mix.layers.ffn_out.bias", stack="l"),
    Rule(_MIX + "norm1.weight", "mix.layers.norm1.scale", stack="l"),
    Rule(_MIX + "norm1.bias", "mix.layers.norm1.bias", stack="l"),
    Rule(_MIX + "norm2.weight", "mix.layers.norm2.scale", stack="l"),
    Rule(_MIX + "norm2.bias", "mix.layers.norm2.bias", stack="l"),
)

# The other parts of a LEGO / SD single-file LDM checkpoint: their own loaders read them.
LDM_CHECKPOINT_OTHER_PARTS: tuple[str, ...] = (
    r"^model\.diffusion_model\.",
    r"^model_ema\.",
    r"^first_stage_model\.",
    r"^cond_stage_model\.",
    # DDPM schedule buffers of CompVis' LatentDiffusion (recomputed by infer/schedule.py).
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar)$",
)


def load_conditioner(model: Conditioner,
                     source: str | Path | Mapping[str, np.ndarray],
                     ignore: tuple[str, ...] = LDM_CHECKPOINT_OTHER_PARTS) -> Conditioner:
  """Fills `model` from a LEGO checkpoint (a path `read_state_dict` reads, or a state dict).

  `model` may be abstract (`nnx.eval_shape(lambda: Conditioner(cfg, rngs=nnx.Rngs(0)))`): then
  no random initialisation is computed before it is overwritten.
  Every key must be a conditioner key or match `ignore` (by default: the UNet, EMA, VAE, CLIP
  text and schedule buffers of the same file); anything else raises KeyMappingError.
  """
  state_dict = source if isinstance(source, Mapping) else weights_io.read_state_dict(source)
  arrays = torch_to_jax(state_dict, CONDITIONER_RULES, param_shapes(model), ignore=ignore,
                        source=str(source) if not isinstance(source, Mapping) else "state dict")
  return load_params(model, arrays)


def conditioner_state_dict(model: Conditioner) -> dict[str, np.ndarray]:
  """The model's parameters under the release's PyTorch names (for export)."""
  return jax_to_torch(flat_params(model), CONDITIONER_RULES)
