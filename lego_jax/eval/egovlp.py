"""EgoVLP (FrozenInTime) video tower for the EgoVLP / EgoVLP+ metrics, Flax NNX.

Space-time transformer (ViT-B/16 at 224, 12 "frozen-in-time" blocks), the CLS token after the
final LayerNorm, then `vid_proj` Linear(768 -> 256). Each block:

    t = time_attn(norm3(x))                 # each patch position attends over the frames
    s = space_attn(norm1(x + t))            # each frame's patches attend within the frame
    x = x + s                               # sic: the release adds s to x, not to x + t
    x = x + mlp(norm2(x))

In both attentions the CLS query attends to every token, and every patch query also sees the CLS
key/value. Tokens are ordered frame-major: [cls, f0 patches, f1 patches, ...]; position
embeddings are the per-frame spatial table tiled over frames plus a per-frame temporal table.

The metric (LEGO's release): a clip of T copies of one image (EgoVLP), or [input frame x T/2,
image x T/2] (EgoVLP+), each frame resized (bilinear, short side 224, truncating), center-cropped
to 224 and ImageNet-normalised; the score is the cosine of the generated and ground-truth clips'
256-d embeddings.

Weights: EgoVLP checkpoints (`egovlp.pth`, `epic_mir_plus.pth`): a dict with `state_dict` whose
keys carry DataParallel's `module.` prefix: `video_model.*`, `vid_proj.0.*`, and the text side
(`text_model.*` DistilBERT, `txt_proj.1.*`), which the image metrics do not use.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.eval.images import center_crop, resize, short_side_size
from lego_jax.eval.weight_files import find_weights
from lego_jax.weights import io as weights_io
from lego_jax.weights import state as weights_state
from lego_jax.weights.mapping import Kind, Rule, torch_to_jax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EgoVLPConfig:
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 16
  image_size: int = 224
  num_frames: int = 4            # 4: egovlp.pth (Ego4D); 16: epic_mir_plus.pth (EPIC-Kitchens)
  projection_dim: int = 256
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @property
  def patches_per_frame(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def _ln(d, cfg, rngs):
  return nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       rngs=rngs)


def _dense(i, o, cfg, rngs):
  return nnx.Linear(i, o, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class VarAttention(nnx.Module):
  """Attention within groups of patches (frames or positions) plus the CLS token."""

  def __init__(self, cfg: EgoVLPConfig, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.qkv = _dense(cfg.embed_dim, 3 * cfg.embed_dim, cfg, rngs)
    self.proj = _dense(cfg.embed_dim, cfg.embed_dim, cfg, rngs)

  def __call__(self, x: jax.Array, frames: int, over: str) -> jax.Array:
    """x: (B, 1 + F*N, D); over "space" (within each frame) or "time" (across frames)."""
    b, length, d = x.shape
    h = self.num_heads
    n = (length - 1) // frames
    q, k, v = jnp.split(self.qkv(x).reshape(b, length, 3 * h, d // h), 3, axis=2)
    cls_out = jax.nn.dot_product_attention(q[:, :1], k, v)  # CLS sees every token

    def groups(t):  # (B, F*N, H, Dh) -> (B*groups, group_len, H, Dh)
      t = t.reshape(b, frames, n, h, d // h)
      if over == "time":
        t = t.transpose(0, 2, 1, 3, 4)
      return t.reshape(-1, t.shape[2], h, d // h)

    qg, kg, vg = groups(q[:, 1:]), groups(k[:, 1:]), groups(v[:, 1:])
    reps = qg.shape[0] // b
    cls_k = jnp.repeat(k[:, :1], reps, axis=0)
    cls_v = jnp.repeat(v[:, :1], reps, axis=0)
    out = jax.nn.dot_product_attention(qg, jnp.concatenate([cls_k, kg], 1),
                                       jnp.concatenate([cls_v, vg], 1))
    if over == "time":
      out = out.reshape(b, n, frames, h, d // h).transpose(0, 2, 1, 3, 4)
    out = out.reshape(b, frames * n, d)
    return self.proj(jnp.concatenate([cls_out.reshape(b, 1, d), out], axis=1))


class SpaceTimeBlock(nnx.Module):
  def __init__(self, cfg: EgoVLPConfig, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    self.norm1 = _ln(d, cfg, rngs)
    self.attn = VarAttention(cfg, rngs=rngs)
    self.timeattn = VarAttention(cfg, rngs=rngs)
    self.norm2 = _ln(d, cfg, rngs)
    self.fc1 = _dense(d, int(d * cfg.mlp_ratio), cfg, rngs)
    self.fc2 = _dense(int(d * cfg.mlp_ratio), d, cfg, rngs)
    self.norm3 = _ln(d, cfg, rngs)

  def __call__(self, x: jax.Array, frames: int) -> jax.Array:
    t = self.timeattn(self.norm3(x), frames, "time")
    s = self.attn(self.norm1(x + t), frames, "space")
    x = x + s
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class EgoVLPVideo(nnx.Module):
  """Video (B, F, S, S, 3) ImageNet-normalised -> (B, projection_dim) embedding."""

  def __init__(self, cfg: EgoVLPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.embed_dim, cfg.patch_size
    self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), cfg.param_dtype))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, cfg.patches_per_frame + 1, d),
                                    cfg.param_dtype))
    self.temporal_embed = nnx.Param(jnp.zeros((1, cfg.num_frames, d), cfg.param_dtype))

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> SpaceTimeBlock:
      return SpaceTimeBlock(cfg, rngs=r)

    self.blocks = make(rngs)
    self.norm = _ln(d, cfg, rngs)
    self.vid_proj = _dense(d, cfg.projection_dim, cfg, rngs)

  def __call__(self, video: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, f = video.shape[:2]
    if f > cfg.num_frames:
      raise ValueError(f"{f} frames given, the model takes at most {cfg.num_frames}")
    x = self.patch_embed(video.reshape((b * f,) + video.shape[2:]).astype(cfg.dtype))
    x = x.reshape(b, -1, cfg.embed_dim)                          # frame-major (f, h, w)
    n = x.shape[1] // f
    pos = self.pos_embed[...]
    tiled = (jnp.tile(pos[:, 1:], (1, cfg.num_frames, 1))
             + jnp.repeat(self.temporal_embed[...], n, axis=1))
    total = jnp.concatenate([pos[:, :1], tiled], axis=1)[:, :1 + f * n]
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.embed_dim))
    x = jnp.concatenate([cls, x], axis=1) + total.astype(cfg.dtype)

    def body(h, block):
      return block(h, f)

    if cfg.remat:
      body = nnx.remat(body)
    x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
    return self.vid_proj(self.norm(x)[:, 0]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class EgoVLPTextConfig:
  """DistilBERT-base-uncased (post-LN, GELU) + txt_proj (ReLU, Linear 768 -> 256)."""
  vocab_size: int = 30522
  dim: int = 768
  num_layers: int = 6
  num_heads: int = 12
  hidden_dim: int = 3072
  max_position: int = 512
  projection_dim: int = 256
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class DistilBertLayer(nnx.Module):
  def __init__(self, cfg: EgoVLPTextConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.num_heads = cfg.num_heads
    self.q_lin, self.k_lin = _dense(d, d, cfg, rngs), _dense(d, d, cfg, rngs)
    self.v_lin, self.out_lin = _dense(d, d, cfg, rngs), _dense(d, d, cfg, rngs)
    self.sa_layer_norm = _ln(d, cfg, rngs)
    self.lin1, self.lin2 = _dense(d, cfg.hidden_dim, cfg, rngs), _dense(cfg.hidden_dim, d, cfg, rngs)
    self.output_layer_norm = _ln(d, cfg, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
    a = jax.nn.dot_product_attention(split(self.q_lin(x)), split(self.k_lin(x)),
                                     split(self.v_lin(x)), mask=mask[:, None, None, :])
    x = self.sa_layer_norm(x + self.out_lin(a.reshape(b, t, d)))
    return self.output_layer_norm(x + self.lin2(jax.nn.gelu(self.lin1(x), approximate=False)))


class EgoVLPText(nnx.Module):
  """Token ids (B, T) + attention mask -> (B, projection_dim): the [CLS] state through txt_proj."""

  def __init__(self, cfg: EgoVLPTextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.dim, param_dtype=cfg.param_dtype, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_position, cfg.dim, param_dtype=cfg.param_dtype,
                                         rngs=rngs)
    self.embed_norm = _ln(cfg.dim, cfg, rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> DistilBertLayer:
      return DistilBertLayer(cfg, rngs=r)

    self.layers = make(rngs)
    self.txt_proj = _dense(cfg.dim, cfg.projection_dim, cfg, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    t = input_ids.shape[1]
    mask = (jnp.ones_like(input_ids, bool) if attention_mask is None
            else attention_mask.astype(bool))
    x = self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(t))[None]
    x = self.embed_norm(x.astype(self.cfg.dtype))
    x = nnx.scan(lambda h, layer: layer(h, mask), in_axes=(nnx.Carry, 0),
                 out_axes=nnx.Carry)(x, self.layers)
    return self.txt_proj(jax.nn.relu(x[:, 0])).astype(jnp.float32)


# ---- PyTorch key layout (FrozenInTime) ----

def _param_keys(module: str, torch_module: str | None = None, norm: bool = False):
  """(torch suffix, nnx suffix, kind) for one Linear (weight/bias) or LayerNorm (weight/bias)."""
  t = torch_module or module
  if norm:
    return ((f"{t}.weight", f"{module}.scale", Kind.IDENTITY),
            (f"{t}.bias", f"{module}.bias", Kind.IDENTITY))
  return ((f"{t}.weight", f"{module}.kernel", Kind.LINEAR),
          (f"{t}.bias", f"{module}.bias", Kind.IDENTITY))


_BLOCK_KEYS = (*_param_keys("norm1", norm=True), *_param_keys("norm2", norm=True),
               *_param_keys("norm3", norm=True), *_param_keys("attn.qkv"),
               *_param_keys("attn.proj"), *_param_keys("timeattn.qkv"),
               *_param_keys("timeattn.proj"), *_param_keys("fc1", "mlp.fc1"),
               *_param_keys("fc2", "mlp.fc2"))

VIDEO_RULES = [
    Rule("video_model.patch_embed.proj.weight", "patch_embed.kernel", Kind.CONV2D),
    Rule("video_model.patch_embed.proj.bias", "patch_embed.bias"),
    Rule("video_model.cls_token", "cls_token"),
    Rule("video_model.pos_embed", "pos_embed"),
    Rule("video_model.temporal_embed", "temporal_embed"),
    Rule("video_model.norm.weight", "norm.scale"),
    Rule("video_model.norm.bias", "norm.bias"),
    Rule("vid_proj.0.weight", "vid_proj.kernel", Kind.LINEAR),
    Rule("vid_proj.0.bias", "vid_proj.bias"),
] + [Rule(f"video_model.blocks.{{l}}.{t}", f"blocks.{j}", kind, stack="l")
     for t, j, kind in _BLOCK_KEYS]

# The text tower and its projection: EgoVLP's text side (EgoVLPText), not used by the video tower.
VIDEO_IGNORE = (r"^text_model\.", r"^txt_proj\.")

_TEXT_LAYER_KEYS = (
    *(k for n in ("q_lin", "k_lin", "v_lin", "out_lin") for k in _param_keys(n, f"attention.{n}")),
    *_param_keys("lin1", "ffn.lin1"), *_param_keys("lin2", "ffn.lin2"),
    *_param_keys("sa_layer_norm", norm=True), *_param_keys("output_layer_norm", norm=True))

TEXT_RULES = [
    Rule("text_model.embeddings.word_embeddings.weight", "word_embeddings.embedding"),
    Rule("text_model.embeddings.position_embeddings.weight", "position_embeddings.embedding"),
    Rule("text_model.embeddings.LayerNorm.weight", "embed_norm.scale"),
    Rule("text_model.embeddings.LayerNorm.bias", "embed_norm.bias"),
    Rule("txt_proj.1.weight", "txt_proj.kernel", Kind.LINEAR),
    Rule("txt_proj.1.bias", "txt_proj.bias"),
] + [Rule(f"text_model.transformer.layer.{{l}}.{t}", f"layers.{j}", kind, stack="l")
     for t, j, kind in _TEXT_LAYER_KEYS]
# The video side, and the position-id buffer older transformers saved.
TEXT_IGNORE = (r"^video_model\.", r"^vid_proj\.", r"^text_model\.embeddings\.position_ids$")


def _unwrap(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def fit_temporal_embed(sd: dict[str, np.ndarray], num_frames: int) -> dict[str, np.ndarray]:
  """FrozenInTime's `_inflate_positional_embeds` with load_temporal_fix='zeros': a checkpoint
  trained with more frames is truncated, one with fewer is zero-padded."""
  key = "video_model.temporal_embed"
  if key in sd and sd[key].shape[1] != num_frames:
    t = np.asarray(sd[key])
    out = np.zeros((t.shape[0], num_frames, t.shape[2]), t.dtype)
    m = min(num_frames, t.shape[1])
    out[:, :m] = t[:, :m]
    sd = dict(sd)
    sd[key] = out
  return sd


def load_egovlp(model: EgoVLPVideo, state_dict: Mapping[str, np.ndarray],
                source: str = "EgoVLP checkpoint") -> EgoVLPVideo:
  sd = fit_temporal_embed(_unwrap(state_dict), model.cfg.num_frames)
  arrays = torch_to_jax(sd, VIDEO_RULES, weights_state.param_shapes(model), ignore=VIDEO_IGNORE,
                        source=source)
  return weights_state.load_params(model, arrays)


def load_egovlp_text(model: EgoVLPText, state_dict: Mapping[str, np.ndarray],
                     source: str = "EgoVLP checkpoint") -> EgoVLPText:
  arrays = torch_to_jax(_unwrap(state_dict), TEXT_RULES, weights_state.param_shapes(model),
                        ignore=TEXT_IGNORE, source=source)
  return weights_state.load_params(model, arrays)


def abstract_egovlp(cfg: EgoVLPConfig) -> EgoVLPVideo:
  return nnx.eval_shape(lambda: EgoVLPVideo(cfg, rngs=nnx.Rngs(0)))


def config_from_state_dict(sd: Mapping[str, np.ndarray], num_frames: int, **overrides) -> EgoVLPConfig:
  """Sizes read off the (unwrapped) weights; heads are not stored, ViT's 64 per head is assumed
  unless `num_heads` is given."""
  patch = sd["video_model.patch_embed.proj.weight"]
  d, p = int(patch.shape[0]), int(patch.shape[-1])
  grid = int(round((sd["video_model.pos_embed"].shape[1] - 1) ** 0.5))
  depth = 1 + max(int(m.group(1)) for k in sd
                  if (m := re.match(r"video_model\.blocks\.(\d+)\.", k)))
  fields = dict(embed_dim=d, depth=depth, num_heads=max(1, d // 64), patch_size=p,
                image_size=grid * p, num_frames=num_frames,
                mlp_ratio=sd["video_model.blocks.0.mlp.fc1.weight"].shape[0] / d,
                projection_dim=int(sd["vid_proj.0.weight"].shape[0]))
  fields.update(overrides)
  return EgoVLPConfig(**fields)


def build_egovlp(weights_dir: str, dataset: str, num_frames: int, **overrides) -> EgoVLPVideo:
  """egovlp.pth for Ego4D, epic_mir_plus.pth for EPIC-Kitchens (as the release)."""
  key = "egovlp_epickitchens" if dataset.startswith("epic") else "egovlp_ego4d"
  path = find_weights(weights_dir, key)
  sd = _unwrap(weights_io.read_state_dict(path))
  if "video_model.patch_embed.proj.weight" not in sd:
    raise weights_io.WeightFileError(
        f"{path}: no video_model.patch_embed.proj.weight; not an EgoVLP (FrozenInTime) checkpoint")
  cfg = config_from_state_dict(sd, num_frames, **overrides)
  return load_egovlp(abstract_egovlp(cfg), sd, source=path.name)


# ---- the metric ----

def egovlp_frame(image: jnp.ndarray, size: int = 224) -> jnp.ndarray:
  """(B, H, W, 3) in [0, 1] -> (B, size, size, 3): Resize(size) short side, CenterCrop, ImageNet."""
  h, w = image.shape[-3], image.shape[-2]
  x = center_crop(resize(image.astype(jnp.float32), short_side_size(h, w, size), "bilinear"), size)
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


@nnx.jit(static_argnames=("frames",))
def egovlp_embed(model: EgoVLPVideo, images: jnp.ndarray, frames: int) -> jnp.ndarray:
  """EgoVLP clip of each image repeated `frames` times: (B, H, W, 3) in [0, 1] -> (B, 256)."""
  x = egovlp_frame(images, model.cfg.image_size)
  return model(jnp.repeat(x[:, None], frames, axis=1))


@nnx.jit(static_argnames=("frames",))
def egovlp_plus_embed(model: EgoVLPVideo, inputs: jnp.ndarray, images: jnp.ndarray,
                      frames: int) -> jnp.ndarray:
  """EgoVLP+ clip [input x frames/2, image x frames/2]; both (B, H, W, 3) -> (B, 256)."""
  s = model.cfg.image_size
  first = jnp.repeat(egovlp_frame(inputs, s)[:, None], frames // 2, axis=1)
  last = jnp.repeat(egovlp_frame(images, s)[:, None], frames - frames // 2, axis=1)
  return model(jnp.concatenate([first, last], axis=1))


def cosine(a, b, eps: float = 1e-8):
  """EgoVLP's sim_matrix diagonal: rows normalised by max(norm, eps)."""
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return jnp.sum(a * b, axis=-1)


def egovlp_similarity(model: EgoVLPVideo, generated, reference, frames: int) -> jnp.ndarray:
  """EgoVLP score per pair (B,): cosine of the two repeated-image clips' embeddings."""
  return cosine(egovlp_embed(model, generated, frames), egovlp_embed(model, reference, frames))


def egovlp_plus_similarity(model: EgoVLPVideo, inputs, generated, reference,
                           frames: int) -> jnp.ndarray:
  """EgoVLP+ score per pair (B,); inputs, generated and reference share one size."""
  return cosine(egovlp_plus_embed(model, inputs, generated, frames),
                egovlp_plus_embed(model, inputs, reference, frames))
