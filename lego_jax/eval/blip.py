"""BLIP image captioner (BLIP-B / BLIP-L caption scores), Flax NNX.

The metric, as LEGO's release computes it (BolinLai/LEGO `metrics/all_metrics_in_one.py`,
`compute_blip_caption` + `compute_text_similarity`): the GENERATED frame is captioned by BLIP (the
captioning checkpoints `model_base_caption_capfilt_large.pth` for BLIP-B and
`model_large_caption.pth` for BLIP-L, prompt "a picture of", beam search with 3 beams,
max_length 20, min_length 5, repetition penalty 1.0); the caption (the decoded text after the
prompt) and the pair's ground-truth enriched action description (the LEGO annotation JSON's
`llava_forecast_finetune` field of `edits[clip_id][action_id]`) are embedded with EgoVLP's text
encoder (DistilBERT [CLS] -> txt_proj, the text side of egovlp.pth / epic_mir_plus.pth, tokenizer
distilbert-base-uncased, truncation at 512 tokens); the score is their cosine similarity, averaged
over pairs. Neither the ground-truth frame nor the action label enters the score.

Preprocessing as the release's `transform_test`: PIL bicubic resize of the RGB file to 384x384
(squash), ToTensor, CLIP mean/std (BlipImageProcessor does the same).

The network is transformers' `BlipForConditionalGeneration`: a ViT (BLIP-B ViT-B/16, BLIP-L
ViT-L/16, 384 px, pre-LN, exact GELU, the final LayerNorm on every token) and a BERT-base decoder
(post-LN; causal self-attention, cross-attention to the image tokens, an LM head tied to the word
embeddings). Two key layouts are read: the Hugging Face snapshots (Salesforce/blip-image-captioning-
base / -large: `vision_model.*`, `text_decoder.*`) and the original BLIP checkpoints the release
downloads (`visual_encoder.*` timm names, `text_decoder.*`, under "model"). The ViT LayerNorm eps is
1e-6 in the original code and whatever config.json says in a snapshot.

Decoding is fixed-shape and jitted: a token buffer of max_length columns, one position per step
through the decoder with a self-attention key/value cache (reordered with the beams), the image
keys/values of every cross-attention computed once; the loop ends when every caption has ended.
Greedy matches transformers' greedy search. Beam search scores finished hypotheses as the
release's transformers 4.19.2 did (sum log-prob / whole length, prompt included, EOS excluded;
the default) or as current transformers does (/ generated length, EOS included): the two can pick
different captions when hypotheses of different lengths are close (see `beam_captions`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from lego_jax.eval import egovlp as ev
from lego_jax.eval.egovlp import cosine
from lego_jax.eval.weight_files import MissingWeightsError, find_weights
from lego_jax.weights import io as weights_io
from lego_jax.weights import state as weights_state
from lego_jax.weights.mapping import Kind, KeyMappingError, Rule, torch_to_jax

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "a picture of"   # the release's config (BLIP's own default has a trailing space)


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  # vision (ViT-B/16 at 384; BLIP-L: 1024 wide, 24 layers, 16 heads, MLP 4096)
  vision_hidden: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp: int = 3072
  image_size: int = 384
  patch_size: int = 16
  vision_eps: float = 1e-5
  # text decoder (BERT-base + [DEC], [ENC])
  vocab_size: int = 30524
  text_hidden: int = 768
  text_layers: int = 12
  text_heads: int = 12
  text_mlp: int = 3072
  max_position: int = 512
  text_eps: float = 1e-12
  bos_token_id: int = 30522       # [DEC]
  sep_token_id: int = 102         # [SEP], the end of a caption
  pad_token_id: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


BLIP_BASE = BlipConfig()
BLIP_LARGE = BlipConfig(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096)


def _dense(i, o, cfg, rngs):
  return nnx.Linear(i, o, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _ln(d, eps, cfg, rngs):
  return nnx.LayerNorm(d, epsilon=eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _heads(x, h):
  return x.reshape(x.shape[:-1] + (h, x.shape[-1] // h))


class VisionLayer(nnx.Module):
  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    d = cfg.vision_hidden
    self.num_heads = cfg.vision_heads
    self.norm1 = _ln(d, cfg.vision_eps, cfg, rngs)
    self.qkv = _dense(d, 3 * d, cfg, rngs)
    self.proj = _dense(d, d, cfg, rngs)
    self.norm2 = _ln(d, cfg.vision_eps, cfg, rngs)
    self.fc1 = _dense(d, cfg.vision_mlp, cfg, rngs)
    self.fc2 = _dense(cfg.vision_mlp, d, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    # qkv rows are laid out (3, heads, head_dim), as timm's and transformers' reshape reads them.
    q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, n, 3 * self.num_heads, -1), 3, axis=2)
    x = x + self.proj(jax.nn.dot_product_attention(q, k, v).reshape(b, n, d))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class BlipVision(nnx.Module):
  """(B, S, S, 3) normalised pixels -> (B, 1 + patches, vision_hidden) image tokens."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.vision_hidden, cfg.patch_size
    self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), cfg.param_dtype))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, cfg.num_patches + 1, d), cfg.param_dtype))

    @nnx.split_rngs(splits=cfg.vision_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> VisionLayer:
      return VisionLayer(cfg, rngs=r)

    self.layers = make(rngs)
    self.norm = _ln(d, cfg.vision_eps, cfg, rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    x = self.patch_embed(pixels.astype(cfg.dtype))
    x = x.reshape(x.shape[0], -1, cfg.vision_hidden)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, cfg.vision_hidden))
    x = jnp.concatenate([cls.astype(x.dtype), x], axis=1) + self.pos_embed[...].astype(x.dtype)
    x = nnx.scan(lambda h, layer: layer(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
        x, self.layers)
    return self.norm(x)


class TextLayer(nnx.Module):
  """BERT layer (post-LN): causal self-attention, cross-attention to the image, GELU FFN."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    d, e = cfg.text_hidden, cfg.vision_hidden
    self.num_heads = cfg.text_heads
    self.self_query, self.self_key = _dense(d, d, cfg, rngs), _dense(d, d, cfg, rngs)
    self.self_value, self.self_out = _dense(d, d, cfg, rngs), _dense(d, d, cfg, rngs)
    self.self_norm = _ln(d, cfg.text_eps, cfg, rngs)
    self.cross_query, self.cross_out = _dense(d, d, cfg, rngs), _dense(d, d, cfg, rngs)
    self.cross_key, self.cross_value = _dense(e, d, cfg, rngs), _dense(e, d, cfg, rngs)
    self.cross_norm = _ln(d, cfg.text_eps, cfg, rngs)
    self.ffn_in = _dense(d, cfg.text_mlp, cfg, rngs)
    self.ffn_out = _dense(cfg.text_mlp, d, cfg, rngs)
    self.ffn_norm = _ln(d, cfg.text_eps, cfg, rngs)

  def image_kv(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cross-attention keys/values of the image tokens (B, S, H, Dh): fixed while decoding."""
    h = self.num_heads
    return _heads(self.cross_key(image), h), _heads(self.cross_value(image), h)

  def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array]) -> jax.Array:
    h = self.num_heads
    a = jax.nn.dot_product_attention(_heads(self.self_query(x), h), _heads(self.self_key(x), h),
                                     _heads(self.self_value(x), h), is_causal=True)
    return self._after_self_attention(x, a, kv)

  def step(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], pos: jax.Array,
           kv: tuple[jax.Array, jax.Array]):
    """One position: x (N, 1, D) at `pos`; cache: self-attention keys/values (N, T, H, Dh) of
    the positions before it. -> (N, 1, D), the cache with `pos` written."""
    h = self.num_heads
    keys = jax.lax.dynamic_update_slice_in_dim(cache[0], _heads(self.self_key(x), h), pos, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(cache[1], _heads(self.self_value(x), h), pos,
                                                 axis=1)
    seen = (jnp.arange(keys.shape[1]) <= pos)[None, None, None, :]
    a = jax.nn.dot_product_attention(_heads(self.self_query(x), h), keys, values, mask=seen)
    return self._after_self_attention(x, a, kv), (keys, values)

  def _after_self_attention(self, x, a, kv):
    b, t, d = x.shape
    x = self.self_norm(x + self.self_out(a.reshape(b, t, d)))
    c = jax.nn.dot_product_attention(_heads(self.cross_query(x), self.num_heads), *kv)
    x = self.cross_norm(x + self.cross_out(c.reshape(b, t, d)))
    return self.ffn_norm(x + self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False)))


