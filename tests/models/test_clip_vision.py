"""Parity of the NNX CLIP vision tower with transformers' CLIP, for every checkpoint layout."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from lego_jax import config as config_lib
from lego_jax.models import clip_vision as clip_vision_lib
from lego_jax.models.clip_vision import (CLIPVision, CLIPVisionConfig, clip_vision_to_torch,
                                         detect_vision_layout, load_clip_vision, preprocess)
from lego_jax.parallel.sharding import make_mesh, state_shardings
from lego_jax.weights.io import read_state_dict
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.pretrained import PretrainedConfigError
from lego_jax.weights.state import abstract_param_shapes, param_shapes
from helpers import rel_l2

# Small towers: an odd head count, image sizes that are no multiple of the patch or of 32.
CONFIGS = {
    "3heads_30px": dict(hidden_size=48, intermediate_size=80, num_layers=4, num_heads=3,
                        image_size=30, patch_size=7, projection_dim=20),
    "4heads_42px": dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        image_size=42, patch_size=6, projection_dim=24),
}


def _hf_config(c: dict) -> transformers.CLIPVisionConfig:
  return transformers.CLIPVisionConfig(
      hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
      num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
      image_size=c["image_size"], patch_size=c["patch_size"], projection_dim=c["projection_dim"],
      hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  # transformers initialises LayerNorms to (1, 0) and biases to 0; random values make the
  # parity test sensitive to every parameter, including a swapped scale and bias.
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim <= 1:
        p.copy_(0.2 * noise)
      else:
        p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
  return model.eval()


def _pixels(c: dict, batch: int = 2, seed: int = 0) -> np.ndarray:
  s = c["image_size"]
  return np.random.default_rng(seed).normal(size=(batch, s, s, 3)).astype(np.float32)


def _ref_outputs(hf_model, pixels: np.ndarray):
  with torch.no_grad():
    return hf_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                    output_hidden_states=True)


def _ours(c: dict, **kw) -> CLIPVision:
  # abstract: the loader fills every parameter, random init would only cost time
  return nnx.eval_shape(lambda: CLIPVision(CLIPVisionConfig(**c, **kw), rngs=nnx.Rngs(1)))


@nnx.jit
def _forward(model: CLIPVision, px: jax.Array) -> dict[str, jax.Array]:
  """Every output the tests compare, in one compiled program."""
  out = model(px, output_hidden_states=True)
  out["features"] = model.features(px)
  if model.cfg.with_projection:
    out["image_embeds"] = model.image_embeds(px)
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_vision_model_parity(name, tmp_path):
  """transformers-5 CLIPVisionModel file (no prefix) -> features, hidden states, pooled."""
  c = CONFIGS[name]
  hf = _randomize(transformers.CLIPVisionModel(_hf_config(c)), seed=1)
  hf.save_pretrained(tmp_path)
  sd = read_state_dict(tmp_path)
  assert detect_vision_layout(sd) == "clip_tower"
  model = clip_vision_lib.from_pretrained(tmp_path)  # every size from config.json
  assert model.cfg == CLIPVisionConfig(**c)
  px = _pixels(c)
  ref = _ref_outputs(hf, px)
  out = _forward(model, jnp.asarray(px))
  feats = out["features"]
  num_patches = (c["image_size"] // c["patch_size"]) ** 2
  assert feats.shape == (2, num_patches, c["hidden_size"])
  assert rel_l2(feats, ref.hidden_states[-2][:, 1:].numpy()) <= 1e-4
  assert rel_l2(out["last_hidden_state"], ref.last_hidden_state.numpy()) <= 1e-4
  assert rel_l2(out["pooled"], ref.pooler_output.numpy()) <= 1e-4
  assert out["hidden_states"].shape[0] == len(ref.hidden_states) == c["num_layers"] + 1
  for i, h in enumerate(ref.hidden_states):
    assert rel_l2(out["hidden_states"][i], h.numpy()) <= 1e-4, i
  # export restores the file exactly: same keys, same values
  back = clip_vision_to_torch(model, "clip_tower")
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("select_layer", [-1, -3, 1])
def test_select_layer_matches_hidden_states_index(select_layer, tmp_path):
  c = CONFIGS["3heads_30px"]
  hf = _randomize(transformers.CLIPVisionModel(_hf_config(c)), seed=2)
  model = load_clip_vision(_ours(c, select_layer=select_layer),
                           {k: v.numpy() for k, v in hf.state_dict().items()})
  px = _pixels(c, seed=3)
  ref = _ref_outputs(hf, px).hidden_states[select_layer][:, 1:].numpy()
  assert rel_l2(nnx.jit(CLIPVision.features)(model, jnp.asarray(px)), ref) <= 1e-4


def test_features_skip_the_layers_after_the_selected_one():
  """select_layer=-2 on 4 layers: the traced program scans exactly 3 layers."""
  c = CONFIGS["3heads_30px"]
  model = _ours(c)
  px = jax.ShapeDtypeStruct((1, 30, 30, 3), jnp.float32)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).features(x))(state, px)
  lengths = [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert lengths == [3]
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)["pooled"])(state, px)
  assert [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"] == [4]


def test_with_projection_parity_and_bf16(tmp_path):
  """CLIPVisionModelWithProjection (vision_model.* + visual_projection): image_embeds, bf16."""
  c = CONFIGS["4heads_42px"]
  hf = _randomize(transformers.CLIPVisionModelWithProjection(_hf_config(c)), seed=4)
  hf.save_pretrained(tmp_path)
  sd = read_state_dict(tmp_path)
  assert detect_vision_layout(sd) == "clip" and "visual_projection.weight" in sd
  model = clip_vision_lib.from_pretrained(tmp_path, with_projection=True)
  assert model.cfg == CLIPVisionConfig(**c, with_projection=True)
  px = _pixels(c, seed=5)
  with torch.no_grad():
    ref = hf(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2)), output_hidden_states=True)
  out = _forward(model, jnp.asarray(px))
  assert out["image_embeds"].shape == (2, c["projection_dim"])
  assert rel_l2(out["image_embeds"], ref.image_embeds.numpy()) <= 1e-4
  feats_ref = ref.hidden_states[-2][:, 1:].numpy()
  assert rel_l2(out["features"], feats_ref) <= 1e-4

  back = clip_vision_to_torch(model, "clip")
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)

  # bf16 compute, fp32 parameters, against the fp32 reference
  half = clip_vision_lib.from_pretrained(tmp_path, with_projection=True, dtype=jnp.bfloat16)
  assert half.patch_embedding.kernel[...].dtype == jnp.float32
  out = _forward(half, jnp.asarray(px))
  assert out["image_embeds"].dtype == out["features"].dtype == jnp.bfloat16
  err_emb = rel_l2(out["image_embeds"].astype(jnp.float32), ref.image_embeds.numpy())
  err_feat = rel_l2(out["features"].astype(jnp.float32), feats_ref)
  assert 1e-4 < err_emb <= 3e-2 and 1e-4 < err_feat <= 3e-2, (err_emb, err_feat)

  # LLaVA's tower from the same file: the projection is skipped on purpose, not an error
  plain = load_clip_vision(_ours(c), sd)
  assert not hasattr(plain, "projection")
  assert rel_l2(nnx.jit(CLIPVision.features)(plain, jnp.asarray(px)), feats_ref) <= 1e-4


def test_clip_model_file_with_both_towers(tmp_path):
  """A CLIPModel (hub layout, text tower + logit_scale + position_ids buffer beside it)."""
  c = CONFIGS["3heads_30px"]
  cfg = transformers.CLIPConfig(
      vision_config=_hf_config(c).to_dict(),
      text_config=dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=12, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1),
      projection_dim=c["projection_dim"])
  hf = _randomize(transformers.CLIPModel(cfg), seed=6)
  hf.save_pretrained(tmp_path)
  sd = read_state_dict(tmp_path)
  # transformers 4.x files carry the position_ids buffer; it is a buffer, not a weight
  sd["vision_model.embeddings.position_ids"] = np.arange(17)[None]
  assert any(k.startswith("text_model.") for k in sd) and "logit_scale" in sd
  model = load_clip_vision(_ours(c, with_projection=True), sd)
  px = _pixels(c, seed=7)
  with torch.no_grad():
    ref = hf.get_image_features(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2)))
  ref = getattr(ref, "pooler_output", ref)  # transformers 5 returns an output object
  assert rel_l2(nnx.jit(CLIPVision.image_embeds)(model, jnp.asarray(px)), ref.numpy()) <= 1e-4
  # The CLIPModel directory alone: the vision_config section and the top-level projection_dim.
  built = clip_vision_lib.from_pretrained(tmp_path, with_projection=True)
  assert built.cfg == model.cfg


def test_from_pretrained_refuses_disagreements_by_field(tmp_path):
  c = CONFIGS["4heads_42px"]
  transformers.CLIPVisionModel(_hf_config(c)).save_pretrained(tmp_path)
  with pytest.raises(PretrainedConfigError, match=r"num_heads=8 .*\(num_attention_heads\)=4"):
    clip_vision_lib.from_pretrained(tmp_path, num_heads=8)
  config = json.loads((tmp_path / "config.json").read_text())
  for change, message in (({"image_size": 36}, "says image_size=36 but the weights have 42"),
                          ({"num_hidden_layers": 4}, "says num_layers=4 but the weights have 3"),
                          ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported")):
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PretrainedConfigError, match=message.replace("have ", "have .*=")):
      clip_vision_lib.from_pretrained(tmp_path)


def _llava_files(sd_tower: dict, layout: str) -> dict:
  """A tower's keys as a LLaVA checkpoint holds them, with LLM and projector keys beside."""
  prefix = {"llava": "model.vision_tower.vision_tower.vision_model.",
            "hf_llava_v4": "vision_tower.vision_model.",
            "hf_llava_module": "model.vision_tower."}[layout]
  out = {prefix + k: v for k, v in sd_tower.items()}
  junk = {"llava": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.mm_projector.weight", "lm_head.weight"],
          "hf_llava_v4": ["language_model.model.embed_tokens.weight",
                          "multi_modal_projector.linear_1.weight"],
          "hf_llava_module": ["model.language_model.layers.0.mlp.up_proj.weight",
                              "model.multi_modal_projector.linear_1.bias", "lm_head.weight"]}
  for k in junk[layout]:
    out[k] = np.zeros((2, 2), np.float32)
  out[prefix + "embeddings.position_ids"] = np.arange(3)[None]
  return out


