"""CLIP score parity: a small random transformers CLIPModel saved as a hub snapshot directory,
scored by the release's recipe in PyTorch (bicubic F.interpolate squash, CLIP mean/std, projected
CLS, cosine) and by lego_jax.eval.clip_score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from lego_jax.eval import clip_score
from lego_jax.eval.weight_files import MissingWeightsError
from lego_jax.weights.io import WeightFileError

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))[None, :, None, None]
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))[None, :, None, None]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=3, image_size=40, patch_size=8,
                         hidden_act="quick_gelu"),
      projection_dim=24)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():  # non-trivial norms/biases so every parameter matters
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("clipw")
  model.save_pretrained(root / "clip-vit-large-patch14")
  return model, root


def torch_score(model, gen, ref):
  def embed(x):
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    x = F.interpolate(x, size=40, mode="bicubic", align_corners=False)
    e = model.visual_projection(model.vision_model(pixel_values=(x - MEAN) / STD).pooler_output)
    return e / e.norm(dim=1, keepdim=True)
  with torch.no_grad():
    return F.cosine_similarity(embed(gen), embed(ref)).numpy()


def test_clip_score_parity_with_release_recipe(snapshot):
  model, root = snapshot
  ours = clip_score.build_clip(str(root))
  assert ours.cfg.num_heads == 3 and ours.cfg.image_size == 40 and ours.cfg.projection_dim == 24
  rng = np.random.default_rng(0)
  ref = rng.uniform(0, 1, (3, 57, 71, 3)).astype(np.float32)
  gen = np.clip(ref + rng.normal(0, 0.3, ref.shape), 0, 1).astype(np.float32)
  want = torch_score(model, gen, ref)
  got = clip_score.clip_similarity_np(ours, gen, ref)
  assert got.shape == (3,)
  assert np.all(want < 0.9999)  # the perturbation is visible to the model
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(clip_score.clip_similarity_np(ours, ref, ref), 1.0, atol=1e-5)


def test_clip_embeddings_match_projected_cls(snapshot):
  model, root = snapshot
  ours = clip_score.build_clip(str(root))
  img = np.random.default_rng(1).uniform(0, 1, (2, 40, 40, 3)).astype(np.float32)
  with torch.no_grad():
    x = (torch.from_numpy(img.transpose(0, 3, 1, 2).copy()) - MEAN) / STD
    e = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
    want = (e / e.norm(dim=1, keepdim=True)).numpy()
  got = np.asarray(clip_score.clip_embeddings(ours, img))
  rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert rel <= 1e-4


def test_missing_and_projectionless_weights_are_clear(snapshot, tmp_path):
  with pytest.raises(MissingWeightsError, match="clip-vit-large-patch14"):
    clip_score.build_clip(str(tmp_path))
  model, _ = snapshot
  tower = transformers.CLIPVisionModel(model.config.vision_config)
  tower.save_pretrained(tmp_path / "clip-vit-large-patch14")
  with pytest.raises(WeightFileError, match="visual_projection"):
    clip_score.build_clip(str(tmp_path))
