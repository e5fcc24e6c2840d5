"""CLIP text encoder (Stable Diffusion's / LEGO's prompt encoder), Flax NNX.

The same network as transformers' `CLIPTextModel`: token + learned position embeddings, causal
pre-LN encoder layers with quick-GELU MLPs (the layer is clip_vision's), a final LayerNorm. The
diffusion model reads `last_hidden_state` (B, 77, 768) of prompts padded/truncated to 77 tokens.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from lego_jax.models.clip_vision import (Encoder, Layout, detect_layout, encoder_rules,
                                         outside_prefix)
from lego_jax.models.layers import layer_norm
from lego_jax.parallel.sharding import constrain
from lego_jax.weights import io as weights_io
from lego_jax.weights import pretrained
from lego_jax.weights.mapping import Kind, Rule, jax_to_torch, torch_to_jax
from lego_jax.weights.state import flat_params, load_params, param_shapes


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position: int = 77
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  # "auto": cuDNN flash attention on GPUs in bf16/fp16, XLA elsewhere; None: XLA; "cudnn": forced.
  attention_impl: str | None = "auto"


class CLIPText(nnx.Module):
  """CLIP text transformer. Parameters: 123,060,480 at ViT-L/14's text tower."""

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt, pdt = cfg.hidden_size, cfg.dtype, cfg.param_dtype
    self.token_embedding = nnx.Embed(
        cfg.vocab_size, d, dtype=dt, param_dtype=pdt,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs)
    position_init = nnx.with_partitioning(nnx.initializers.normal(0.01), ("length", "embed"))
    self.position_embedding = nnx.Param(position_init(rngs.params(), (cfg.max_position, d), pdt))
    self.encoder = Encoder(cfg.num_layers, d, cfg.intermediate_size, cfg.num_heads,
                           cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, remat=cfg.remat,
                           attention_impl=cfg.attention_impl, rngs=rngs)
    self.final_norm = layer_norm(d, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """input_ids (B, T) int, T <= max_position -> last_hidden_state (B, T, D) after the final LN.

    Attention is causal only: CLIP (and Stable Diffusion) never mask padding; the pad tokens'
    states are part of the conditioning.
    """
    t = input_ids.shape[-1]
    if input_ids.ndim != 2 or t > self.cfg.max_position:
      raise ValueError(
          f"expected input_ids (B, T <= {self.cfg.max_position}), got {input_ids.shape}")
    x = self.token_embedding(input_ids) + self.position_embedding[:t].astype(self.cfg.dtype)
    x = constrain(x, ("batch", "length", "embed"))
    x, _ = self.encoder(x, causal=True)
    return self.final_norm(x)


# ------------------------------------------------------------------------------------------------
# Tokenisation to the fixed 77-token window.


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int = 77,
             pad_id: int | None = None) -> np.ndarray:
  """Texts -> int32 (N, max_length) ids, truncated and padded by the tokenizer's own rules.

  Works with transformers tokenizers (CLIPTokenizer / CLIPTokenizerFast / PreTrainedTokenizerFast,
  loaded from a local directory) and with a bare `tokenizers.Tokenizer`. Truncation keeps the
  tokenizer's special tokens (CLIP: BOS ... EOS). Padding (on the tokenizer's side, right for
  CLIP) uses `pad_id` if given, else the tokenizer's pad token, else its EOS token (openai's
  CLIP tokenizer pads with <|endoftext|>, which is its EOS).
  """
  texts = [texts] if isinstance(texts, str) else list(texts)
  if isinstance(tokenizer, tokenizers.Tokenizer):
    rows, pad_left = _bare_tokenizers(tokenizer, texts, max_length)
    if pad_id is None and tokenizer.padding is not None:
      pad_id = tokenizer.padding["pad_id"]
  else:
    rows = tokenizer(texts, truncation=True, max_length=max_length,
                     add_special_tokens=True)["input_ids"]
    pad_left = getattr(tokenizer, "padding_side", "right") == "left"
    if pad_id is None:
      pad_id = tokenizer.pad_token_id
      if pad_id is None:
        pad_id = tokenizer.eos_token_id
  if pad_id is None:
    raise ValueError("the tokenizer defines neither a pad nor an EOS token; pass pad_id=")
  out = np.full((len(rows), max_length), pad_id, np.int32)
  for i, row in enumerate(rows):
    if len(row) > max_length:
      raise ValueError(f"tokenizer returned {len(row)} > {max_length} ids despite truncation")
    if pad_left:
      out[i, max_length - len(row):] = row
    else:
      out[i, :len(row)] = row
  return out


def _bare_tokenizers(tokenizer, texts, max_length) -> tuple[list[list[int]], bool]:
  # A `tokenizers.Tokenizer` keeps truncation/padding as mutable state; work on a copy so the
  # caller's object is unchanged, and let its own truncation respect its post-processor's specials.
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.enable_truncation(max_length)
  pad_left = tokenizer.padding is not None and tokenizer.padding.get("direction") == "left"
  return [e.ids for e in tok.encode_batch(texts)], pad_left


# ------------------------------------------------------------------------------------------------
# PyTorch key maps, as data.

TEXT_KEYS: tuple[tuple[str, str, Kind], ...] = (
    ("embeddings.token_embedding.weight", "token_embedding.embedding", Kind.IDENTITY),
    ("embeddings.position_embedding.weight", "position_embedding", Kind.IDENTITY),
    ("final_layer_norm.weight", "final_norm.scale", Kind.IDENTITY),
    ("final_layer_norm.bias", "final_norm.bias", Kind.IDENTITY),
)

