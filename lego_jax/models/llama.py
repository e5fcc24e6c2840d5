"""LLaMA / LLaMA-2 decoder in Flax NNX, with a fixed-shape KV cache and PyTorch key maps.

Architecture (identical to transformers' `LlamaForCausalLM`): token embedding; `num_layers`
pre-norm blocks [RMSNorm -> attention with rotary embeddings (rotate-half convention, GQA when
num_kv_heads < num_heads) -> residual; RMSNorm -> SwiGLU MLP -> residual]; final RMSNorm; lm_head.

The blocks are created with `nnx.vmap` and run with `nnx.scan`, so every block parameter has a
leading layer axis (logical name "layers") and compile time does not grow with depth.

Padding convention: sequences are RIGHT-padded. Row b holds its real tokens first; `lengths[b]`
counts them. With causal attention a real token never sees the padding after it, so no key mask
is needed for training or prefill, token t of every row sits at position t exactly as if the row
ran alone, and the cache of row b is filled in slots [0, lengths[b]).

KV cache: `KVCache(k, v, lengths)` with k, v of shape (layers, batch, max_len, kv_heads, head_dim)
(or, for per-layer weights, tuples of one (batch, max_len, kv_heads, head_dim) buffer per layer)
and lengths (batch,) int32 = filled slots per row. A call with a cache writes its T new keys and
values into slots lengths[b] .. lengths[b] + T - 1 of each row and attends over the whole
fixed-size buffer with a per-row mask, so one prefill then any number of one-token decode steps
all keep static shapes (one compilation of the step, usable inside `lax.while_loop`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.models.layers import attention_impl
from lego_jax.parallel.sharding import constrain
from lego_jax.weights import io, mapping, pretrained
from lego_jax.weights.mapping import Kind, Rule
from lego_jax.weights.state import flat_params, load_params, param_shapes


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Field names follow the `llama` section of configs/lego_ego4d.py; defaults = LLaMA-2-13B."""
  vocab_size: int = 32000
  hidden_size: int = 5120
  intermediate_size: int = 13824
  num_layers: int = 40
  num_heads: int = 40
  num_kv_heads: int = 40
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position: int = 4096        # longest trained position (rotary tables are computed on the fly)
  tie_embeddings: bool = False
  dtype: Any = jnp.float32         # compute dtype
  param_dtype: Any = jnp.float32
  remat: bool = False              # recompute each block in the backward pass (saves activations)
  # Attention kernel of the cache-free, segment-free path (training, scoring): "auto" = cuDNN
  # flash attention on GPUs in bf16/fp16 with a head_dim it takes, XLA elsewhere; None = XLA;
  # "cudnn" = forced. Cached decoding always uses XLA (its per-row masks are not cuDNN's).
  attention_impl: str | None = "auto"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_heads {self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                       f"num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer in a fixed-size buffer, plus the filled length of each row.

  k, v: (layers, batch, max_len, kv_heads, head_dim), or tuples of per-layer (batch, max_len,
  kv_heads, head_dim) buffers (`init_cache(per_layer=True)`, for calls with per-layer weights);
  lengths: (batch,) int32. A call appending T tokens needs lengths + T <= max_len in every row
  (size it prompt + new tokens).
  """
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  lengths: jax.Array

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, (tuple, list))

  @property
  def max_len(self) -> int:
    return (self.k[0] if self.per_layer else self.k).shape[-3]


_CACHE_AXES = ("layers", "batch", "kv_length", "heads", "kv")


def _normal(std: float, names: tuple[str, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), names)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, the statistics in fp32 whatever the compute dtype (as transformers)."""

  def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("norm",))(
        jax.random.key(0), (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale.get_value().astype(self.dtype) * normed.astype(self.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape (B, T, head_dim) for integer positions (B, T), transformers' layout.

  The angles are computed in fp32 (as transformers) and only then cast to the compute dtype.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: (B, T, heads, head_dim); rotate-half convention: x*cos + [-x2, x1]*sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LlamaAttention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.impl = attention_impl(cfg.attention_impl, cfg.dtype, cfg.head_dim)
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda i, o, names: nnx.Linear(i, o, use_bias=False, dtype=cfg.dtype,
                                           param_dtype=cfg.param_dtype,
                                           kernel_init=_normal(0.02, names), rngs=rngs)
    self.q_proj = dense(e, h * d, ("embed", "heads"))
    self.k_proj = dense(e, kv * d, ("embed", "heads"))
    self.v_proj = dense(e, kv * d, ("embed", "heads"))
    self.o_proj = dense(h * d, e, ("heads", "embed"))

  def __call__(self, x, cos, sin, mask, kv, write_at):
    """x: (B, T, E). Without a cache (`kv` None) attention is causal within x, `mask`
    (B, 1, T, T) optionally restricting it further (packed segments). With a cache, `kv` =
    (k, v) buffers (B, S, kv_heads, head_dim) of this layer, the new keys go to slots
    write_at[b] + t and `mask` (B, 1, T, S) says which slots each query sees.
    Returns (B, T, E) and the updated (k, v) buffers (or None)."""
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "kv"))
    k = apply_rope(k, cos, sin)
    if kv is None:
      impl = self.impl if mask is None else None
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)
      new_kv = None
    else:
      k_buf, v_buf = kv
      write = jax.vmap(
          lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, 0))
      k_buf = write(k_buf, k.astype(k_buf.dtype), write_at)
      v_buf = write(v_buf, v.astype(v_buf.dtype), write_at)
      out = jax.nn.dot_product_attention(q, k_buf.astype(q.dtype), v_buf.astype(q.dtype), mask=mask)
      new_kv = (k_buf, v_buf)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
    return self.o_proj(out), new_kv


class LlamaMLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    dense = lambda i, o, names: nnx.Linear(i, o, use_bias=False, dtype=cfg.dtype,
                                           param_dtype=cfg.param_dtype,
                                           kernel_init=_normal(0.02, names), rngs=rngs)
    self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
    self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
    self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ("batch", "length", "mlp")))


class LlamaBlock(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype)
    self.input_layernorm = norm()
    self.self_attn = LlamaAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = norm()
    self.mlp = LlamaMLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask, write_at, kv):
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, write_at)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("batch", "length", "embed")), kv


def fold_layer_grads(graphdef, stacked, acc, x, cos, sin, mask):
  """The blocks (`graphdef`, their stacked state) run over x as the layer scan does, with a
  backward pass that adds each block's weight gradient into the accumulator `acc` (same tree as
  `stacked`) in place, layer by layer, and returns that as `acc`'s cotangent; `stacked` gets
  none. jax.grad's own layer scan returns the blocks' gradient as a fresh stacked array, added to
  an accumulator afterwards: one more buffer the size of the blocks' weights per micro-batch
  (docs/plan-targets.md, 2026-12-04). As remat: the forward pass keeps each block's input, the
  backward pass recomputes the block from it; the arithmetic is that of jax.grad's."""

  def block(state, h, cos, sin, mask):
    return nnx.merge(graphdef, state)(h, cos, sin, mask, None, None)[0]

  def forward(stacked, x, cos, sin, mask):
    # The blocks' inputs, what the backward pass starts each block from.
    def body(h, state):
      return block(state, h, cos, sin, mask), h
    return jax.lax.scan(body, x, stacked)

  @jax.custom_vjp
  def stack(stacked, acc, x, cos, sin, mask):
    return forward(stacked, x, cos, sin, mask)[0]

  def stack_fwd(stacked, acc, x, cos, sin, mask):
    h, inputs = forward(stacked, x, cos, sin, mask)
    return h, (stacked, acc, inputs, cos, sin, mask)

  def stack_bwd(res, ct):
    stacked, acc, inputs, cos, sin, mask = res

    def body(carry, i):
      ct_h, acc = carry
      state = jax.tree.map(lambda a: a[i], stacked)
      _, vjp = jax.vjp(lambda s, h: block(s, h, cos, sin, mask), state, inputs[i])
      grads, ct_h = vjp(ct_h)
      acc = jax.tree.map(
          lambda a, g: jax.lax.dynamic_update_index_in_dim(a, a[i] + g.astype(a.dtype), i, 0),
          acc, grads)
      return (ct_h, acc), None

    n = jax.tree.leaves(stacked)[0].shape[0]
    (ct_x, acc), _ = jax.lax.scan(body, (ct, acc), jnp.arange(n), reverse=True)
    return None, acc, ct_x, None, None, None

  stack.defvjp(stack_fwd, stack_bwd)
  return stack(stacked, acc, x, cos, sin, mask)


