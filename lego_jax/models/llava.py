"""LLaVA in Flax NNX: CLIP vision tower + projector + LLaMA, and every checkpoint layout of it.

The image (NHWC, CLIP-normalised) goes through the CLIP tower; the patch tokens of its
second-to-last layer (CLS dropped) are projected to the LLM width: H_i (B, num_patches,
text_hidden). The prompt's token ids hold the image placeholder `image_token_id` already expanded
to num_patches copies; their embeddings are replaced, in order, by the rows of H_i (transformers-5
LlavaForConditionalGeneration's convention) and the sequence runs through the LLaMA decoder.

LEGO uses ONE linear projector 1024 -> 5120 ("linear"); LLaVA-1.5 and transformers' Llava a
2-layer MLP with GELU ("mlp2x_gelu").

Parameter paths: `vision.*` (the frozen tower), `projector.*`, `lm.*`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.models import clip_vision
from lego_jax.models.clip_vision import CLIPVision, CLIPVisionConfig
from lego_jax.models import llama as llama_lib
from lego_jax.models.llama import Llama, LlamaConfig, llama_ignore, llama_rules
from lego_jax.parallel.sharding import constrain
from lego_jax.weights import io, mapping, pretrained
from lego_jax.weights.mapping import Kind, KeyMappingError, Rule
from lego_jax.weights.state import flat_params, load_params, param_shapes

# The original LLaVA code marks the image in input_ids with this id (IMAGE_TOKEN_INDEX); being
# negative it never collides with a real token. transformers' Llava uses a real added token
# (32000 in llava-hf); set `image_token_id` to match the tokenizer in use.
LLAVA_IMAGE_TOKEN_ID = -200


def _as_config(value, cls):
  return cls(**value) if isinstance(value, Mapping) else value


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """`projector`, `vision_hidden`, `text_hidden` as in the `llava` section of the configs;
  `vision` and `llama` are the tower and LM configs (dataclasses or their config sections).

  Build from a whole experiment config with `LlavaConfig.from_config(cfg)`.
  """
  projector: str = "linear"          # "linear" (LEGO) | "mlp2x_gelu" (LLaVA-1.5, transformers)
  vision_hidden: int = 1024
  text_hidden: int = 5120
  image_token_id: int = LLAVA_IMAGE_TOKEN_ID
  vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  llama: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  dtype: Any = jnp.float32           # projector compute dtype (the towers carry their own)
  # Random projector kernels are lecun_normal times this: at 1 H_i enters at about the tower
  # features' norm, ~100x a 0.02-initialised text embedding's. Only models trained from scratch
  # see it (pretrained projectors load theirs).
  projector_init_scale: float = 1.0
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "vision", _as_config(self.vision, CLIPVisionConfig))
    object.__setattr__(self, "llama", _as_config(self.llama, LlamaConfig))
    if self.projector not in ("linear", "mlp2x_gelu"):
      raise ValueError(f"projector must be 'linear' or 'mlp2x_gelu', got {self.projector!r}")
    if self.vision_hidden != self.vision.hidden_size:
      raise ValueError(f"vision_hidden {self.vision_hidden} != CLIP hidden_size "
                       f"{self.vision.hidden_size}")
    if self.text_hidden != self.llama.hidden_size:
      raise ValueError(f"text_hidden {self.text_hidden} != LLaMA hidden_size "
                       f"{self.llama.hidden_size}")

  @property
  def num_patches(self) -> int:
    return self.vision.num_patches

  @classmethod
  def from_config(cls, cfg, **overrides) -> "LlavaConfig":
    """From an experiment config (sections `llava`, `clip_vision`, `llama`). `dtype`,
    `param_dtype` and `remat` in `overrides` go to every part; other overrides to LlavaConfig."""
    shared = {k: overrides.pop(k) for k in ("dtype", "param_dtype", "remat") if k in overrides}
    vision = CLIPVisionConfig(**{**dict(cfg.clip_vision), **shared})
    llama = LlamaConfig(**{**dict(cfg.llama), **shared})
    shared.pop("remat", None)
    return cls(**{**dict(cfg.llava), **shared, **overrides}, vision=vision, llama=llama)


class Projector(nnx.Module):
  """CLIP features (..., vision_hidden) -> LLM embeddings (..., text_hidden)."""

  def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
    self.kind = config.projector
    # lecun_normal is variance_scaling(1, "fan_in", "truncated_normal"): scale 1 draws the same.
    init = nnx.initializers.variance_scaling(config.projector_init_scale ** 2, "fan_in",
                                             "truncated_normal")
    dense = lambda i, o, names: nnx.Linear(
        i, o, dtype=config.dtype, param_dtype=config.param_dtype,
        kernel_init=nnx.with_partitioning(init, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[-1:]), rngs=rngs)
    self.linear_1 = dense(config.vision_hidden, config.text_hidden, (None, "embed"))
    if self.kind == "mlp2x_gelu":
      self.linear_2 = dense(config.text_hidden, config.text_hidden, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear_1(x)
    if self.kind == "mlp2x_gelu":
      # torch.nn.GELU() / transformers "gelu": the exact erf form, not the tanh approximation.
      x = self.linear_2(jax.nn.gelu(x, approximate=False))
    return x


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_token_id: int) -> jax.Array:
  """The k-th placeholder of row b takes features[b, k].

  embeds (B, T, E), input_ids (B, T), features (B, P, E). Every row holding an image must have
  exactly P placeholders (the prompt builder expands one placeholder to P copies); rows without
  placeholders are left as they are.
  """
  is_image = input_ids == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(features, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class Llava(nnx.Module):
  """Build: `Llava(LlavaConfig.from_config(cfg), rngs=nnx.Rngs(0))`."""

  def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision = CLIPVision(config.vision, rngs=rngs)
    self.projector = Projector(config, rngs=rngs)
    self.lm = Llama(config.llama, rngs=rngs)

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """pixels (B, S, S, 3) CLIP-normalised -> H_i (B, num_patches, text_hidden)."""
    feats = self.projector(self.vision.features(pixels))
    return constrain(feats, ("batch", "length", "embed"))

  def embed_inputs(self, input_ids: jax.Array, pixels: jax.Array | None = None,
                   image_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings (B, T, text_hidden) with the image placeholders replaced by H_i (from
    `pixels`, or given as `image_features`); without either the placeholders stay as embeddings
    of token 0 (text-only prompts have none)."""
    is_image = input_ids == self.config.image_token_id
    embeds = self.lm.embed(jnp.where(is_image, 0, input_ids))
    if image_features is None and pixels is not None:
      image_features = self.image_features(pixels)
    if image_features is None:
      return embeds
    return merge_image_features(embeds, input_ids, image_features, self.config.image_token_id)

  def __call__(self, input_ids: jax.Array, pixels: jax.Array | None = None, *,
               image_features: jax.Array | None = None, **lm_kwargs):
    """input_ids (B, T) with expanded placeholders, pixels (B, S, S, 3) or None (decode steps);
    `lm_kwargs` as `Llama.hidden_states` (positions, segment_ids, lengths, cache).
    Returns (logits (B, T, vocab), last hidden after the final norm (B, T, text_hidden), cache)."""
    embeds = self.embed_inputs(input_ids, pixels, image_features)
    return self.lm(inputs_embeds=embeds, **lm_kwargs)


