"""CLIP ViT vision tower (LLaVA's image encoder, and the CLIP-score image model), Flax NNX.

The same network as transformers' `CLIPVisionModel` (+ `visual_projection` of
`CLIPVisionModelWithProjection`): a patch conv without bias, a learned class token and position
table, `pre_layrnorm`, pre-LN encoder layers with quick-GELU MLPs, `post_layernorm` on the CLS
token. Images are NHWC. The encoder layer defined here is shared with the text tower (clip_text.py).

LLaVA (and LEGO) read the patch tokens of the SECOND-TO-LAST layer: `features` runs only the layers
it needs, while the model keeps every layer's parameters so checkpoints round trip.
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
from PIL import Image

from lego_jax.models.layers import attention_impl, dense, layer_norm
from lego_jax.parallel.sharding import constrain
from lego_jax.weights import io as weights_io
from lego_jax.weights import pretrained
from lego_jax.weights.mapping import Kind, KeyMappingError, Rule, jax_to_torch, torch_to_jax
from lego_jax.weights.state import flat_params, load_params, param_shapes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  layer_norm_eps: float = 1e-5
  select_layer: int = -2          # hidden_states index LLaVA reads (-2: second-to-last layer)
  projection_dim: int = 768
  # LLaVA's tower (CLIPVisionModel) has no projection; the CLIP-score metric needs it.
  with_projection: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  # "auto": cuDNN flash attention on GPUs in bf16/fp16, XLA elsewhere; None: XLA; "cudnn": forced.
  attention_impl: str | None = "auto"
  # Std of the random position table (transformers' initializer_range 0.02). Only a tower trained
  # from scratch sees it (pretrained towers load theirs); at 0.02 against patch content of order 1
  # the patch features barely say where a patch is.
  position_init_std: float = 0.02

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def feature_layers(self) -> int:
    """How many encoder layers `features` runs: hidden_states[select_layer] is their output."""
    n = self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
    if not 0 <= n <= self.num_layers:
      raise ValueError(f"select_layer {self.select_layer} outside a {self.num_layers}-layer model")
    return n


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (not the erf/tanh GELU)."""
  return x * jax.nn.sigmoid(1.702 * x)


class Attention(nnx.Module):
  """Multi-head self-attention with biased q/k/v/out projections (CLIP's)."""

  def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, impl: str | None,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.impl = attention_impl(impl, dtype, self.head_dim)
    make = lambda names: dense(dim, dim, names, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = make(("embed", "heads"))
    self.key = make(("embed", "heads"))
    self.value = make(("embed", "heads"))
    self.out = make(("heads", "embed"))

  def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
    """x: (B, T, D) -> (B, T, D)."""
    b, t, _ = x.shape
    split = lambda y: constrain(y.reshape(b, t, self.num_heads, self.head_dim),
                                ("batch", "length", "heads", "kv"))
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=self.impl)
    return self.out(y.reshape(b, t, self.num_heads * self.head_dim))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)), then x + fc2(quick_gelu(fc1(ln2(x))))."""

  def __init__(self, dim: int, mlp_dim: int, num_heads: int, eps: float, *, dtype, param_dtype,
               attention_impl: str | None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layer_norm(dim, eps, **kw)
    self.attn = Attention(dim, num_heads, impl=attention_impl, **kw)
    self.norm2 = layer_norm(dim, eps, **kw)
    self.fc1 = dense(dim, mlp_dim, ("embed", "mlp"), **kw)
    self.fc2 = dense(mlp_dim, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
    x = x + self.attn(self.norm1(x), causal)
    h = constrain(quick_gelu(self.fc1(self.norm2(x))), ("batch", "length", "mlp"))
    return constrain(x + self.fc2(h), ("batch", "length", "embed"))


class Encoder(nnx.Module):
  """`num_layers` identical EncoderLayers, stacked on a leading "layers" axis and scanned."""

  def __init__(self, num_layers: int, dim: int, mlp_dim: int, num_heads: int, eps: float, *,
               dtype, param_dtype, remat: bool, attention_impl: str | None = "auto",
               rngs: nnx.Rngs):
    self.num_layers = num_layers
    self.remat = remat

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs) -> EncoderLayer:
      return EncoderLayer(dim, mlp_dim, num_heads, eps, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, rngs=r)

    self.layers = make(rngs)

  def __call__(self, x: jax.Array, *, causal: bool = False, num_layers: int | None = None,
               collect: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Runs the first `num_layers` layers (all by default) on x (B, T, D).

    Returns (output (B, T, D), every layer's output stacked (n, B, T, D) if `collect` else None).
    """
    n = self.num_layers if num_layers is None else num_layers
    # split/merge + lax.scan rather than nnx.scan: the first n layers are a slice of the stacked
    # state, so running fewer layers needs no second module.
    graphdef, state = nnx.split(self.layers)
    if n != self.num_layers:  # layers past the n-th are sliced away: they cost no compute
      state = jax.tree.map(lambda a: a[:n], state)

    def body(h, layer_state):
      h = nnx.merge(graphdef, layer_state)(h, causal)
      return h, (h if collect else None)

    if self.remat:
      body = jax.checkpoint(body)
    if n == 0:
      return x, (jnp.zeros((0,) + x.shape, x.dtype) if collect else None)
    return jax.lax.scan(body, x, state)


