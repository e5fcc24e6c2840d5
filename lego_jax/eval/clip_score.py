"""CLIP image-image score: cosine of CLIP ViT-L/14 image embeddings of generated vs ground truth.

As the release's ClipSimilarity: [0, 1] images squashed to the model's input size with PyTorch's
bicubic `F.interpolate` (align_corners=False, no antialias, no clamping), CLIP mean/std, the
post-LN CLS token through the visual projection, L2-normalised, cosine per pair.

The tower is lego_jax.models.clip_vision (transformers layouts, see its VISION_LAYOUTS). The
weights are `<weights_dir>/clip-vit-large-patch14` (a hub snapshot directory; its config.json
gives the head count) or a single file of the same stem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.eval.images import resize
from lego_jax.models.clip_vision import (CLIP_MEAN, CLIP_STD, CLIPVision, CLIPVisionConfig,
                                         detect_vision_layout, load_clip_vision)
from lego_jax.eval.weight_files import find_weights
from lego_jax.weights import io as weights_io


def clip_pixels(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """(B, H, W, 3) in [0, 1] -> (B, size, size, 3) CLIP-normalised (bicubic squash)."""
  x = resize(images.astype(jnp.float32), (size, size), "bicubic")
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


@nnx.jit
def clip_embeddings(model: CLIPVision, images: jnp.ndarray) -> jnp.ndarray:
  """(B, H, W, 3) in [0, 1] -> (B, projection_dim) unit-norm image embeddings."""
  e = model.image_embeds(clip_pixels(images, model.cfg.image_size)).astype(jnp.float32)
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def clip_similarity(model: CLIPVision, generated: jnp.ndarray, reference: jnp.ndarray) -> jnp.ndarray:
  """Per-pair cosine (B,) between [0, 1] image batches (sizes may differ between the two)."""
  return jnp.sum(clip_embeddings(model, generated) * clip_embeddings(model, reference), axis=-1)


def config_from_state_dict(sd: Mapping[str, np.ndarray], hf_config: dict | None = None,
                           **overrides) -> CLIPVisionConfig:
  """The tower's size read off the weights (heads from config.json, else CLIP's 64 per head)."""
  layout = detect_vision_layout(sd)
  prefix = {"clip": "vision_model.", "clip_tower": ""}.get(layout, "")
  patch = sd[f"{prefix}embeddings.patch_embedding.weight"]
  hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
  positions = int(sd[f"{prefix}embeddings.position_embedding.weight"].shape[0])
  grid = int(round((positions - 1) ** 0.5))
  layers = 1 + max(int(m.group(1)) for k in sd
                   if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k)))
  fc1 = sd[f"{prefix}encoder.layers.0.mlp.fc1.weight"]
  proj = sd.get("visual_projection.weight")
  vc = (hf_config or {}).get("vision_config", hf_config or {})
  heads = int(vc.get("num_attention_heads", max(1, hidden // 64)))
  return CLIPVisionConfig(
      hidden_size=hidden, intermediate_size=int(fc1.shape[0]), num_layers=layers, num_heads=heads,
      image_size=grid * patch_size, patch_size=patch_size,
      layer_norm_eps=float(vc.get("layer_norm_eps", 1e-5)),
      projection_dim=int(proj.shape[0]) if proj is not None else hidden,
      with_projection=True, **overrides)


def build_clip(weights_dir: str, **overrides) -> CLIPVision:
  path = find_weights(weights_dir, "clip")
  sd = weights_io.read_state_dict(path)
  hf_config = None
  cfg_file = Path(path) / "config.json" if Path(path).is_dir() else None
  if cfg_file is not None and cfg_file.exists():
    hf_config = json.loads(cfg_file.read_text())
  if "visual_projection.weight" not in sd:
    raise weights_io.WeightFileError(
        f"{path}: no visual_projection.weight; the CLIP score needs the full CLIP model "
        "(CLIPModel or CLIPVisionModelWithProjection), not the bare vision tower")
  cfg = config_from_state_dict(sd, hf_config, **overrides)
  model = nnx.eval_shape(lambda: CLIPVision(cfg, rngs=nnx.Rngs(0)))
  return load_clip_vision(model, sd)


def clip_similarity_np(model: CLIPVision, generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
  return np.asarray(jax.device_get(clip_similarity(model, jnp.asarray(generated),
                                                   jnp.asarray(reference))))