class Llama(nnx.Module):
  """LlamaForCausalLM. Build: `Llama(LlamaConfig(**cfg.llama), rngs=nnx.Rngs(0))`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype,
                                  embedding_init=_normal(0.02, ("vocab", "embed")), rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return LlamaBlock(cfg, rngs=rngs)

    self.layers = make_blocks(rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype,
                                kernel_init=_normal(0.02, ("embed", "vocab")), rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> KVCache:
    """An empty cache of `max_len` slots per row (dtype defaults to the compute dtype);
    `per_layer`: one buffer per layer, the cache of calls with `layers=self.layer_states()`."""
    cfg = self.config
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    if per_layer:
      zeros = lambda: tuple(constrain(jnp.zeros(shape, dtype), _CACHE_AXES[1:])
                            for _ in range(cfg.num_layers))
    else:
      zeros = lambda: constrain(jnp.zeros((cfg.num_layers, *shape), dtype), _CACHE_AXES)
    return KVCache(zeros(), zeros(), jnp.zeros((batch,), jnp.int32))

  def layer_states(self) -> list[nnx.State]:
    """The blocks' parameters as one state per layer, for `hidden_states(layers=...)`.

    Why: inside XLA:GPU's decode loop, a GEMM cannot read its weight from a slice of the stacked
    (layers, in, out) array; XLA first copies every layer's weights out of it, each step (3x the
    weight traffic of LLaMA-2-13B decoding at batch 1; at batch 16 the stacked KV cache is copied
    too: docs/experiments/2026-12-04-decode-weights.md). Separate per-layer buffers are read in
    place. Under jit the slices are one copy of the blocks' weights (made once per call, held
    while it runs)."""
    _, stacked = nnx.split(self.layers)
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.config.num_layers)]

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(B, T) int -> (B, T, hidden) in the compute dtype."""
    return constrain(self.embed_tokens(input_ids), ("batch", "length", "embed"))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-norm hidden states (..., hidden) -> logits (..., vocab)."""
    out = self.embed_tokens.attend(hidden) if self.config.tie_embeddings else self.lm_head(hidden)
    return constrain(out, ("batch", "length", "vocab")) if out.ndim == 3 else out

  def hidden_states(self, input_ids: jax.Array | None = None, *,
                    inputs_embeds: jax.Array | None = None,
                    positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None,
                    lengths: jax.Array | None = None,
                    cache: KVCache | None = None,
                    layer_grads: Any = None,
                    layers: list[nnx.State] | None = None) -> tuple[jax.Array, KVCache | None]:
    """The decoder without lm_head: last hidden state AFTER the final RMSNorm, (B, T, hidden).

    Args:
      input_ids: (B, T) int tokens, or `inputs_embeds` (B, T, hidden) instead.
      positions: (B, T) rotary positions; default = slot index (t, or cache length + t).
      segment_ids: (B, T) int, cache-free calls only: tokens attend only within their segment
        (packed sequences; give `positions` restarting at 0 per segment too).
      lengths: (B,) real (non-padding) tokens of each right-padded row of THIS call; only used
        to advance the cache lengths (default T).
      cache: a `KVCache` to append to and attend over.
      layer_grads: training only (no cache): a gradient accumulator of the blocks' parameters
        (the `nnx.State` of `self.layers`, fp32). Differentiated with respect to it, the call
        gives it plus the blocks' weight gradient, added layer by layer in the backward pass;
        the blocks' parameters themselves then get no gradient (`fold_layer_grads`).
      layers: inference: `self.layer_states()`, run as an unrolled loop of per-layer weights
        instead of the scan over the stacked ones (same numbers); a cache must be per-layer.
    Returns:
      (hidden (B, T, hidden), the updated cache or None).
    """
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("give exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
    x = constrain(x, ("batch", "length", "embed"))
    b, t, _ = x.shape
    steps = jnp.arange(t, dtype=jnp.int32)
    if cache is None:
      if positions is None:
        positions = jnp.broadcast_to(steps, (b, t))
      mask = None
      if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
      write_at, kv = None, None
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids are for cache-free (training) calls")
      if t > cache.max_len:
        raise ValueError(f"{t} tokens do not fit a cache of {cache.max_len} slots")
      if cache.per_layer != (layers is not None):
        raise ValueError("a per-layer cache goes with per-layer weights (layers=) and a stacked "
                         "cache with the stacked scan")
      write_at = cache.lengths
      query_slot = write_at[:, None] + steps                                    # (B, T)
      if positions is None:
        positions = query_slot
      mask = (jnp.arange(cache.max_len)[None, None, :] <= query_slot[:, :, None])[:, None]
      kv = (cache.k, cache.v)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)

    if layer_grads is not None:
      if cache is not None or layers is not None:
        raise ValueError("layer_grads is for cache-free (training) calls of the stacked blocks")
      graphdef, stacked = nnx.split(self.layers)
      x = fold_layer_grads(graphdef, stacked, layer_grads, x, cos, sin, mask)
      return self.norm(x), None

    def block(layer, x, cos, sin, mask, write_at, kv):
      return layer(x, cos, sin, mask, write_at, kv)

    if layers is not None:
      if len(layers) != cfg.num_layers:
        raise ValueError(f"{len(layers)} layer states for {cfg.num_layers} layers")
      graphdef, _ = nnx.split(self.layers)
      kv_in = [None] * cfg.num_layers if kv is None else list(zip(*kv))
      kv_out = []
      for state, layer_kv in zip(layers, kv_in):
        x, layer_kv = nnx.merge(graphdef, state)(x, cos, sin, mask, write_at, layer_kv)
        kv_out.append(layer_kv)
      kv = None if kv is None else tuple(zip(*kv_out))
      axes = _CACHE_AXES[1:]
    else:
      if cfg.remat:
        block = nnx.remat(block)
      scan = nnx.scan(block, in_axes=(0, nnx.Carry, None, None, None, None, 0),
                      out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
      x, kv = scan(self.layers, x, cos, sin, mask, write_at, kv)
      axes = _CACHE_AXES
    x = self.norm(x)
    if cache is not None:
      added = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
      keep = lambda a: jax.tree.map(lambda buf: constrain(buf, axes), a)
      cache = KVCache(keep(kv[0]), keep(kv[1]), cache.lengths + added)
    return x, cache

  def __call__(self, input_ids: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               lengths: jax.Array | None = None,
               cache: KVCache | None = None,
               layer_grads: Any = None,
               layers: list[nnx.State] | None = None
               ) -> tuple[jax.Array, jax.Array, KVCache | None]:
    """Arguments as `hidden_states`. Returns (logits (B, T, vocab), last hidden state after the
    final norm (B, T, hidden), the updated cache or None)."""
    hidden, cache = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                                       segment_ids=segment_ids, lengths=lengths, cache=cache,
                                       layer_grads=layer_grads, layers=layers)
    return self.logits(hidden), hidden, cache


# --- PyTorch key maps -------------------------------------------------------------------------

_BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")

# Buffers some checkpoints carry (transformers < 4.31 saved the rotary inv_freq of every layer).
LLAMA_IGNORE = (r"rotary_emb\.inv_freq$",)


def llama_rules(config: LlamaConfig, lm_prefix: str = "model.", head_prefix: str = "lm_head.",
                jax_prefix: str = "") -> list[Rule]:
  """Key map of transformers' LlamaForCausalLM (also the LM part of the original LLaVA repo).

  `lm_prefix` precedes embed_tokens/layers/norm and `head_prefix` the lm_head weight in the
  PyTorch names; `jax_prefix` precedes the NNX paths (e.g. "lm." inside LLaVA).
  """
  p, j = lm_prefix, jax_prefix
  rules = [Rule(f"{p}embed_tokens.weight", f"{j}embed_tokens.embedding")]
  rules += [Rule(f"{p}layers.{{l}}.{name}.weight", f"{j}layers.{name}.kernel", Kind.LINEAR,
                 stack="l") for name in _BLOCK_LINEARS]
  rules += [Rule(f"{p}layers.{{l}}.{name}.weight", f"{j}layers.{name}.scale", stack="l")
            for name in _BLOCK_NORMS]
  rules.append(Rule(f"{p}norm.weight", f"{j}norm.scale"))
  if not config.tie_embeddings:
    rules.append(Rule(f"{head_prefix}weight", f"{j}lm_head.kernel", Kind.LINEAR))
  return rules


def llama_ignore(config: LlamaConfig, head_prefix: str = "lm_head.") -> tuple[str, ...]:
  # With tied embeddings a stored lm_head is a copy of embed_tokens (some exporters write it).
  tied = (f"^{head_prefix.replace('.', '[.]')}weight$",) if config.tie_embeddings else ()
  return LLAMA_IGNORE + tied


def load_llama(model: Llama, source: Mapping[str, np.ndarray] | str | os.PathLike, *,
               lm_prefix: str = "model.", head_prefix: str = "lm_head.") -> Llama:
  """Fills `model` from a transformers LlamaForCausalLM state dict, or a weight file/directory.

  `model` may be abstract, `nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))`: then no
  random initialisation runs and no second copy of the weights is ever allocated.

  Raises `mapping.KeyMappingError` listing every unexpected, missing or mis-shaped key.
  """
  state_dict, name = io.as_state_dict(source)
  arrays = mapping.torch_to_jax(state_dict, llama_rules(model.config, lm_prefix, head_prefix),
                                param_shapes(model),
                                ignore=llama_ignore(model.config, head_prefix),
                                source=f"LLaMA checkpoint {name}")
  return load_params(model, arrays)


# --- Building from a transformers directory (see lego_jax/weights/pretrained.py) --------------


def _rope_theta(c: Mapping[str, Any]) -> float:
  # transformers 5 keeps it in rope_parameters, older files at the top level.
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise pretrained.PretrainedConfigError(
        f"rope_type={rope.get('rope_type', rope.get('type'))!r} is not supported (this model "
        "implements the default rotary embedding)")
  return float(rope.get("rope_theta", c.get("rope_theta") or 10000.0))


def _num_heads(c: Mapping[str, Any]) -> int:
  heads = c.get("num_attention_heads", 32)
  head_dim = c.get("head_dim")
  if head_dim is not None and head_dim != c.get("hidden_size", 4096) // heads:
    raise pretrained.PretrainedConfigError(
        f"head_dim={head_dim} is not supported (this model uses hidden_size / "
        f"num_attention_heads = {c.get('hidden_size', 4096) // heads})")
  return heads


# transformers' LlamaConfig (config.json) -> LlamaConfig: our field -> their key (with
# transformers' default where a file may leave it out), or a function of their config.
HF_CONFIG: dict[str, Any] = {
    "vocab_size": ("vocab_size", 32000),
    "hidden_size": ("hidden_size", 4096),
    "intermediate_size": ("intermediate_size", 11008),
    "num_layers": ("num_hidden_layers", 32),
    "num_heads": pretrained.named("num_attention_heads", _num_heads),
    # absent or null: as many kv heads as query heads (no GQA)
    "num_kv_heads": pretrained.named("num_key_value_heads", lambda c: c.get(
        "num_key_value_heads") or c.get("num_attention_heads", 32)),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "rope_theta": pretrained.named("rope_theta", _rope_theta),
    "max_position": ("max_position_embeddings", 2048),
    "tie_embeddings": ("tie_word_embeddings", False),
}
# Settings of theirs this model implements one way only: key -> (default, other allowed values).
HF_REQUIRE: dict[str, tuple] = {"hidden_act": ("silu",), "attention_bias": (False,),
                                "mlp_bias": (False,)}


def llama_weight_facts(lm_prefix: str = "model.") -> dict[str, Any]:
  """Config fields read off the weights (checked against config.json before loading)."""
  p = lm_prefix
  return {
      "vocab_size": pretrained.dim(f"{p}embed_tokens.weight", 0),
      "hidden_size": pretrained.dim(f"{p}embed_tokens.weight", 1),
      "num_layers": pretrained.count(f"{p}layers."),
      "intermediate_size": pretrained.dim(f"{p}layers.0.mlp.gate_proj.weight", 0),
      "num_kv_heads": lambda sd, f: int(np.shape(sd[f"{p}layers.0.self_attn.k_proj.weight"])[0]
                                        // (f["hidden_size"] // f["num_heads"])),
  }


def llama_config_from_hf(config: Mapping[str, Any], source: str = "config.json",
                         **overrides) -> LlamaConfig:
  """LlamaConfig from a transformers config dict; `overrides` of fields it states must agree."""
  stated = pretrained.translate(config, HF_CONFIG, HF_REQUIRE, source)
  return LlamaConfig(**pretrained.settle(stated, overrides, source, HF_CONFIG))


def from_pretrained(path: str | os.PathLike, **overrides) -> Llama:
  """A LlamaForCausalLM directory (config.json + safetensors or .bin shards) -> a filled Llama.

  The sizes come from config.json; `overrides` set what it does not say (dtype, param_dtype,
  remat, attention_impl) and must agree with what it does. A config.json that disagrees with its
  weights is refused naming the field.
  """
  cfg_path = pretrained.require_config(path, "LLaMA")
  config = llama_config_from_hf(pretrained.read_json(cfg_path), str(cfg_path), **overrides)
  state_dict = io.read_state_dict(path)
  pretrained.check_weights(dataclasses.asdict(config), state_dict, llama_weight_facts(),
                           str(path))
  return load_llama(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), state_dict)


def export_llama(model: Llama) -> dict[str, np.ndarray]:
  """The model's parameters under transformers LlamaForCausalLM names (PyTorch layouts)."""
  return mapping.jax_to_torch(flat_params(model), llama_rules(model.config))


def save_llama(model: Llama, path) -> Any:
  """Writes `export_llama(model)` as one safetensors file; returns its path."""
  return io.write_safetensors(export_llama(model), path, metadata={"format": "pt"})