class BlipTextDecoder(nnx.Module):
  """Token ids (B, T) + image tokens -> next-token logits, the LM head tied to word_embeddings."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.text_hidden
    self.word_embeddings = nnx.Embed(cfg.vocab_size, d, param_dtype=cfg.param_dtype, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_position, d, param_dtype=cfg.param_dtype,
                                         rngs=rngs)
    self.embed_norm = _ln(d, cfg.text_eps, cfg, rngs)

    @nnx.split_rngs(splits=cfg.text_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> TextLayer:
      return TextLayer(cfg, rngs=r)

    self.layers = make(rngs)
    self.head_dense = _dense(d, d, cfg, rngs)
    self.head_norm = _ln(d, cfg.text_eps, cfg, rngs)
    self.lm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.param_dtype))

  def image_kv(self, image: jax.Array):
    """Per-layer cross keys/values, stacked on a leading layer axis."""
    return nnx.vmap(lambda layer, img: layer.image_kv(img), in_axes=(0, None), out_axes=0)(
        self.layers, image)

  def hidden(self, ids: jax.Array, kv) -> jax.Array:
    x = self.word_embeddings(ids) + self.position_embeddings(jnp.arange(ids.shape[1]))[None]
    x = self.embed_norm(x.astype(self.cfg.dtype))
    return nnx.scan(lambda h, layer, layer_kv: layer(h, layer_kv), in_axes=(nnx.Carry, 0, 0),
                    out_axes=nnx.Carry)(x, self.layers, kv)

  def step(self, tokens: jax.Array, pos: jax.Array, caches, kv):
    """tokens (N,) at position `pos` -> (logits (N, vocab) for pos + 1, updated caches)."""
    x = self.word_embeddings(tokens[:, None]) + self.position_embeddings(pos[None])[None]
    x = self.embed_norm(x.astype(self.cfg.dtype))
    x, caches = nnx.scan(lambda h, layer, cache, layer_kv: layer.step(h, cache, pos, layer_kv),
                         in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
                             x, self.layers, caches, kv)
    return self.logits(x[:, 0]), caches

  def empty_cache(self, n: int, length: int):
    cfg = self.cfg
    shape = (cfg.text_layers, n, length, cfg.text_heads, cfg.text_hidden // cfg.text_heads)
    return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)

  def logits(self, h: jax.Array) -> jax.Array:
    h = self.head_norm(jax.nn.gelu(self.head_dense(h), approximate=False))
    w = self.word_embeddings.embedding[...]
    return (h.astype(jnp.float32) @ w.T.astype(jnp.float32)) + self.lm_bias[...].astype(jnp.float32)


class BlipCaptioner(nnx.Module):
  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision = BlipVision(cfg, rngs=rngs)
    self.text = BlipTextDecoder(cfg, rngs=rngs)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Teacher-forced logits (B, T, vocab): BlipForConditionalGeneration(pixel_values, ids)."""
    kv = self.text.image_kv(self.vision(pixels))
    return self.text.logits(self.text.hidden(input_ids, kv))


