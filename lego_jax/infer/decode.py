"""KV-cache text generation for `Llama` (and LLaVA): one prefill, then a fixed-shape decode step
run inside `jax.lax.while_loop`, all under one `jax.jit`.

Besides the tokens it returns LEGO's text embedding H_t: for every generation step the last-layer
hidden state (after the final RMSNorm) at the position that predicted the step's token. Row 0 is
the last prompt position, row i >= 1 the i-th generated token (the last generated token has no row,
it predicts nothing). This is exactly what the LEGO release stacks from transformers'
`generate(output_hidden_states=True)`: `hidden_states[w][-1][:, -1]` for every step w.

Prompts are RIGHT-padded (see lego_jax/models/llama.py): row b's real tokens are its first
`lengths[b]`; every row then decodes at its own cache slot and positions, so a batch of prompts of
different lengths gives each row what it would give alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.models.llama import Llama
from lego_jax.models.llava import Llava


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("greedy", "temperature", "top_p", "top_k", "eos_id", "pad_id",
                                "min_new_tokens"),
                   meta_fields=("max_new_tokens", "unstack_layers"))
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen. Greedy (argmax) or temperature -> top-k -> top-p sampling, the order
  of transformers' logits warpers. The LEGO release samples with temperature 0.2, top_p 1.0 and
  (transformers' default at the time) top_k 50.

  Generation stops at the tokenizer's end-of-sequence token: build the config with
  `SamplingConfig.for_tokenizer(tok, ...)` or give `eos_id` (-1: never stop early); a config
  without one is refused rather than stopping at a guessed id. `min_new_tokens` keeps EOS from
  being chosen before that many tokens (transformers' MinNewTokensLengthLogitsProcessor).

  `unstack_layers` says how the step runs, not what it computes: the blocks run from per-layer
  copies of their weights (`Llama.layer_states`; on XLA:GPU the stacked scan copies every layer's
  weights each step) at the cost of one copy of the blocks' weights while a call runs; False
  keeps the stacked scan (half the weight memory).

  A pytree: only `max_new_tokens` and `unstack_layers` are static, so changing the other knobs
  does not recompile.
  """
  max_new_tokens: int = 1024
  greedy: bool = False
  temperature: float = 0.2
  top_p: float = 1.0
  top_k: int = 0                 # 0 = no top-k filter
  eos_id: int | None = None      # the tokenizer's end-of-sequence id (see for_tokenizer)
  pad_id: int = 0                # written after a row's end-of-sequence token
  min_new_tokens: int = 0        # EOS is masked out while fewer tokens than this were generated
  unstack_layers: bool = True    # per-layer weight copies in the decode loop (see above)

  def traced(self) -> "SamplingConfig":
    """The knobs as arrays of fixed dtypes: what the jitted generation takes, so that a change
    of temperature, top-k/p, EOS or padding does not recompile it."""
    return dataclasses.replace(
        self, greedy=jnp.asarray(self.greedy, bool),
        temperature=jnp.asarray(self.temperature, jnp.float32),
        top_p=jnp.asarray(self.top_p, jnp.float32), top_k=jnp.asarray(self.top_k, jnp.int32),
        eos_id=jnp.asarray(self.eos_id, jnp.int32), pad_id=jnp.asarray(self.pad_id, jnp.int32),
        min_new_tokens=jnp.asarray(self.min_new_tokens, jnp.int32))

  @classmethod
  def for_tokenizer(cls, tokenizer, **knobs) -> "SamplingConfig":
    """Stops at `tokenizer`'s EOS and pads with its pad id (eos when it has none). Takes the
    project's Tokenizer (eos_id / pad_id) and transformers' (eos_token_id / pad_token_id)."""
    eos = getattr(tokenizer, "eos_id", None)
    eos = getattr(tokenizer, "eos_token_id", None) if eos is None else eos
    if eos is None:
      raise ValueError(f"{type(tokenizer).__name__} has no end-of-sequence id; give eos_id")
    pad = getattr(tokenizer, "pad_id", getattr(tokenizer, "pad_token_id", None))
    return cls(**{"eos_id": int(eos), "pad_id": int(eos if pad is None or pad < 0 else pad),
                  **knobs})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
  """tokens: (B, N) int32, `pad_id` after each row's EOS; hidden: (B, N, hidden) H_t, zero rows
  after each row's last step; num_tokens: (B,) int32 tokens generated per row, EOS included
  (= valid rows of `hidden`). N = max_new_tokens."""
  tokens: jax.Array
  hidden: jax.Array
  num_tokens: jax.Array


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature, top-k and top-p (nucleus) on logits (B, V) -> fp32 logits, removed = -inf.

  top-k keeps the k best; top-p then keeps the smallest set of best tokens whose probability mass
  reaches `top_p` (a token stays while the mass ranked above it is < top_p), at least the best.
  Works with python or traced knob values.
  """
  temperature = jnp.where(config.temperature > 0, config.temperature, 1.0)
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  ranked = jnp.sort(logits, axis=-1)[..., ::-1]
  k = jnp.where(config.top_k > 0, jnp.minimum(config.top_k, vocab), vocab)
  kth = jnp.take(ranked, k - 1, axis=-1)[..., None]
  ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  # top_p >= 1 keeps everything even where rounding lets the cumulative mass pass 1.
  keep = ((mass_above < config.top_p) | (config.top_p >= 1.0)) & (ranked >= kth)
  cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def next_token(logits: jax.Array, key: jax.Array, config: SamplingConfig,
               step: int | jax.Array = None) -> jax.Array:
  """logits (B, V) -> tokens (B,) int32: argmax when greedy (or temperature 0), else a draw.

  `step` (how many tokens were generated before this one) < `config.min_new_tokens` masks EOS.
  """
  if step is not None:
    early = (jnp.asarray(step) < config.min_new_tokens) & (
        jnp.arange(logits.shape[-1]) == config.eos_id)
    logits = jnp.where(early, -jnp.inf, logits.astype(jnp.float32))
  best = jnp.argmax(logits, axis=-1)
  drawn = jax.random.categorical(key, filter_logits(logits, config), axis=-1)
  greedy = jnp.logical_or(config.greedy, config.temperature == 0)
  return jnp.where(greedy, best, drawn).astype(jnp.int32)


def _generate(graphdef, state, inputs_embeds, lengths, key, config: SamplingConfig, cache_dtype):
  lm: Llama = nnx.merge(graphdef, state)
  b, t, e = inputs_embeds.shape
  n = config.max_new_tokens
  layers = lm.layer_states() if config.unstack_layers else None
  cache = lm.init_cache(b, t + n, cache_dtype, per_layer=config.unstack_layers)
  hidden, cache = lm.hidden_states(inputs_embeds=inputs_embeds, lengths=lengths, cache=cache,
                                   layers=layers)
  h = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]    # (B, E)
  tok = next_token(lm.logits(h), jax.random.fold_in(key, 0), config, 0)
  tokens = jnp.full((b, n), config.pad_id, jnp.int32).at[:, 0].set(tok)
  rows = jnp.zeros((b, n, e), h.dtype).at[:, 0].set(h)
  done = tok == config.eos_id
  num = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, _, _, done, _, _ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, tok, cache, tokens, rows, done, num, (params, layers) = carry
    # The parameters travel in the (loop-invariant) carry: NNX refuses to run its scan over
    # variables that hold tracers of an outer trace level.
    lm_step: Llama = nnx.merge(graphdef, params)
    hidden, cache = lm_step.hidden_states(tok[:, None], cache=cache, layers=layers)
    h = hidden[:, 0]
    new = next_token(lm_step.logits(h), jax.random.fold_in(key, step), config, step)
    new = jnp.where(done, config.pad_id, new)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, step, axis=1)
    rows = jax.lax.dynamic_update_index_in_dim(rows, jnp.where(done[:, None], 0, h), step, axis=1)
    num = num + (~done).astype(jnp.int32)
    done = done | (new == config.eos_id)
    return step + 1, new, cache, tokens, rows, done, num, (params, layers)

  carry = (jnp.int32(1), tok, cache, tokens, rows, done, num, (state, layers))
  _, _, _, tokens, rows, _, num, _ = jax.lax.while_loop(cond, body, carry)
  return Generation(tokens, rows, num)


# XLA:GPU's dot merger joins the q, k and v projections (dots that share their input) into one
# dot over the concatenated weights; where the GEMM cannot read that concatenation fused (cuBLAS),
# it is a copy of those weights in every decode step (seen in the deviceless H200 compile at batch
# 16, docs/experiments/2026-12-04-decode-weights.md). Threshold 0 MB: no merging.
GPU_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


def compiler_options(platform: str) -> dict | None:
  """The decode loop's XLA options for a device platform ("cpu", "gpu"/"cuda", "tpu")."""
  return dict(GPU_COMPILER_OPTIONS) if platform in ("gpu", "cuda", "rocm") else None


