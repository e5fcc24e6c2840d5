"""LLaVA parity with transformers' LlavaForConditionalGeneration, every checkpoint layout, the
linear projector of the original LLaVA layout, and greedy KV-cache generation with H_t."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from lego_jax.infer import decode
from lego_jax.models import llava as llava_lib
from lego_jax.models.clip_vision import CLIPVisionConfig
from lego_jax.models.llama import LlamaConfig
from lego_jax.models.llava import Llava, LlavaConfig
from lego_jax.weights import io
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.pretrained import PretrainedConfigError
from lego_jax.weights.state import abstract_param_shapes, flat_params
from helpers import rel_l2

VOCAB, IMAGE_TOKEN, PATCHES = 80, 79, 4
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=64)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
              image_size=28, patch_size=14, projection_dim=8)


def our_config(projector="mlp2x_gelu") -> LlavaConfig:
  vision = CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_layers=3, num_heads=2,
                            image_size=28, patch_size=14, projection_dim=8)
  llama = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position=64)
  return LlavaConfig(projector=projector, vision_hidden=24, text_hidden=32,
                     image_token_id=IMAGE_TOKEN, vision=vision, llama=llama)


def abstract(config: LlavaConfig) -> Llava:
  return nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(transformers Llava, the state dict its save_pretrained wrote, as read back)."""
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION),
      text_config=transformers.LlamaConfig(**TEXT), image_token_id=IMAGE_TOKEN,
      vision_feature_layer=-2, vision_feature_select_strategy="default")
  model = transformers.LlavaForConditionalGeneration(config).eval()
  path = tmp_path_factory.mktemp("llava")
  model.save_pretrained(path)
  _PATHS["llava"] = path
  return model, io.read_state_dict(path)


_PATHS = {}