# ---- decoding ----

def _decoder_fn(model: BlipCaptioner, kv):
  """-> (params, fn(params, tokens (N,), pos, caches) -> (logits for pos + 1, caches)).

  The decoder's parameters travel in the loop carry and are merged inside the body: NNX modules
  cannot cross into a lax loop's trace."""
  graphdef, params = nnx.split(model.text)

  def step(params, tokens: jax.Array, pos: jax.Array, caches):
    return nnx.merge(graphdef, params).step(tokens, pos, caches, kv)

  return params, step


def _prefill(step, params, tokens: jax.Array, prompt_len: int, caches):
  """The self-attention caches of the prompt's positions but its last (whose logits start the
  caption)."""
  def body(q, carry):
    caches, params = carry
    return step(params, tokens[:, q], q, caches)[1], params
  return jax.lax.fori_loop(0, prompt_len - 1, body, (caches, params))[0]


def _no_early_eos(scores: jax.Array, t, min_length: int, eos: int) -> jax.Array:
  """transformers' MinLengthLogitsProcessor: EOS impossible while the sequence is shorter."""
  is_eos = jnp.arange(scores.shape[-1]) == eos
  return jnp.where((t < min_length) & is_eos, -jnp.inf, scores)


def _set_column(x: jax.Array, t, values: jax.Array) -> jax.Array:
  return jnp.where(jnp.arange(x.shape[-1]) == t, values[..., None], x)