@pytest.mark.parametrize("layout", ["llava", "hf_llava_v4", "hf_llava_module"])
def test_llava_layouts_load_and_export(layout):
  c = CONFIGS["4heads_42px"]
  hf = _randomize(transformers.CLIPVisionModel(_hf_config(c)), seed=8)
  tower = {k: v.numpy() for k, v in hf.state_dict().items()}
  sd = _llava_files(tower, layout)
  assert detect_vision_layout(sd) == layout
  model = load_clip_vision(_ours(c), sd)
  px = _pixels(c, seed=9)
  ref = _ref_outputs(hf, px).hidden_states[-2][:, 1:].numpy()
  assert rel_l2(nnx.jit(CLIPVision.features)(model, jnp.asarray(px)), ref) <= 1e-4
  back = clip_vision_to_torch(model, layout)
  expected = {k: v for k, v in sd.items() if k.endswith(tuple(tower)) and "position_ids" not in k}
  assert set(back) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(back[k], expected[k])


def test_transformers5_llava_file(tmp_path):
  """What LlavaForConditionalGeneration.save_pretrained writes with the installed transformers."""
  c = CONFIGS["3heads_30px"]
  cfg = transformers.LlavaConfig(
      vision_config=_hf_config(c).to_dict(),
      text_config=dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2),
      image_token_index=5)
  hf = _randomize(transformers.LlavaForConditionalGeneration(cfg), seed=12)
  hf.save_pretrained(tmp_path)
  sd = read_state_dict(tmp_path)
  # transformers 5 writes the legacy names with the tower's own prefix dropped: vision_tower.*
  assert detect_vision_layout(sd) == "hf_llava"
  model = load_clip_vision(_ours(c), tmp_path)
  px = _pixels(c, seed=10)
  ref = _ref_outputs(hf.model.vision_tower, px).hidden_states[-2][:, 1:].numpy()
  assert rel_l2(nnx.jit(CLIPVision.features)(model, jnp.asarray(px)), ref) <= 1e-4
  back = clip_vision_to_torch(model, "hf_llava")
  expected = {k: v for k, v in sd.items() if k.startswith("vision_tower.")}
  assert set(back) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(back[k], expected[k])