TEXT_LAYOUTS: dict[str, Layout] = {
    "clip": Layout(
        "text_model.",
        "CLIPModel / hub openai/clip-vit-*; CLIPTextModelWithProjection; transformers-4 "
        "CLIPTextModel (also diffusers' text_encoder/ folders)",
        # text_projection serves CLIP's text-image score; the diffusion model reads hidden states.
        others=(r"^vision_model\.", r"^visual_projection\.weight$", r"^text_projection\.weight$",
                r"^logit_scale$")),
    "clip_tower": Layout("", "CLIPTextModel saved by transformers 5 (no text_model. prefix)"),
    "compvis": Layout("cond_stage_model.transformer.text_model.",
                      "CompVis / Stable Diffusion / LEGO LDM single-file checkpoint",
                      others=(outside_prefix("cond_stage_model."),)),
}


def detect_text_layout(state_dict: Mapping[str, Any]) -> str:
  return detect_layout(state_dict, TEXT_LAYOUTS, "embeddings.token_embedding.weight",
                       "CLIP text encoder")


def _text_layout(layout: str) -> Layout:
  if layout not in TEXT_LAYOUTS:
    raise ValueError(f"unknown CLIP text layout {layout!r}; known: {sorted(TEXT_LAYOUTS)}")
  return TEXT_LAYOUTS[layout]


def text_rules(layout: str = "clip") -> list[Rule]:
  """The key map of one layout: PyTorch names of that file <-> CLIPText parameter paths."""
  prefix = _text_layout(layout).prefix
  return [Rule(prefix + t, j, kind) for t, j, kind in TEXT_KEYS] + encoder_rules(prefix)


def text_ignore(layout: str) -> list[str]:
  """Source keys a CLIPText load skips on purpose: buffers and other models' weights."""
  lay = _text_layout(layout)
  return ["^" + re.escape(lay.prefix) + r"embeddings\.position_ids$", *lay.others]


def load_clip_text(model: CLIPText, source: Mapping[str, Any] | str | os.PathLike,
                   layout: str = "auto") -> CLIPText:
  """Fills `model` from a PyTorch state dict or a weight file/directory (any TEXT_LAYOUTS).

  layout "auto" reads it from the prefix of the token-embedding key. Every key under the encoder's
  prefix must map; a missing, unexpected or mis-shaped one raises KeyMappingError. `model` may be
  abstract (`nnx.eval_shape(lambda: CLIPText(cfg, rngs=...))`): no random init is spent then.
  """
  state_dict, name = weights_io.as_state_dict(source)
  if layout == "auto":
    layout = detect_text_layout(state_dict)
  arrays = torch_to_jax(state_dict, text_rules(layout), param_shapes(model),
                        ignore=text_ignore(layout), source=f"{name} ({layout} layout)")
  return load_params(model, arrays)


def clip_text_to_torch(model: CLIPText, layout: str = "clip") -> dict[str, np.ndarray]:
  """The model's parameters under the PyTorch names of `layout` (numpy arrays, torch layouts)."""
  return jax_to_torch(flat_params(model), text_rules(layout))


# ------------------------------------------------------------------------------------------------
# Building from a transformers directory (see lego_jax/weights/pretrained.py).

# transformers' CLIPTextConfig -> CLIPTextConfig: our field -> their key (with transformers'
# default where a file may leave it out). A CLIPModel's config holds it under "text_config".
HF_CONFIG: dict[str, Any] = {
    "vocab_size": ("vocab_size", 49408),
    "hidden_size": ("hidden_size", 512),
    "intermediate_size": ("intermediate_size", 2048),
    "num_layers": ("num_hidden_layers", 12),
    "num_heads": ("num_attention_heads", 8),
    "max_position": ("max_position_embeddings", 77),
    "layer_norm_eps": ("layer_norm_eps", 1e-5),
}
HF_REQUIRE: dict[str, tuple] = {"hidden_act": ("quick_gelu",)}


def text_weight_facts(prefix: str) -> dict[str, Any]:
  """Config fields read off the weights of an encoder under `prefix`."""
  p = prefix
  return {
      "vocab_size": pretrained.dim(f"{p}embeddings.token_embedding.weight", 0),
      "hidden_size": pretrained.dim(f"{p}embeddings.token_embedding.weight", 1),
      "max_position": pretrained.dim(f"{p}embeddings.position_embedding.weight", 0),
      "num_layers": pretrained.count(f"{p}encoder.layers."),
      "intermediate_size": pretrained.dim(f"{p}encoder.layers.0.mlp.fc1.weight", 0),
  }


def clip_text_config_from_hf(config: Mapping[str, Any], source: str = "config.json",
                             **overrides) -> CLIPTextConfig:
  """CLIPTextConfig from a CLIPTextConfig or CLIPConfig dict; `overrides` of fields it states
  must agree, the others (dtype, remat, ...) are taken."""
  section = config.get("text_config") or config
  stated = pretrained.translate(section, HF_CONFIG, HF_REQUIRE, source)
  return CLIPTextConfig(**pretrained.settle(stated, overrides, source, HF_CONFIG))


def from_pretrained(path: str | os.PathLike, **overrides) -> CLIPText:
  """A transformers CLIPModel / CLIPTextModel directory (also diffusers' text_encoder/) -> a
  filled CLIPText with the sizes of its config.json."""
  cfg_path = pretrained.require_config(path, "CLIP text")
  config = clip_text_config_from_hf(pretrained.read_json(cfg_path), str(cfg_path), **overrides)
  state_dict = weights_io.read_state_dict(path)
  layout = detect_text_layout(state_dict)
  pretrained.check_weights(dataclasses.asdict(config), state_dict,
                           text_weight_facts(TEXT_LAYOUTS[layout].prefix), str(path))
  model = nnx.eval_shape(lambda: CLIPText(config, rngs=nnx.Rngs(0)))
  return load_clip_text(model, state_dict, layout)