@nnx.jit(static_argnames=("prompt", "max_length", "min_length"))
def greedy_captions(model: BlipCaptioner, pixels: jax.Array, prompt: tuple[int, ...],
                    max_length: int = 20, min_length: int = 0) -> jax.Array:
  """(B, S, S, 3) -> token ids (B, max_length): prompt, caption, [SEP], then padding."""
  cfg = model.cfg
  b, p = pixels.shape[0], len(prompt)
  params, decode = _decoder_fn(model, model.text.image_kv(model.vision(pixels)))
  tokens = jnp.full((b, max_length), cfg.pad_token_id, jnp.int32)
  tokens = tokens.at[:, :p].set(jnp.asarray(prompt, jnp.int32))
  caches = _prefill(decode, params, tokens, p, model.text.empty_cache(b, max_length))

  def step(carry):
    t, tokens, done, caches, params = carry
    logits, caches = decode(params, tokens[:, t - 1], t - 1, caches)
    logits = _no_early_eos(logits, t, min_length, cfg.sep_token_id)
    nxt = jnp.where(done, cfg.pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return t + 1, _set_column(tokens, t, nxt), done | (nxt == cfg.sep_token_id), caches, params

  # Stops once every caption has its [SEP] (the rest of the buffer is padding already).
  carry = (jnp.asarray(p), tokens, jnp.zeros((b,), bool), caches, params)
  return jax.lax.while_loop(lambda c: (c[0] < max_length) & ~jnp.all(c[2]), step, carry)[1]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x (B, K, ...) rows idx (B, J) -> (B, J, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


BEAM_SEMANTICS = ("release", "transformers")


@nnx.jit(static_argnames=("prompt", "num_beams", "max_length", "min_length", "length_penalty",
                          "semantics"))
def beam_captions(model: BlipCaptioner, pixels: jax.Array, prompt: tuple[int, ...],
                  num_beams: int = 3, max_length: int = 20, min_length: int = 5,
                  length_penalty: float = 1.0, semantics: str = "release") -> jax.Array:
  """Beam search (early_stopping=False) -> the best hypothesis per image (B, max_length).

  Each step takes the top 2K continuations of the K running beams; EOS continuations ranked
  below K are dropped, those in the top K join a pool of the K best finished hypotheses, the K
  best others run on. `semantics` picks how finished hypotheses are scored and when a pool stops
  taking new ones:
    "release": transformers 4.19.2's BeamSearchScorer, which the release ran: an EOS
      continuation is the hypothesis of the tokens BEFORE the EOS, scored sum log-prob / its
      whole length (prompt included); the pool is closed once full with its worst score >=
      the best candidate's sum / the current length; at max_length the K running beams join it
      scored over max_length.
    "transformers": the current vectorised beam search: sum log-prob / generated length (EOS
      included); at the last step every top-K continuation is finished; the pool closes once the
      best running beam's score over the generated length cannot beat its worst.
  """
  if semantics not in BEAM_SEMANTICS:
    raise ValueError(f"semantics {semantics!r}: one of {BEAM_SEMANTICS}")
  release = semantics == "release"
  cfg = model.cfg
  b, p, k, big = pixels.shape[0], len(prompt), num_beams, -1.0e9
  eos, length, lp = cfg.sep_token_id, max_length, length_penalty
  kv = model.text.image_kv(model.vision(pixels))
  kv = jax.tree.map(lambda a: jnp.repeat(a, k, axis=1), kv)   # image i -> beams i*K .. i*K+K-1
  params, decode = _decoder_fn(model, kv)
  running = jnp.full((b, k, length), cfg.pad_token_id, jnp.int32)
  running = running.at[:, :, :p].set(jnp.asarray(prompt, jnp.int32))
  caches = _prefill(decode, params, running.reshape(b * k, length), p,
                    model.text.empty_cache(b * k, length))
  state = dict(
      t=jnp.asarray(p), running=running, caches=caches, params=params,
      running_scores=jnp.tile(jnp.asarray([0.0] + [big] * (k - 1), jnp.float32), (b, 1)),
      sequences=running, scores=jnp.full((b, k), big, jnp.float32),
      finished=jnp.zeros((b, k), bool), open=jnp.ones((b, 1), bool))
  in_top_k = jnp.arange(2 * k) < k

  def into_pool(s, seqs, scores, stopped):
    """The K best of the pool and the newly stopped (blocked once the pool is closed)."""
    scores = scores + (~s["open"]) * big + (~stopped) * big
    merged = jnp.concatenate([s["scores"], scores], axis=1)
    _, best = jax.lax.top_k(merged, k)
    return dict(s, sequences=_gather(jnp.concatenate([s["sequences"], seqs], axis=1), best),
                scores=_gather(merged, best),
                finished=_gather(jnp.concatenate([s["finished"], stopped], axis=1), best))

  def step(s):
    t = s["t"]
    logits, caches = decode(s["params"], s["running"][:, :, t - 1].reshape(b * k), t - 1,
                            s["caches"])
    logp = _no_early_eos(jax.nn.log_softmax(logits, axis=-1), t, min_length, eos)
    vocab = logp.shape[-1]
    acc = (logp.reshape(b, k, vocab) + s["running_scores"][..., None]).reshape(b, k * vocab)
    top_lp, top_idx = jax.lax.top_k(acc, 2 * k)
    tok = (top_idx % vocab).astype(jnp.int32)
    top_seq = _set_column(_gather(s["running"], top_idx // vocab), t, tok)
    is_eos, last = tok == eos, t + 1 >= length
    stops = is_eos if release else is_eos | last
    run_lp = top_lp + stops * big
    _, keep = jax.lax.top_k(run_lp, k)
    running, running_scores = _gather(top_seq, keep), _gather(run_lp, keep)
    parent = _gather(top_idx // vocab, keep)           # the beam each kept row continues
    pick = parent[None, :, :, None, None, None]
    caches = jax.tree.map(lambda c: jnp.take_along_axis(
        c.reshape((c.shape[0], b, k) + c.shape[2:]), pick, axis=2).reshape(c.shape), caches)
    tf = t.astype(jnp.float32)
    norm = tf if release else tf + 1 - p
    s = into_pool(s, top_seq, top_lp / norm ** lp, stops & in_top_k)
    if release:
      full = jnp.all(s["finished"], axis=1, keepdims=True)
      done = full & (jnp.min(s["scores"], axis=1, keepdims=True) >= top_lp[:, :1] / tf ** lp)
      s = dict(s, open=s["open"] & ~done)
      s = into_pool(s, running, running_scores / float(length) ** lp,
                    jnp.broadcast_to(last, running_scores.shape))
    else:
      worst = jnp.where(s["finished"], jnp.min(s["scores"], axis=1, keepdims=True), big)
      improvable = jnp.any(running_scores[:, :1] / norm ** lp > worst, axis=-1, keepdims=True)
      s = dict(s, open=s["open"] & improvable)
    return dict(s, running=running, running_scores=running_scores, caches=caches, t=t + 1)

  # Stops once no pool takes new hypotheses (later steps could not change them).
  return jax.lax.while_loop(lambda s: (s["t"] < max_length) & jnp.any(s["open"]), step,
                            state)["sequences"][:, 0]


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """The release's: beam search, 3 beams, max_length 20 (prompt included), min_length 5, scored
  as its transformers 4.19.2 did (`beam_captions`)."""
  prompt: str = PROMPT
  num_beams: int = 3
  max_length: int = 20
  min_length: int = 5
  beam_semantics: str = "release"


def prompt_ids(tokenizer, cfg: BlipConfig, prompt: str = PROMPT) -> tuple[int, ...]:
  """[DEC] + the prompt's word pieces (the tokenizer's [CLS] replaced, its [SEP] dropped)."""
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  return (cfg.bos_token_id,) + tuple(int(i) for i in ids)


def decode_captions(tokenizer, tokens: np.ndarray, prompt: str = PROMPT) -> list[str]:
  """As the release: decode the whole sequence without special tokens, drop len(prompt) chars."""
  out = []
  n = len(tokenizer)
  for row in np.asarray(tokens):
    row = list(row[1:])              # [DEC] is not in a plain BERT vocabulary
    sep = [i for i, x in enumerate(row) if x == tokenizer.sep_token_id]
    row = [int(x) for x in row[:sep[0] if sep else len(row)] if x < n]
    out.append(tokenizer.decode(row, skip_special_tokens=True)[len(prompt):])
  return out


def caption_tokens(model: BlipCaptioner, pixels: np.ndarray, prompt: tuple[int, ...],
                   settings: DecodeSettings) -> np.ndarray:
  if settings.num_beams > 1:
    out = beam_captions(model, jnp.asarray(pixels), prompt, settings.num_beams,
                        settings.max_length, settings.min_length,
                        semantics=settings.beam_semantics)
  else:
    out = greedy_captions(model, jnp.asarray(pixels), prompt, settings.max_length,
                          settings.min_length)
  return np.asarray(jax.device_get(out))


def blip_pixels(paths: Sequence[str | Path], size: int = 384) -> np.ndarray:
  """Image files -> (B, size, size, 3) CLIP-normalised: PIL bicubic squash of the RGB image."""
  out = []
  for p in paths:
    with Image.open(p) as im:
      x = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0
    out.append((x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32))
  return np.stack(out)


# ---- PyTorch key layouts ----

def _pair(torch_name: str, ours: str, kind: Kind = Kind.LINEAR, norm: bool = False):
  if norm:
    return ((f"{torch_name}.weight", f"{ours}.scale", Kind.IDENTITY),
            (f"{torch_name}.bias", f"{ours}.bias", Kind.IDENTITY))
  return ((f"{torch_name}.weight", f"{ours}.kernel", kind),
          (f"{torch_name}.bias", f"{ours}.bias", Kind.IDENTITY))


_TEXT_LAYER = (
    *_pair("attention.self.query", "self_query"), *_pair("attention.self.key", "self_key"),
    *_pair("attention.self.value", "self_value"), *_pair("attention.output.dense", "self_out"),
    *_pair("attention.output.LayerNorm", "self_norm", norm=True),
    *_pair("crossattention.self.query", "cross_query"),
    *_pair("crossattention.self.key", "cross_key"),
    *_pair("crossattention.self.value", "cross_value"),
    *_pair("crossattention.output.dense", "cross_out"),
    *_pair("crossattention.output.LayerNorm", "cross_norm", norm=True),
    *_pair("intermediate.dense", "ffn_in"), *_pair("output.dense", "ffn_out"),
    *_pair("output.LayerNorm", "ffn_norm", norm=True))

_TD = "text_decoder."
TEXT_RULES = [
    Rule(_TD + "bert.embeddings.word_embeddings.weight", "text.word_embeddings.embedding"),
    Rule(_TD + "bert.embeddings.position_embeddings.weight", "text.position_embeddings.embedding"),
    Rule(_TD + "bert.embeddings.LayerNorm.weight", "text.embed_norm.scale"),
    Rule(_TD + "bert.embeddings.LayerNorm.bias", "text.embed_norm.bias"),
    Rule(_TD + "cls.predictions.transform.dense.weight", "text.head_dense.kernel", Kind.LINEAR),
    Rule(_TD + "cls.predictions.transform.dense.bias", "text.head_dense.bias"),
    Rule(_TD + "cls.predictions.transform.LayerNorm.weight", "text.head_norm.scale"),
    Rule(_TD + "cls.predictions.transform.LayerNorm.bias", "text.head_norm.bias"),
    Rule(_TD + "cls.predictions.bias", "text.lm_bias"),
] + [Rule(f"{_TD}bert.encoder.layer.{{l}}.{t}", f"text.layers.{j}", kind, stack="l")
     for t, j, kind in _TEXT_LAYER]

_VISION_LAYER_HF = (
    *_pair("layer_norm1", "norm1", norm=True), *_pair("self_attn.qkv", "qkv"),
    *_pair("self_attn.projection", "proj"), *_pair("layer_norm2", "norm2", norm=True),
    *_pair("mlp.fc1", "fc1"), *_pair("mlp.fc2", "fc2"))
_VISION_LAYER_ORIGINAL = (
    *_pair("norm1", "norm1", norm=True), *_pair("attn.qkv", "qkv"), *_pair("attn.proj", "proj"),
    *_pair("norm2", "norm2", norm=True), *_pair("mlp.fc1", "fc1"), *_pair("mlp.fc2", "fc2"))

_VM = "vision_model."
HF_RULES = [
    Rule(_VM + "embeddings.class_embedding", "vision.cls_token"),
    Rule(_VM + "embeddings.position_embedding", "vision.pos_embed"),
    Rule(_VM + "embeddings.patch_embedding.weight", "vision.patch_embed.kernel", Kind.CONV2D),
    Rule(_VM + "embeddings.patch_embedding.bias", "vision.patch_embed.bias"),
    Rule(_VM + "post_layernorm.weight", "vision.norm.scale"),
    Rule(_VM + "post_layernorm.bias", "vision.norm.bias"),
] + [Rule(f"{_VM}encoder.layers.{{l}}.{t}", f"vision.layers.{j}", kind, stack="l")
     for t, j, kind in _VISION_LAYER_HF] + TEXT_RULES

_VE = "visual_encoder."
ORIGINAL_RULES = [
    Rule(_VE + "cls_token", "vision.cls_token"),
    Rule(_VE + "pos_embed", "vision.pos_embed"),
    Rule(_VE + "patch_embed.proj.weight", "vision.patch_embed.kernel", Kind.CONV2D),
    Rule(_VE + "patch_embed.proj.bias", "vision.patch_embed.bias"),
    Rule(_VE + "norm.weight", "vision.norm.scale"),
    Rule(_VE + "norm.bias", "vision.norm.bias"),
] + [Rule(f"{_VE}blocks.{{l}}.{t}", f"vision.layers.{j}", kind, stack="l")
     for t, j, kind in _VISION_LAYER_ORIGINAL] + TEXT_RULES

# The LM head's decoder is tied to the word embeddings and its bias to cls.predictions.bias
# (checked equal in `load_blip`); older saves also carry BERT's position-id buffer.
_TIED = (_TD + "cls.predictions.decoder.weight", _TD + "cls.predictions.decoder.bias")
IGNORE = (r"^text_decoder\.cls\.predictions\.decoder\.(weight|bias)$",
          r"^text_decoder\.bert\.embeddings\.position_ids$")


def detect_layout(sd: Mapping[str, np.ndarray]) -> str:
  if any(k.startswith(_VM) for k in sd):
    return "hf"
  if any(k.startswith(_VE) for k in sd):
    return "original"
  raise weights_io.WeightFileError(
      "not a BLIP captioning checkpoint: no vision_model.* (transformers) or visual_encoder.* "
      "(original BLIP) keys")


def _unwrap(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Original BLIP files hold the weights under "model" (other entries, e.g. an optimizer, go)."""
  if any(k.startswith("model." + _VE) for k in sd):
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
  return dict(sd)


def config_from_state_dict(sd: Mapping[str, np.ndarray], hf_config: dict | None = None,
                           **overrides) -> BlipConfig:
  """Sizes read off the weights; heads, eps and token ids from config.json where there is one
  (else ViT/BERT's 64 per head, the original code's eps and BLIP's token ids)."""
  layout = detect_layout(sd)
  hf_config = hf_config or {}
  vc, tc = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
  if layout == "hf":
    patch = sd[_VM + "embeddings.patch_embedding.weight"]
    positions = sd[_VM + "embeddings.position_embedding"].shape[1]
    layer_re, fc1 = _VM + r"encoder\.layers\.(\d+)\.", sd[_VM + "encoder.layers.0.mlp.fc1.weight"]
  else:
    patch = sd[_VE + "patch_embed.proj.weight"]
    positions = sd[_VE + "pos_embed"].shape[1]
    layer_re, fc1 = _VE + r"blocks\.(\d+)\.", sd[_VE + "blocks.0.mlp.fc1.weight"]
  vd, p = int(patch.shape[0]), int(patch.shape[-1])
  words = sd[_TD + "bert.embeddings.word_embeddings.weight"]
  td = int(words.shape[1])
  count = lambda rx: 1 + max(int(m.group(1)) for k in sd if (m := re.match(rx, k)))  # noqa: E731
  fields = dict(
      vision_hidden=vd, vision_layers=count(layer_re),
      vision_heads=int(vc.get("num_attention_heads", max(1, vd // 64))),
      vision_mlp=int(fc1.shape[0]), patch_size=p,
      image_size=int(round(math.sqrt(positions - 1))) * p,
      vision_eps=float(vc.get("layer_norm_eps", 1e-6)),
      vocab_size=int(words.shape[0]), text_hidden=td,
      text_layers=count(re.escape(_TD) + r"bert\.encoder\.layer\.(\d+)\."),
      text_heads=int(tc.get("num_attention_heads", max(1, td // 64))),
      text_mlp=int(sd[_TD + "bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
      max_position=int(sd[_TD + "bert.embeddings.position_embeddings.weight"].shape[0]),
      text_eps=float(tc.get("layer_norm_eps", 1e-12)),
      bos_token_id=int(tc.get("bos_token_id", 30522)),
      sep_token_id=int(tc.get("sep_token_id", 102)),
      pad_token_id=int(tc.get("pad_token_id", 0)))
  fields.update(overrides)
  return BlipConfig(**fields)


def abstract_blip(cfg: BlipConfig) -> BlipCaptioner:
  return nnx.eval_shape(lambda: BlipCaptioner(cfg, rngs=nnx.Rngs(0)))


def load_blip(model: BlipCaptioner, state_dict: Mapping[str, np.ndarray],
              source: str = "BLIP checkpoint") -> BlipCaptioner:
  sd = _unwrap(state_dict)
  rules = HF_RULES if detect_layout(sd) == "hf" else ORIGINAL_RULES
  tied_to = (_TD + "bert.embeddings.word_embeddings.weight", _TD + "cls.predictions.bias")
  for key, twin in zip(_TIED, tied_to):
    if key in sd and twin in sd and not np.array_equal(np.asarray(sd[key]), np.asarray(sd[twin])):
      raise weights_io.WeightFileError(
          f"{source}: {key} differs from {twin}; BLIP ties them and this model keeps one copy")
  arrays = torch_to_jax(sd, rules, weights_state.param_shapes(model), ignore=IGNORE, source=source)
  return weights_state.load_params(model, arrays)


def find_tokenizer_dir(root: str | Path) -> Path | None:
  """A directory holding BERT-style tokenizer files at or below `root` (hub caches nest them)."""
  root = Path(root)
  if not root.is_dir():
    return None
  for name in ("tokenizer.json", "vocab.txt"):
    for f in sorted(root.rglob(name)):
      return f.parent
  return None


def load_tokenizer(directory: str | Path, what: str):
  import transformers  # heavy (seconds): only the BLIP tokenizers need it

  found = find_tokenizer_dir(directory)
  if found is None:
    raise MissingWeightsError(f"no tokenizer files (vocab.txt or tokenizer.json) in {directory}; "
                              f"{what}")
  return transformers.AutoTokenizer.from_pretrained(str(found), local_files_only=True)


def build_blip(weights_dir: str, variant: str, **overrides) -> tuple[BlipCaptioner, Path]:
  """variant "blip_b" or "blip_l" -> (captioner, the file or directory it came from)."""
  path = find_weights(weights_dir, variant)
  sd = _unwrap(weights_io.read_state_dict(path))
  hf_config = None
  if path.is_dir() and (path / "config.json").exists():
    hf_config = json.loads((path / "config.json").read_text())
  cfg = config_from_state_dict(sd, hf_config, **overrides)
  return load_blip(abstract_blip(cfg), sd, source=path.name), path


# ---- the EgoVLP text side and the score ----

def build_egovlp_text(weights_dir: str, dataset: str):
  """EgoVLP's text tower from egovlp.pth (Ego4D) / epic_mir_plus.pth (EPIC), sizes off the file."""
  key = "egovlp_epickitchens" if dataset.startswith("epic") else "egovlp_ego4d"
  path = find_weights(weights_dir, key)
  sd = {k.removeprefix("module."): v for k, v in weights_io.read_state_dict(path).items()}
  if "txt_proj.1.weight" not in sd:
    raise weights_io.WeightFileError(f"{path}: no txt_proj.1.weight; the BLIP scores need "
                                     "EgoVLP's text tower (text_model.*, txt_proj.*)")
  words = sd["text_model.embeddings.word_embeddings.weight"]
  dim = int(words.shape[1])
  cfg = ev.EgoVLPTextConfig(
      vocab_size=int(words.shape[0]), dim=dim, num_heads=max(1, dim // 64),
      num_layers=1 + max(int(m.group(1)) for k in sd
                         if (m := re.match(r"text_model\.transformer\.layer\.(\d+)\.", k))),
      hidden_dim=int(sd["text_model.transformer.layer.0.ffn.lin1.weight"].shape[0]),
      max_position=int(sd["text_model.embeddings.position_embeddings.weight"].shape[0]),
      projection_dim=int(sd["txt_proj.1.weight"].shape[0]))
  model = nnx.eval_shape(lambda: ev.EgoVLPText(cfg, rngs=nnx.Rngs(0)))
  return ev.load_egovlp_text(model, sd, source=path.name)


@nnx.jit
def _text_embed(model, ids, mask):
  return model(ids, mask)


def text_embeddings(model, tokenizer, texts: Sequence[str], bucket: int = 32,
                    batch: int = 16) -> np.ndarray:
  """EgoVLP compute_text for each text (B, 256): truncated at the model's length, each padded to
  a multiple of `bucket` tokens (masked out) and run in batches of `batch` rows of one length,
  so that few shapes compile."""
  limit = model.cfg.max_position
  enc = [tokenizer(t, truncation=True, max_length=limit)["input_ids"] for t in texts]
  groups: dict[int, list[int]] = {}
  for i, ids in enumerate(enc):
    groups.setdefault(min(limit, -(-len(ids) // bucket) * bucket), []).append(i)
  out = [None] * len(enc)
  for n, idx in groups.items():
    for start in range(0, len(idx), batch):
      part = idx[start:start + batch]
      rows = part + [part[0]] * (batch - len(part))   # filler rows repeat a real one
      ids = np.zeros((batch, n), np.int32)
      for r, i in enumerate(rows):
        ids[r, :len(enc[i])] = enc[i]
      mask = (np.arange(n)[None] < np.asarray([len(enc[i]) for i in rows])[:, None])
      emb = np.asarray(_text_embed(model, ids, mask.astype(np.int32)))
      for r, i in enumerate(part):
        out[i] = emb[r]
  return np.stack(out)


def description_for(edits: Mapping, key: str, llava_key: str) -> str | None:
  """The enriched description of a pair `clip_id/action_id/frame` in a LEGO annotation JSON."""
  parts = key.split("/")
  if len(parts) < 3:
    return None
  entry = edits.get(parts[-3], {}).get(parts[-2])
  return entry.get(llava_key) if isinstance(entry, Mapping) else None


@dataclasses.dataclass
class BlipScore:
  """The BLIP-B / BLIP-L caption scores for a set of pairs."""
  captioners: dict[str, tuple[BlipCaptioner, Any]]   # metric -> (model, its tokenizer)
  text_model: Any                                      # EgoVLPText
  text_tokenizer: Any
  descriptions: Mapping[str, str]                      # pair key -> enriched description
  settings: DecodeSettings = DecodeSettings()
  captions: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

  def score(self, keys: Sequence[str], generated: Sequence[str | Path],
            pad_to: int = 0) -> dict[str, np.ndarray]:
    """metric -> per-pair cosine (len(keys),) of caption vs description EgoVLP text embeddings.

    The image batch is padded to `pad_to` (repeating the last) so that one shape compiles."""
    desc = text_embeddings(self.text_model, self.text_tokenizer,
                           [self.descriptions[k] for k in keys])
    out = {}
    for name, (model, tok) in self.captioners.items():
      pixels = blip_pixels(generated, model.cfg.image_size)
      if len(pixels) < pad_to:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad_to - len(pixels), 0)])
      ids = caption_tokens(model, pixels, prompt_ids(tok, model.cfg, self.settings.prompt),
                           self.settings)[:len(keys)]
      caps = decode_captions(tok, ids, self.settings.prompt)
      self.captions.setdefault(name, {}).update(zip(keys, caps))
      emb = text_embeddings(self.text_model, self.text_tokenizer, caps)
      out[name] = np.asarray(cosine(jnp.asarray(emb), jnp.asarray(desc)))
    return out


def build_blip_score(weights_dir: str, dataset: str, variants: Sequence[str],
                     descriptions: Mapping[str, str],
                     settings: DecodeSettings = DecodeSettings()) -> tuple[BlipScore | None, dict]:
  """The scorer for the variants whose weights load; the others in `skipped` with the reason."""
  expected = (MissingWeightsError, weights_io.WeightFileError, KeyMappingError)
  skipped = {}
  try:
    text_model = build_egovlp_text(weights_dir, dataset)
    text_tokenizer = load_tokenizer(find_weights(weights_dir, "distilbert_tokenizer"),
                                    "EgoVLP's distilbert-base-uncased tokenizer")
  except expected as e:
    return None, {v: str(e) for v in variants}
  captioners = {}
  for v in variants:
    try:
      model, path = build_blip(weights_dir, v)
      # Original BLIP files carry no tokenizer: BLIP's is bert-base-uncased (+ [DEC], [ENC]),
      # whose word pieces are distilbert-base-uncased's.
      tok_dir = path if path.is_dir() and find_tokenizer_dir(path) else \
          find_weights(weights_dir, "distilbert_tokenizer")
      captioners[v] = (model, load_tokenizer(tok_dir, f"the tokenizer of {path.name}"))
    except expected as e:
      skipped[v] = str(e)
  if not captioners:
    return None, skipped
  return BlipScore(captioners, text_model, text_tokenizer, descriptions, settings), skipped