# --- PyTorch key maps -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlavaLayout:
  """Where the parts of a LLaVA sit in one kind of file."""
  description: str
  lm_prefix: str                     # precedes embed_tokens / layers / norm
  head_prefix: str                   # precedes lm_head's "weight"
  vision_layout: str                 # a key of clip_vision.VISION_LAYOUTS
  projector: Mapping[str, tuple[str, ...]]   # projector kind -> prefixes of linear_1 (, linear_2)


LLAVA_LAYOUTS: dict[str, LlavaLayout] = {
    "llava": LlavaLayout(
        "original LLaVA repository (LlavaLlamaForCausalLM, the LEGO VLLM release)",
        "model.", "lm_head.", "llava",
        {"linear": ("model.mm_projector.",),
         "mlp2x_gelu": ("model.mm_projector.0.", "model.mm_projector.2.")}),
    "hf_llava": LlavaLayout(
        "LlavaForConditionalGeneration saved by transformers 5",
        "language_model.model.", "language_model.lm_head.", "hf_llava",
        {"mlp2x_gelu": ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.")}),
    "hf_llava_v4": LlavaLayout(
        "LlavaForConditionalGeneration saved by transformers 4",
        "language_model.model.", "language_model.lm_head.", "hf_llava_v4",
        {"mlp2x_gelu": ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.")}),
    "hf_llava_module": LlavaLayout(
        "transformers-5 LlavaForConditionalGeneration module state_dict()",
        "model.language_model.", "lm_head.", "hf_llava_module",
        {"mlp2x_gelu": ("model.multi_modal_projector.linear_1.",
                        "model.multi_modal_projector.linear_2.")}),
}


def detect_llava_layout(state_dict: Mapping[str, Any]) -> str:
  """The layout from the key prefixes of the language model (and of the tower, which tells the
  transformers-4 files from the transformers-5 ones)."""
  keys = list(state_dict)
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  if has("model.language_model."):
    return "hf_llava_module"
  if has("language_model.model."):
    return "hf_llava_v4" if has("vision_tower.vision_model.") else "hf_llava"
  if has("model.layers.") or has("model.embed_tokens."):
    return "llava"
  known = "; ".join(f"{n}: {lay.description} ({lay.lm_prefix}*)"
                    for n, lay in LLAVA_LAYOUTS.items())
  raise KeyMappingError(f"not a LLaVA checkpoint layout I know (first keys {sorted(keys)[:5]}). "
                        f"Known: {known}")


def _layout(name: str, config: LlavaConfig) -> LlavaLayout:
  if name not in LLAVA_LAYOUTS:
    raise ValueError(f"unknown LLaVA layout {name!r}; known: {sorted(LLAVA_LAYOUTS)}")
  lay = LLAVA_LAYOUTS[name]
  if config.projector not in lay.projector:
    raise ValueError(f"layout {name!r} ({lay.description}) has no {config.projector!r} projector; "
                     f"it stores {sorted(lay.projector)}")
  return lay


def llava_rules(config: LlavaConfig, layout: str) -> list[Rule]:
  """Key map of the language model and projector (the tower's is clip_vision.vision_rules)."""
  lay = _layout(layout, config)
  rules = llama_rules(config.llama, lay.lm_prefix, lay.head_prefix, jax_prefix="lm.")
  for i, prefix in enumerate(lay.projector[config.projector], start=1):
    rules.append(Rule(f"{prefix}weight", f"projector.linear_{i}.kernel", Kind.LINEAR))
    rules.append(Rule(f"{prefix}bias", f"projector.linear_{i}.bias"))
  return rules


def _tower_prefix(layout: LlavaLayout) -> str:
  return clip_vision.VISION_LAYOUTS[layout.vision_layout].prefix


def _subtree(shapes_or_arrays: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  return {k[len(prefix):]: v for k, v in shapes_or_arrays.items() if k.startswith(prefix)}


def load_llava(model: Llava, source: Mapping[str, np.ndarray] | str | os.PathLike,
               vision_source: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
               layout: str = "auto") -> Llava:
  """Fills `model` from a LLaVA checkpoint of any `LLAVA_LAYOUTS` (auto-detected): a state dict
  or a weight file / directory.

  The CLIP tower comes from `source` when it holds one, else from `vision_source` (state dict or
  path, any layout of clip_vision.VISION_LAYOUTS, e.g. the hub's openai/clip-vit-large-patch14
  files: the original LLaVA checkpoints usually leave the tower out). Every key must be mapped or
  be a known buffer; unexpected, missing and mis-shaped keys are listed in a KeyMappingError.
  """
  state_dict, _ = io.as_state_dict(source)
  vision_state_dict = None if vision_source is None else io.as_state_dict(vision_source)[0]
  if layout == "auto":
    layout = detect_llava_layout(state_dict)
  lay = _layout(layout, model.config)
  tower_prefix = _tower_prefix(lay)
  tower_root = "model.vision_tower." if layout in ("llava", "hf_llava_module") else "vision_tower."
  has_tower = any(k.startswith(tower_root) for k in state_dict)
  if has_tower and vision_state_dict is not None:
    raise ValueError(f"the checkpoint holds a vision tower ({tower_root}*) and vision_source "
                     "was given too; pass one of them")
  if not has_tower and vision_state_dict is None:
    raise KeyMappingError(f"the checkpoint ({layout} layout) holds no CLIP vision tower "
                          f"({tower_prefix}*); pass vision_source (e.g. the CLIP ViT-L/14 "
                          "files)")
  if has_tower:
    clip_vision.load_clip_vision(model.vision, state_dict, layout=lay.vision_layout)
  else:
    clip_vision.load_clip_vision(model.vision, vision_state_dict, layout="auto")

  shapes = {k: v for k, v in param_shapes(model).items() if not k.startswith("vision.")}
  ignore = (*llama_ignore(model.config.llama, lay.head_prefix), "^" + re.escape(tower_root))
  arrays = mapping.torch_to_jax(state_dict, llava_rules(model.config, layout), shapes,
                                ignore=ignore, source=f"LLaVA checkpoint ({layout} layout)")
  load_params(model.lm, _subtree(arrays, "lm."))
  load_params(model.projector, _subtree(arrays, "projector."))
  return model


def llava_to_torch(model: Llava, layout: str = "llava", include_vision: bool = True
                   ) -> dict[str, np.ndarray]:
  """The model's parameters under the PyTorch names of `layout` (numpy, torch layouts)."""
  lay = _layout(layout, model.config)
  params = {k: v for k, v in flat_params(model).items() if not k.startswith("vision.")}
  out = mapping.jax_to_torch(params, llava_rules(model.config, layout))
  if include_vision:
    out.update(clip_vision.clip_vision_to_torch(model.vision, layout=lay.vision_layout))
  return out


def save_llava(model: Llava, path, layout: str = "llava", include_vision: bool = True):
  """Writes `llava_to_torch(model, layout)` as one safetensors file; returns its path."""
  return io.write_safetensors(llava_to_torch(model, layout, include_vision), path,
                              metadata={"format": "pt"})


# --- Building from a checkpoint's config (see lego_jax/weights/pretrained.py) -----------------

# transformers' LlavaConfig (model_type "llava": vision_config + text_config) -> LlavaConfig.
HF_CONFIG: dict[str, Any] = {
    "projector": lambda c: "mlp2x_gelu",     # linear_1, GELU, linear_2 (projector_hidden_act)
    "image_token_id": lambda c: c.get("image_token_id", c.get("image_token_index", 32000)),
}
HF_REQUIRE: dict[str, tuple] = {"projector_hidden_act": ("gelu",),
                                "vision_feature_select_strategy": ("default",),
                                "multimodal_projector_bias": (True,)}
# The original LLaVA repository's config.json (LlavaLlamaForCausalLM: a LlamaConfig plus mm_*).
# (Its image placeholder is a code constant, IMAGE_TOKEN_INDEX: LlavaConfig's default.)
REPO_CONFIG: dict[str, Any] = {"projector": ("mm_projector_type", "linear")}
REPO_REQUIRE: dict[str, tuple] = {"mm_projector_type": ("linear", "mlp2x_gelu"),
                                  "mm_vision_select_feature": ("patch",)}
# CLIP towers the original repository names in mm_vision_tower, for files without the tower's
# own config.json beside them (CLIPVisionConfig fields; the rest are CLIPVisionConfig defaults).
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096,
                                          num_layers=24, num_heads=16, image_size=224,
                                          patch_size=14),
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096,
                                              num_layers=24, num_heads=16, image_size=336,
                                              patch_size=14),
}


def _split_overrides(overrides: dict) -> tuple[dict, dict, dict]:
  """(vision, llama, llava) overrides: `vision=` / `llama=` dicts go to the towers, dtype,
  param_dtype and remat to every part."""
  vision, lm = dict(overrides.pop("vision", {}) or {}), dict(overrides.pop("llama", {}) or {})
  for key in ("dtype", "param_dtype", "remat"):
    if key in overrides:
      vision.setdefault(key, overrides[key])
      lm.setdefault(key, overrides[key])
      if key == "remat":
        overrides.pop(key)
  return vision, lm, overrides


def llava_config_from_hf(config: Mapping[str, Any], source: str = "config.json",
                         vision_config: Mapping[str, Any] | None = None,
                         vision_source: str = "vision config.json", **overrides) -> LlavaConfig:
  """LlavaConfig from a transformers LlavaConfig dict or an original-LLaVA config.json (then the
  tower's sizes come from `vision_config`, a CLIP config dict, or from `KNOWN_TOWERS` by
  mm_vision_tower). `overrides` of fields the files state must agree."""
  vision_over, lm_over, overrides = _split_overrides(dict(overrides))
  if "text_config" in config:   # transformers
    stated = pretrained.translate(config, HF_CONFIG, HF_REQUIRE, source)
    table = HF_CONFIG
    vision_over = pretrained.settle({"select_layer": config.get("vision_feature_layer", -2)},
                                    vision_over, source, {"select_layer": "vision_feature_layer"})
    if not isinstance(vision_over["select_layer"], int):
      raise pretrained.PretrainedConfigError(
          f"{source}: vision_feature_layer={vision_over['select_layer']} is not supported (one "
          "layer, not a list)")
    vision = clip_vision.clip_vision_config_from_hf(config["vision_config"] or {}, source,
                                                    **vision_over)
    lm = llama_lib.llama_config_from_hf(config["text_config"], source, **lm_over)
  else:                          # the original repository
    stated = pretrained.translate(config, REPO_CONFIG, REPO_REQUIRE, source)
    table = REPO_CONFIG
    vision_over = pretrained.settle({"select_layer": config.get("mm_vision_select_layer", -2)},
                                    vision_over, source,
                                    {"select_layer": "mm_vision_select_layer"})
    if vision_config is None:
      tower = config.get("mm_vision_tower") or config.get("vision_tower")
      if tower not in KNOWN_TOWERS:
        raise pretrained.PretrainedConfigError(
            f"{source}: mm_vision_tower={tower!r} is not one of {sorted(KNOWN_TOWERS)}; pass "
            "the tower's directory (with its config.json) as the vision source")
      vision_config, vision_source = KNOWN_TOWERS[tower], f"{source} (mm_vision_tower {tower})"
      vision = CLIPVisionConfig(**pretrained.settle(vision_config, vision_over, vision_source))
    else:
      vision = clip_vision.clip_vision_config_from_hf(vision_config, vision_source, **vision_over)
    if config.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
      raise pretrained.PretrainedConfigError(
          f"{source}: mm_hidden_size={config['mm_hidden_size']} but the vision tower "
          f"({vision_source}) has hidden_size={vision.hidden_size}")
    lm = llama_lib.llama_config_from_hf(config, source, **lm_over)
  fields = pretrained.settle(stated, overrides, source, table)
  return LlavaConfig(**fields, vision_hidden=vision.hidden_size, text_hidden=lm.hidden_size,
                     vision=vision, llama=lm)


def llava_weight_facts(config: LlavaConfig, layout: str) -> dict[str, Any]:
  """Fields of the LLaMA part read off the weights (the tower's are checked by clip_vision's)."""
  return llama_lib.llama_weight_facts(LLAVA_LAYOUTS[layout].lm_prefix)


def from_pretrained(path: str | os.PathLike, vision_source: str | os.PathLike | None = None,
                    **overrides) -> Llava:
  """A LLaVA checkpoint directory with its config.json -> a filled Llava.

  transformers' LlavaForConditionalGeneration directories state every size. The original
  repository's (the LEGO VLLM release) state the LM and projector; the CLIP tower is then read
  from `vision_source` (a CLIP directory with its config.json) or, when the checkpoint holds the
  tower, sized by mm_vision_tower. `overrides`: LlavaConfig fields, `vision={...}`,
  `llama={...}`, and dtype / param_dtype / remat for every part; those the files state must agree.
  """
  cfg_path = pretrained.require_config(path, "LLaVA")
  config_json = pretrained.read_json(cfg_path)
  vision_config = vision_name = None
  if vision_source is not None and "text_config" not in config_json:
    vision_cfg_path = pretrained.require_config(vision_source, "CLIP vision")
    vision_config, vision_name = pretrained.read_json(vision_cfg_path), str(vision_cfg_path)
  config = llava_config_from_hf(config_json, str(cfg_path), vision_config,
                                vision_name or "vision config.json", **overrides)
  state_dict = io.read_state_dict(path)
  layout = detect_llava_layout(state_dict)
  pretrained.check_weights(dataclasses.asdict(config.llama), state_dict,
                           llava_weight_facts(config, layout), str(path))
  vision_sd = None if vision_source is None else io.read_state_dict(vision_source)
  tower_sd = state_dict if vision_sd is None else vision_sd
  try:
    tower_layout = clip_vision.detect_vision_layout(tower_sd)
    pretrained.check_weights(
        dataclasses.asdict(config.vision), tower_sd,
        clip_vision.vision_weight_facts(clip_vision.VISION_LAYOUTS[tower_layout].prefix),
        str(vision_source or path))
  except KeyMappingError:
    pass  # no tower found: load_llava says so
  model = nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(0)))
  return load_llava(model, state_dict, vision_sd, layout)