class CLIPVision(nnx.Module):
  """CLIP ViT image encoder. Parameters: 303,179,776 at ViT-L/14 (+786,432 with projection)."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt, pdt = cfg.hidden_size, cfg.dtype, cfg.param_dtype
    self.patch_embedding = nnx.Conv(
        3, d, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding="VALID",
        use_bias=False, dtype=dt, param_dtype=pdt,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          (None, None, "conv_in", "embed")),
        rngs=rngs)
    class_init = nnx.with_partitioning(nnx.initializers.normal(d ** -0.5), ("embed",))
    self.class_embedding = nnx.Param(class_init(rngs.params(), (d,), pdt))
    position_init = nnx.with_partitioning(nnx.initializers.normal(cfg.position_init_std),
                                          ("length", "embed"))
    self.position_embedding = nnx.Param(
        position_init(rngs.params(), (cfg.num_patches + 1, d), pdt))
    self.pre_norm = layer_norm(d, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.encoder = Encoder(cfg.num_layers, d, cfg.intermediate_size, cfg.num_heads,
                           cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, remat=cfg.remat,
                           attention_impl=cfg.attention_impl, rngs=rngs)
    self.post_norm = layer_norm(d, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    if cfg.with_projection:
      self.projection = dense(d, cfg.projection_dim, ("embed", None), dtype=dt, param_dtype=pdt,
                              rngs=rngs, use_bias=False)

  def embed(self, pixels: jax.Array) -> jax.Array:
    """pixels (B, S, S, 3) normalised -> pre-LN tokens (B, 1 + num_patches, D), CLS first."""
    s = self.cfg.image_size
    if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
      raise ValueError(f"expected pixels (B, {s}, {s}, 3), got {pixels.shape}")
    dt = self.cfg.dtype
    patches = self.patch_embedding(pixels.astype(dt))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(dt)
    return constrain(self.pre_norm(x), ("batch", "length", "embed"))

  def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> dict[str, jax.Array]:
    """pixels (B, S, S, 3) normalised with CLIP mean/std ->

    last_hidden_state (B, T, D) (last layer, before post-LN, as transformers), pooled (B, D)
    (post-LN CLS), image_embeds (B, projection_dim) with a projection, and with
    `output_hidden_states` hidden_states (L + 1, B, T, D): embeddings then every layer's output.
    """
    x0 = self.embed(pixels)
    x, per_layer = self.encoder(x0, collect=output_hidden_states)
    out = {"last_hidden_state": x, "pooled": self.post_norm(x[:, 0])}
    if self.cfg.with_projection:
      out["image_embeds"] = self.projection(out["pooled"])
    if output_hidden_states:
      out["hidden_states"] = jnp.concatenate([x0[None], per_layer], axis=0)
    return out

  def features(self, pixels: jax.Array) -> jax.Array:
    """LLaVA's image features: patch tokens of hidden_states[select_layer], (B, num_patches, D).

    Only the layers up to the selected one run (23 of 24 at LLaVA's select_layer=-2).
    """
    x, _ = self.encoder(self.embed(pixels), num_layers=self.cfg.feature_layers)
    return x[:, 1:]

  def image_embeds(self, pixels: jax.Array) -> jax.Array:
    """CLIP image embedding (B, projection_dim), unnormalised (the CLIP score normalises)."""
    if not self.cfg.with_projection:
      raise ValueError("this CLIPVision has no projection; build it with with_projection=True")
    return self(pixels)["image_embeds"]


# ------------------------------------------------------------------------------------------------
# Image preprocessing (numpy / PIL: it runs in the data pipeline).


def _to_pil(image):
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise TypeError(f"expected uint8 images, got {arr.dtype}")
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
  return Image.fromarray(arr)


def preprocess_one(image, image_size: int = 224, mode: str = "crop") -> np.ndarray:
  """One uint8 (H, W, 3) array or PIL image -> float32 (S, S, 3) normalised with CLIP mean/std.

  mode "crop" (LLaVA / CLIPImageProcessor): bicubic resize of the short side to S, long side
  int(S * long / short), then a center crop at ((h - S) // 2, (w - S) // 2).
  mode "squash" (the CLIP-score metric): bicubic resize straight to S x S.
  """
  img = _to_pil(image)
  w, h = img.size
  if mode == "crop":
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if w <= h else (new_long, image_size)
  elif mode == "squash":
    size = (image_size, image_size)
  else:
    raise ValueError(f"mode must be 'crop' or 'squash', got {mode!r}")
  arr = np.asarray(img.resize(size, resample=Image.BICUBIC))
  top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  arr = arr[top:top + image_size, left:left + image_size]
  arr = arr.astype(np.float32) / np.float32(255.0)
  return (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess(images, image_size: int = 224, mode: str = "crop") -> np.ndarray:
  """uint8 (H, W, 3) -> (S, S, 3); (N, H, W, 3) or a list of images (any sizes) -> (N, S, S, 3)."""
  single = not isinstance(images, (list, tuple)) and np.ndim(images) in (2, 3)
  if single:
    return preprocess_one(images, image_size, mode)
  return np.stack([preprocess_one(im, image_size, mode) for im in images])


# ------------------------------------------------------------------------------------------------
# PyTorch key maps, as data. Per-layer keys of transformers' CLIPEncoderLayer (shared by both
# towers) -> paths inside the stacked Encoder.

ENCODER_LAYER_KEYS: tuple[tuple[str, str, Kind], ...] = (
    ("layer_norm1.weight", "norm1.scale", Kind.IDENTITY),
    ("layer_norm1.bias", "norm1.bias", Kind.IDENTITY),
    ("self_attn.q_proj.weight", "attn.query.kernel", Kind.LINEAR),
    ("self_attn.q_proj.bias", "attn.query.bias", Kind.IDENTITY),
    ("self_attn.k_proj.weight", "attn.key.kernel", Kind.LINEAR),
    ("self_attn.k_proj.bias", "attn.key.bias", Kind.IDENTITY),
    ("self_attn.v_proj.weight", "attn.value.kernel", Kind.LINEAR),
    ("self_attn.v_proj.bias", "attn.value.bias", Kind.IDENTITY),
    ("self_attn.out_proj.weight", "attn.out.kernel", Kind.LINEAR),
    ("self_attn.out_proj.bias", "attn.out.bias", Kind.IDENTITY),
    ("layer_norm2.weight", "norm2.scale", Kind.IDENTITY),
    ("layer_norm2.bias", "norm2.bias", Kind.IDENTITY),
    ("mlp.fc1.weight", "fc1.kernel", Kind.LINEAR),
    ("mlp.fc1.bias", "fc1.bias", Kind.IDENTITY),
    ("mlp.fc2.weight", "fc2.kernel", Kind.LINEAR),
    ("mlp.fc2.bias", "fc2.bias", Kind.IDENTITY),
)


def encoder_rules(prefix: str) -> list[Rule]:
  """`{prefix}encoder.layers.{l}.*` -> the stacked `encoder.layers.*` parameters."""
  return [Rule(f"{prefix}encoder.layers.{{l}}.{t}", f"encoder.layers.{j}", kind, stack="l")
          for t, j, kind in ENCODER_LAYER_KEYS]


VISION_KEYS: tuple[tuple[str, str, Kind], ...] = (
    ("embeddings.class_embedding", "class_embedding", Kind.IDENTITY),
    ("embeddings.patch_embedding.weight", "patch_embedding.kernel", Kind.CONV2D),
    ("embeddings.position_embedding.weight", "position_embedding", Kind.IDENTITY),
    ("pre_layrnorm.weight", "pre_norm.scale", Kind.IDENTITY),   # sic: transformers' spelling
    ("pre_layrnorm.bias", "pre_norm.bias", Kind.IDENTITY),
    ("post_layernorm.weight", "post_norm.scale", Kind.IDENTITY),
    ("post_layernorm.bias", "post_norm.bias", Kind.IDENTITY),
)
VISUAL_PROJECTION_KEY = "visual_projection.weight"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one tower sits inside a file: its key prefix, and what else the file may hold."""
  prefix: str
  description: str
  others: tuple[str, ...] = ()    # regexes of the file's keys that belong to other models
  has_projection: bool = False    # the file can hold the tower's CLIP projection


def outside_prefix(prefix: str) -> str:
  return "^(?!" + re.escape(prefix) + ")"


VISION_LAYOUTS: dict[str, Layout] = {
    "clip": Layout(
        "vision_model.",
        "CLIPModel / hub openai/clip-vit-*; CLIPVisionModelWithProjection; transformers-4 "
        "CLIPVisionModel",
        others=(r"^text_model\.", r"^text_projection\.weight$", r"^logit_scale$"),
        has_projection=True),
    "clip_tower": Layout("", "CLIPVisionModel saved by transformers 5 (no vision_model. prefix)"),
    "llava": Layout("model.vision_tower.vision_tower.vision_model.",
                    "original LLaVA repository (LlavaLlamaForCausalLM, the LEGO VLLM release)",
                    others=(outside_prefix("model.vision_tower."),)),
    "hf_llava_v4": Layout("vision_tower.vision_model.",
                          "transformers-4 LlavaForConditionalGeneration",
                          others=(outside_prefix("vision_tower."),)),
    "hf_llava": Layout("vision_tower.",
                       "LlavaForConditionalGeneration saved by transformers 5",
                       others=(outside_prefix("vision_tower."),)),
    "hf_llava_module": Layout("model.vision_tower.",
                              "transformers-5 LlavaForConditionalGeneration module state_dict",
                              others=(outside_prefix("model.vision_tower."),)),
}


def detect_layout(state_dict: Mapping[str, Any], layouts: Mapping[str, Layout], anchor: str,
                  what: str) -> str:
  """The layout whose prefix precedes the tower's `anchor` key (e.g. its patch embedding)."""
  rx = re.compile("^(.*)" + re.escape(anchor) + "$")
  prefixes = sorted({m.group(1) for k in state_dict if (m := rx.match(k))})
  by_prefix = {lay.prefix: name for name, lay in layouts.items()}
  known = ", ".join(f"{n} ({lay.prefix or 'no prefix'})" for n, lay in layouts.items())
  if not prefixes:
    raise KeyMappingError(f"no {what} found: no key ends with {anchor!r}. Known layouts: {known}")
  if len(prefixes) > 1:
    raise KeyMappingError(f"several {what}s found under prefixes {prefixes}; pass layout=")
  if prefixes[0] not in by_prefix:
    raise KeyMappingError(f"{what} under unknown prefix {prefixes[0]!r}. Known layouts: {known}")
  return by_prefix[prefixes[0]]


def detect_vision_layout(state_dict: Mapping[str, Any]) -> str:
  return detect_layout(state_dict, VISION_LAYOUTS, "embeddings.patch_embedding.weight",
                       "CLIP vision tower")


def _vision_layout(layout: str, with_projection: bool) -> Layout:
  if layout not in VISION_LAYOUTS:
    raise ValueError(f"unknown CLIP vision layout {layout!r}; known: {sorted(VISION_LAYOUTS)}")
  lay = VISION_LAYOUTS[layout]
  if with_projection and not lay.has_projection:
    raise ValueError(f"layout {layout!r} ({lay.description}) holds no visual projection; "
                     "use with_projection=False or the 'clip' layout")
  return lay


def vision_rules(layout: str = "clip", with_projection: bool = False) -> list[Rule]:
  """The key map of one layout: PyTorch names of that file <-> CLIPVision parameter paths."""
  lay = _vision_layout(layout, with_projection)
  rules = [Rule(lay.prefix + t, j, kind) for t, j, kind in VISION_KEYS]
  rules += encoder_rules(lay.prefix)
  if with_projection:
    rules.append(Rule(VISUAL_PROJECTION_KEY, "projection.kernel", Kind.LINEAR))
  return rules


def vision_ignore(layout: str, with_projection: bool = False) -> list[str]:
  """Source keys a CLIPVision load skips on purpose: buffers and other models' weights."""
  lay = _vision_layout(layout, with_projection)
  ignore = ["^" + re.escape(lay.prefix) + r"embeddings\.position_ids$", *lay.others]
  if lay.has_projection and not with_projection:
    ignore.append("^" + re.escape(VISUAL_PROJECTION_KEY) + "$")
  return ignore


def load_clip_vision(model: CLIPVision, source: Mapping[str, Any] | str | os.PathLike,
                     layout: str = "auto") -> CLIPVision:
  """Fills `model` from a PyTorch state dict or a weight file/directory (any VISION_LAYOUTS).

  layout "auto" reads it from the prefix of the patch-embedding key. Every key under the tower's
  prefix must map; a missing, unexpected or mis-shaped one raises KeyMappingError. `model` may be
  abstract (`nnx.eval_shape(lambda: CLIPVision(cfg, rngs=...))`): no random init is spent then.
  """
  state_dict, name = weights_io.as_state_dict(source)
  if layout == "auto":
    layout = detect_vision_layout(state_dict)
  wp = model.cfg.with_projection
  arrays = torch_to_jax(state_dict, vision_rules(layout, wp), param_shapes(model),
                        ignore=vision_ignore(layout, wp), source=f"{name} ({layout} layout)")
  return load_params(model, arrays)


def clip_vision_to_torch(model: CLIPVision, layout: str = "clip") -> dict[str, np.ndarray]:
  """The model's parameters under the PyTorch names of `layout` (numpy arrays, torch layouts)."""
  return jax_to_torch(flat_params(model), vision_rules(layout, model.cfg.with_projection))



# ------------------------------------------------------------------------------------------------
# Building from a transformers directory (see lego_jax/weights/pretrained.py).


def vision_section(config: Mapping[str, Any]) -> dict[str, Any]:
  """The vision tower's part of a CLIPVisionConfig, CLIPConfig or LlavaConfig dict (a CLIPModel's
  visual projection has the top-level projection_dim)."""
  if "vision_config" not in config:
    return dict(config)
  section = dict(config["vision_config"] or {})
  if "projection_dim" in config:
    section["projection_dim"] = config["projection_dim"]
  return section


# transformers' CLIPVisionConfig -> CLIPVisionConfig: our field -> their key (with transformers'
# default where a file may leave it out).
HF_CONFIG: dict[str, Any] = {
    "hidden_size": ("hidden_size", 768),
    "intermediate_size": ("intermediate_size", 3072),
    "num_layers": ("num_hidden_layers", 12),
    "num_heads": ("num_attention_heads", 12),
    "image_size": ("image_size", 224),
    "patch_size": ("patch_size", 32),
    "layer_norm_eps": ("layer_norm_eps", 1e-5),
    "projection_dim": ("projection_dim", 512),
}
HF_REQUIRE: dict[str, tuple] = {"hidden_act": ("quick_gelu",), "num_channels": (3,)}


def _image_size_seen(patches: int, patch_size: int, stated: int) -> int:
  # The position table says the patch grid; any size with that grid is consistent with it.
  grid = int(round(patches ** 0.5))
  return stated if (stated // patch_size) == grid else grid * patch_size


def vision_weight_facts(prefix: str, with_projection: bool = False) -> dict[str, Any]:
  """Config fields read off the weights of a tower under `prefix`."""
  p = prefix
  patch = f"{p}embeddings.patch_embedding.weight"
  facts = {
      "hidden_size": pretrained.dim(patch, 0),
      "patch_size": pretrained.dim(patch, 2),
      "num_layers": pretrained.count(f"{p}encoder.layers."),
      "intermediate_size": pretrained.dim(f"{p}encoder.layers.0.mlp.fc1.weight", 0),
      "image_size": lambda sd, f: _image_size_seen(
          np.shape(sd[f"{p}embeddings.position_embedding.weight"])[0] - 1,
          int(np.shape(sd[patch])[2]), f["image_size"]),
  }
  if with_projection:
    facts["projection_dim"] = pretrained.dim(VISUAL_PROJECTION_KEY, 0)
  return facts


def clip_vision_config_from_hf(config: Mapping[str, Any], source: str = "config.json",
                               **overrides) -> CLIPVisionConfig:
  """CLIPVisionConfig from a CLIP / CLIP-vision / LLaVA config dict; `overrides` of fields it
  states must agree, the others (select_layer, with_projection, dtype, ...) are taken."""
  stated = pretrained.translate(vision_section(config), HF_CONFIG, HF_REQUIRE, source)
  return CLIPVisionConfig(**pretrained.settle(stated, overrides, source, HF_CONFIG))


def from_pretrained(path: str | os.PathLike, **overrides) -> CLIPVision:
  """A transformers CLIPModel / CLIPVisionModel(WithProjection) directory -> a filled CLIPVision
  with the sizes of its config.json (see `clip_vision_config_from_hf`)."""
  cfg_path = pretrained.require_config(path, "CLIP vision")
  config = clip_vision_config_from_hf(pretrained.read_json(cfg_path), str(cfg_path), **overrides)
  state_dict = weights_io.read_state_dict(path)
  layout = detect_vision_layout(state_dict)
  pretrained.check_weights(
      dataclasses.asdict(config), state_dict,
      vision_weight_facts(VISION_LAYOUTS[layout].prefix, config.with_projection), str(path))
  model = nnx.eval_shape(lambda: CLIPVision(config, rngs=nnx.Rngs(0)))
  return load_clip_vision(model, state_dict, layout)