def test_bad_checkpoints_name_the_culprits():
  c = CONFIGS["4heads_42px"]
  hf = transformers.CLIPVisionModel(_hf_config(c))
  good = {f"vision_model.{k}": v.numpy() for k, v in hf.state_dict().items()}

  sd = dict(good)
  del sd["vision_model.encoder.layers.1.mlp.fc2.bias"]
  with pytest.raises(KeyMappingError, match=re.escape("encoder.layers.fc2.bias")):
    load_clip_vision(_ours(c), sd)

  sd = dict(good)
  sd["vision_model.encoder.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
  with pytest.raises(KeyMappingError, match=re.escape("layers.0.self_attn.rotary.weight")):
    load_clip_vision(_ours(c), sd)

  sd = dict(good)
  sd["vision_model.post_layernorm.weight"] = np.zeros(c["hidden_size"] + 1, np.float32)
  with pytest.raises(KeyMappingError, match=re.escape("post_norm.scale")):
    load_clip_vision(_ours(c), sd)

  # a projection-less file cannot fill a model that has one
  with pytest.raises(KeyMappingError, match=re.escape("projection.kernel")):
    load_clip_vision(_ours(c, with_projection=True), good)
  # another tower's file: nothing to detect
  with pytest.raises(KeyMappingError, match="no CLIP vision tower"):
    load_clip_vision(_ours(c), {"text_model.embeddings.token_embedding.weight": np.zeros((2, 2))})


def test_full_size_parameter_counts():
  def count(**kw):
    shapes = abstract_param_shapes(lambda: CLIPVision(CLIPVisionConfig(**kw), rngs=nnx.Rngs(0)))
    return sum(int(np.prod(s)) for s in shapes.values())

  assert count() == 303_179_776                       # transformers CLIPVisionModel, ViT-L/14
  assert CLIPVisionConfig(**config_lib.load("lego_ego4d").clip_vision) == CLIPVisionConfig()
  tiny = CLIPVisionConfig(**config_lib.load("tiny").clip_vision)
  assert nnx.eval_shape(lambda: CLIPVision(tiny, rngs=nnx.Rngs(0))).cfg.num_patches == 16
  assert count(with_projection=True) == 303_179_776 + 1024 * 768   # + visual_projection
  abstract = nnx.eval_shape(lambda: CLIPVision(CLIPVisionConfig(), rngs=nnx.Rngs(0)))
  shapes = param_shapes(abstract)
  assert shapes["position_embedding"] == (257, 1024)
  assert shapes["encoder.layers.fc1.kernel"] == (24, 1024, 4096)
  # logical names -> mesh axes: FSDP over the model dimension, tensor parallel over heads
  shardings = state_shardings(make_mesh((2, 2, 2)), nnx.state(abstract, nnx.Param))
  assert shardings["patch_embedding"]["kernel"].spec == P(None, None, None, "fsdp")
  assert shardings["encoder"]["layers"]["attn"]["query"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert shardings["encoder"]["layers"]["attn"]["out"]["kernel"].spec == P(None, "tensor", "fsdp")


def test_preprocess_matches_clip_image_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  rng = np.random.default_rng(11)
  # portrait, landscape with an odd size (center crop off by one), already square
  images = [(rng.random(shape) * 255).astype(np.uint8)
            for shape in [(61, 40, 3), (33, 75, 3), (32, 32, 3)]]
  proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  for img in images:
    ref = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = preprocess(img, image_size=32)
    assert got.shape == (32, 32, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
  batch = preprocess(np.stack([images[0], images[0]]), image_size=32)
  assert batch.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(batch[1], preprocess(images[0], image_size=32))
  # the CLIP-score view squashes instead of cropping: an all-red image stays all red
  red = np.zeros((20, 50, 3), np.uint8)
  red[..., 0] = 255
  sq = preprocess([red], image_size=16, mode="squash")
  expect = (np.array([1.0, 0.0, 0.0]) - np.array([0.48145466, 0.4578275, 0.40821073])) / \
      np.array([0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_allclose(sq[0], np.broadcast_to(expect, (16, 16, 3)), atol=1e-5)


def test_position_init_std_sets_the_random_position_table():
  """`position_init_std` (default 0.02, transformers' initializer_range) only scales the random
  position table of a tower trained from scratch; every other draw is unchanged."""
  c = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=32,
           patch_size=8)
  assert CLIPVisionConfig().position_init_std == 0.02
  a = CLIPVision(CLIPVisionConfig(**c), rngs=nnx.Rngs(0))
  b = CLIPVision(CLIPVisionConfig(**c, position_init_std=1.0), rngs=nnx.Rngs(0))
  pa, pb = np.asarray(a.position_embedding[...]), np.asarray(b.position_embedding[...])
  np.testing.assert_allclose(pb, pa / 0.02, rtol=1e-5, atol=1e-6)
  assert 0.9 < pb.std() < 1.1
  np.testing.assert_array_equal(np.asarray(a.patch_embedding.kernel[...]),
                                np.asarray(b.patch_embedding.kernel[...]))