def inputs(seed, batch=2, length=10, image_at=1):
  """Token ids with one image's PATCHES placeholders, and NCHW pixels for torch."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, IMAGE_TOKEN, (batch, length))
  ids[:, image_at:image_at + PATCHES] = IMAGE_TOKEN
  pixels = rng.normal(size=(batch, 3, 28, 28)).astype(np.float32)
  return ids, pixels


def nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def hf_forward(model, ids, pixels):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels),
                output_hidden_states=True)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def test_full_size_param_count_and_config_sections():
  shapes = abstract_param_shapes(lambda: Llava(LlavaConfig(), rngs=nnx.Rngs(0)))
  parts = {p: sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(p + "."))
           for p in ("vision", "projector", "lm")}
  assert parts == {"vision": 303_179_776, "projector": 1024 * 5120 + 5120, "lm": 13_015_864_320}
  assert shapes["projector.linear_1.kernel"] == (1024, 5120)
  spec = importlib.util.spec_from_file_location(
      "tiny", pathlib.Path(__file__).parents[2] / "configs" / "tiny.py")
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = LlavaConfig.from_config(tiny.get_config(), dtype=jnp.bfloat16, remat=True)
  assert config.llama.hidden_size == 128 and config.vision.hidden_size == 64
  assert config.llama.dtype == config.vision.dtype == config.dtype == jnp.bfloat16
  assert config.llama.remat and config.projector == "linear"
  with pytest.raises(ValueError, match="text_hidden"):
    LlavaConfig(text_hidden=4096)


@pytest.mark.parametrize("layout", ["hf_llava", "hf_llava_module", "hf_llava_v4"])
def test_transformers_layouts_match_logits_with_image_tokens(reference, layout):
  hf, saved = reference
  if layout == "hf_llava":
    state_dict = saved                                   # what transformers 5 save_pretrained wrote
  elif layout == "hf_llava_module":
    state_dict = {k: v.numpy() for k, v in hf.state_dict().items()}
  else:  # transformers 4 files nest the tower one level deeper
    state_dict = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
                  for k, v in saved.items()}
    state_dict["vision_tower.vision_model.embeddings.position_ids"] = np.arange(5)[None]
  assert llava_lib.detect_llava_layout(state_dict) == layout
  if layout == "hf_llava":  # save_pretrained's directory alone: every size from config.json
    model = llava_lib.from_pretrained(_PATHS["llava"])
    assert model.config == our_config()
  else:
    model = llava_lib.load_llava(abstract(our_config()), state_dict)
  ids, pixels = inputs(seed=1)
  ref_logits, ref_hidden = hf_forward(hf, ids, pixels)
  logits, hidden, _ = model(jnp.asarray(ids), nhwc(pixels))
  assert rel_l2(logits, ref_logits) <= 1e-4 and rel_l2(hidden, ref_hidden) <= 1e-4
  with torch.no_grad():
    ref_features = hf.get_image_features(pixel_values=torch.as_tensor(pixels)).pooler_output
  features = model.image_features(nhwc(pixels))
  assert features.shape == (2, PATCHES, 32)
  assert rel_l2(features, torch.stack(list(ref_features)).numpy()) <= 1e-4
  # Export gives back exactly the keys and values of the layout.
  exported = llava_lib.llava_to_torch(model, layout)
  expected = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
  assert set(exported) == set(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(exported[k], v)


def test_cached_prefill_with_image_then_text_steps(reference):
  hf, saved = reference
  model = llava_lib.load_llava(abstract(our_config()), str(_PATHS["llava"]))  # a path loads too
  ids, pixels = inputs(seed=2, length=9)
  ref_logits, _ = hf_forward(hf, ids, pixels)
  cache = model.lm.init_cache(2, 12)
  logits, _, cache = model(jnp.asarray(ids[:, :7]), nhwc(pixels), cache=cache)
  steps = [logits]
  for t in (7, 8):
    logits, _, cache = model(jnp.asarray(ids[:, t:t + 1]), cache=cache)
    steps.append(logits)
  assert rel_l2(jnp.concatenate(steps, axis=1), ref_logits) <= 1e-4


def test_original_llava_layout_linear_projector_and_separate_clip(reference, tmp_path):
  hf, saved = reference
  rng = np.random.default_rng(3)
  proj_w = rng.normal(size=(32, 24)).astype(np.float32) * 0.2
  proj_b = rng.normal(size=(32,)).astype(np.float32) * 0.1
  # The LEGO release's layout: LLaMA under model.*, a linear mm_projector, old rotary buffers;
  # the CLIP tower comes from separate (hub-layout) CLIP files.
  lm_sd = {}
  for k, v in saved.items():
    if k.startswith("language_model.model."):
      lm_sd["model." + k[len("language_model.model."):]] = v
    elif k == "language_model.lm_head.weight":
      lm_sd["lm_head.weight"] = v
  lm_sd["model.mm_projector.weight"], lm_sd["model.mm_projector.bias"] = proj_w, proj_b
  for layer in range(2):
    lm_sd[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  clip_sd = {"vision_model." + k[len("vision_tower."):]: v
             for k, v in saved.items() if k.startswith("vision_tower.")}
  clip_sd["text_model.embeddings.token_embedding.weight"] = np.zeros((5, 3), np.float32)
  assert llava_lib.detect_llava_layout(lm_sd) == "llava"
  with pytest.raises(KeyMappingError, match="vision_source"):
    llava_lib.load_llava(abstract(our_config("linear")), lm_sd)
  # As directories with their config.json (the original repository's: a LlamaConfig plus mm_*;
  # the CLIP tower's own), nothing else needs saying but the tokenizer's image placeholder id.
  lm_dir, clip_dir = tmp_path / "llava-linear", tmp_path / "clip"
  io.write_safetensors(lm_sd, lm_dir / "model.safetensors")
  io.write_safetensors(clip_sd, clip_dir / "model.safetensors")
  repo_config = dict(TEXT, model_type="llava", mm_projector_type="linear", mm_hidden_size=24,
                     mm_vision_select_layer=-2, mm_vision_tower="openai/clip-vit-large-patch14")
  (lm_dir / "config.json").write_text(json.dumps(repo_config))
  (clip_dir / "config.json").write_text(transformers.CLIPVisionConfig(**VISION).to_json_string())
  model = llava_lib.from_pretrained(lm_dir, clip_dir, image_token_id=IMAGE_TOKEN)
  assert model.config == dataclasses.replace(our_config("linear"), image_token_id=IMAGE_TOKEN)
  with pytest.raises(PretrainedConfigError, match=r"num_kv_heads=4 .*\(num_key_value_heads\)=2"):
    llava_lib.from_pretrained(lm_dir, clip_dir, llama={"num_kv_heads": 4})
  (lm_dir / "config.json").write_text(json.dumps(dict(repo_config, mm_hidden_size=32)))
  with pytest.raises(PretrainedConfigError, match="mm_hidden_size=32 but the vision tower"):
    llava_lib.from_pretrained(lm_dir, clip_dir)
  (lm_dir / "config.json").write_text(json.dumps(dict(repo_config, num_hidden_layers=3)))
  with pytest.raises(PretrainedConfigError, match="says num_layers=3 but the weights"):
    llava_lib.from_pretrained(lm_dir, clip_dir)

  # Reference: transformers' Llava with its projector swapped for the same single Linear.
  linear = torch.nn.Linear(24, 32)
  with torch.no_grad():
    linear.weight.copy_(torch.from_numpy(proj_w))
    linear.bias.copy_(torch.from_numpy(proj_b))
  mlp = hf.model.multi_modal_projector
  hf.model.multi_modal_projector = linear
  try:
    ids, pixels = inputs(seed=4, image_at=3)
    ref_logits, ref_hidden = hf_forward(hf, ids, pixels)
  finally:
    hf.model.multi_modal_projector = mlp
  logits, hidden, _ = model(jnp.asarray(ids), nhwc(pixels))
  assert rel_l2(logits, ref_logits) <= 1e-4 and rel_l2(hidden, ref_hidden) <= 1e-4

  # Round trip through the original layout with the tower inside the file (mm_projector.{0,2}
  # for the MLP projector), and the errors for layouts that cannot hold a linear projector.
  hf_model = llava_lib.load_llava(abstract(our_config()), saved)
  exported = io.read_state_dict(
      llava_lib.save_llava(hf_model, tmp_path / "llava.safetensors", layout="llava"))
  assert "model.mm_projector.2.weight" in exported
  assert "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" in exported
  back = llava_lib.load_llava(abstract(our_config()), exported)
  a, b = flat_params(hf_model), flat_params(back)
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(ValueError, match="linear"):
    llava_lib.llava_to_torch(model, "hf_llava")
  with pytest.raises(KeyMappingError, match="not a LLaVA checkpoint"):
    llava_lib.detect_llava_layout({"encoder.weight": np.zeros(1)})


def test_greedy_generation_matches_transformers_tokens_and_hidden(reference):
  hf, saved = reference
  model = llava_lib.load_llava(abstract(our_config()), saved)
  ids, pixels = inputs(seed=5, length=11)
  lengths = np.array([11, 8])
  ids[1, 8:] = 0                                                 # right padding

  def hf_generate(row, eos):
    with torch.no_grad():
      out = hf.generate(input_ids=torch.as_tensor(ids[row:row + 1, :lengths[row]]),
                        pixel_values=torch.as_tensor(pixels[row:row + 1]), do_sample=False,
                        max_new_tokens=6, eos_token_id=eos, pad_token_id=0,
                        output_hidden_states=True, return_dict_in_generate=True)
    tokens = out.sequences[0, lengths[row]:].numpy()
    # LEGO's H_t: per step, the last layer (after the final norm) at the last position.
    hidden = torch.stack([step[-1][0, -1] for step in out.hidden_states]).numpy()
    return tokens, hidden

  free = hf_generate(0, None)[0]
  eos = int(free[min(2, len(free) - 1)])      # row 0 stops after <= 3 tokens
  config = decode.SamplingConfig(max_new_tokens=6, greedy=True, eos_id=eos, pad_id=0)
  gen, features = decode.generate_llava(model, ids, nhwc(pixels), lengths, config)
  assert features.shape == (2, PATCHES, 32)
  assert int(gen.num_tokens[0]) <= 3
  for row in (0, 1):
    ref_tokens, ref_hidden = hf_generate(row, eos)
    n = len(ref_tokens)
    assert int(gen.num_tokens[row]) == n == len(ref_hidden)
    np.testing.assert_array_equal(np.asarray(gen.tokens[row, :n]), ref_tokens)
    np.testing.assert_array_equal(np.asarray(gen.tokens[row, n:]), 0)
    assert rel_l2(gen.hidden[row, :n], ref_hidden) <= 1e-4
    assert not np.any(np.asarray(gen.hidden[row, n:]))


def test_projector_init_scale_scales_the_random_kernel_only():
  """`projector_init_scale` multiplies lecun_normal's draw (scale 1: lecun_normal itself, the
  default), so H_i of a model trained from scratch can start near the text embeddings' norm."""
  import dataclasses

  base = our_config("linear")
  kernel = lambda m: np.asarray(m.projector.linear_1.kernel[...])
  one = Llava(base, rngs=nnx.Rngs(0))
  small = Llava(dataclasses.replace(base, projector_init_scale=0.02), rngs=nnx.Rngs(0))
  assert LlavaConfig().projector_init_scale == 1.0
  np.testing.assert_allclose(kernel(small), 0.02 * kernel(one), rtol=1e-6)
  # The same random stream: the LLaMA's and the tower's draws do not move.
  np.testing.assert_array_equal(np.asarray(one.lm.embed(jnp.arange(5))),
                                np.asarray(small.lm.embed(jnp.arange(5))))
  assert 0.8 / 24 ** 0.5 < kernel(one).std() < 1.2 / 24 ** 0.5
  px = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
  ratio = (np.linalg.norm(small.image_features(px)) / np.linalg.norm(one.image_features(px)))
  assert abs(ratio - 0.02) < 1e-5  # the projector's bias starts at zero


def test_convert_sizes_a_llava_directory_by_its_config(reference):
  """`lego-jax convert --kind=llava --source=DIR`: the sizes are the directory's, not the tiny
  config's; the config's other settings (projector_init_scale) are kept."""
  from lego_jax import config as config_lib
  from lego_jax.weights import convert

  cfg = config_lib.load("tiny")
  assert cfg.llama.hidden_size != TEXT["hidden_size"]
  model = convert.convert(cfg, "llava", str(_PATHS["llava"]))["llava"]
  want = our_config()
  assert model.config == dataclasses.replace(
      want, projector_init_scale=cfg.llava.projector_init_scale, vision=dataclasses.replace(
          want.vision, position_init_std=cfg.clip_vision.position_init_std))
  want = flat_params(llava_lib.load_llava(abstract(our_config()), reference[1]))
  assert all(np.array_equal(v, want[k]) for k, v in flat_params(model).items())