@functools.cache
def _generate_jit(platform: str):
  return jax.jit(_generate, static_argnames=("graphdef", "cache_dtype"),
                 compiler_options=compiler_options(platform))


def _platform(tree) -> str:
  leaf = jax.tree.leaves(tree)[0]
  return next(iter(leaf.devices())).platform if hasattr(leaf, "devices") else jax.default_backend()


def generate(lm: Llama, inputs_embeds: jax.Array, lengths: jax.Array, config: SamplingConfig,
             seed: int | jax.Array = 0, cache_dtype=None) -> Generation:
  """Generates up to `config.max_new_tokens` tokens per row after right-padded prompts.

  Args:
    lm: the language model.
    inputs_embeds: (B, T, hidden) prompt embeddings (`lm.embed(ids)`, or LLaVA's with the image
      features spliced in), right-padded.
    lengths: (B,) int real prompt tokens per row (>= 1).
    config: sampling settings (one compilation per max_new_tokens and input shape).
    seed: int or PRNG key; step i samples with fold_in(key, i).
    cache_dtype: KV-cache dtype, default the model's compute dtype.
  Returns:
    `Generation` (tokens, H_t hidden rows, tokens per row).
  """
  if config.eos_id is None:
    raise ValueError("SamplingConfig.eos_id is not set: build it with "
                     "SamplingConfig.for_tokenizer(tokenizer, ...) or give eos_id (-1: no stop)")
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  graphdef, state = nnx.split(lm)
  run = _generate_jit(_platform(state))
  return run(graphdef, state, inputs_embeds, jnp.asarray(lengths, jnp.int32), key, config.traced(),
             cache_dtype=jnp.dtype(cache_dtype or lm.config.dtype))


def generate_from_ids(lm: Llama, input_ids: jax.Array, lengths: jax.Array, config: SamplingConfig,
                      seed: int | jax.Array = 0, cache_dtype=None) -> Generation:
  """`generate` for right-padded token prompts (B, T)."""
  return generate(lm, _embed(lm, jnp.asarray(input_ids)), lengths, config, seed, cache_dtype)


@nnx.jit
def _embed(lm, input_ids):
  return lm.embed(input_ids)


def generate_llava(model: Llava, input_ids: jax.Array, pixels: jax.Array, lengths: jax.Array,
                   config: SamplingConfig, seed: int | jax.Array = 0, cache_dtype=None
                   ) -> tuple[Generation, jax.Array]:
  """LLaVA generation: right-padded `input_ids` (B, T) with expanded image placeholders and
  `pixels` (B, S, S, 3). Returns (the `Generation`, H_i image features (B, patches, hidden))."""
  embeds, features = _llava_inputs(model, jnp.asarray(input_ids), jnp.asarray(pixels))
  return generate(model.lm, embeds, lengths, config, seed, cache_dtype), features


@nnx.jit
def _llava_inputs(model, input_ids, pixels):
  features = model.image_features(pixels)
  return model.embed_inputs(input_ids, image_features=features), features
