"""Parity of the NNX CLIP text encoder with transformers' CLIPTextModel, for every layout."""

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
from jax.sharding import NamedSharding, PartitionSpec as P

from lego_jax import config as config_lib
from lego_jax.models import clip_text as clip_text_lib
from lego_jax.models.clip_text import (CLIPText, CLIPTextConfig, clip_text_to_torch,
                                       detect_text_layout, load_clip_text, tokenize)
from lego_jax.parallel.sharding import make_mesh, state_shardings, use_mesh
from lego_jax.weights.io import read_state_dict, write_safetensors
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.pretrained import PretrainedConfigError
from lego_jax.weights.state import abstract_param_shapes
from helpers import rel_l2

# An odd head count with a short window; SD's full 77-token window at a small width.
CONFIGS = {
    "3heads_16pos": dict(vocab_size=99, hidden_size=48, intermediate_size=80, num_layers=3,
                         num_heads=3, max_position=16),
    "4heads_77pos": dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, max_position=77),
}


def _hf_config(c: dict) -> transformers.CLIPTextConfig:
  return transformers.CLIPTextConfig(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
      intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
      num_attention_heads=c["num_heads"], max_position_embeddings=c["max_position"],
      hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=12,
      bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  # Random LayerNorm scales/biases and biases: the parity test then sees every parameter.
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


def _ids(c: dict, batch: int, length: int, seed: int) -> np.ndarray:
  ids = np.random.default_rng(seed).integers(2, c["vocab_size"], size=(batch, length))
  ids[:, 0] = 0                     # BOS
  ids[0, length // 2:] = 1          # EOS then EOS-padding, as SD's prompts
  return ids.astype(np.int32)


def _ref(hf, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()


def _ours(c: dict, **kw) -> CLIPText:
  # abstract: the loader fills every parameter, random init would only cost time
  return nnx.eval_shape(lambda: CLIPText(CLIPTextConfig(**c, **kw), rngs=nnx.Rngs(1)))


_forward = nnx.jit(CLIPText.__call__)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_text_model_parity_and_export(name, tmp_path):
  """transformers-5 CLIPTextModel file (no prefix) -> last_hidden_state, full and short inputs."""
  c = CONFIGS[name]
  hf = _randomize(transformers.CLIPTextModel(_hf_config(c)), seed=1)
  hf.save_pretrained(tmp_path)
  sd = read_state_dict(tmp_path)
  assert detect_text_layout(sd) == "clip_tower"
  model = clip_text_lib.from_pretrained(tmp_path)  # every size from config.json
  assert model.cfg == CLIPTextConfig(**c)
  for length in (c["max_position"], 11):
    ids = _ids(c, 2, length, seed=length)
    out = _forward(model, jnp.asarray(ids))
    assert out.shape == (2, length, c["hidden_size"])
    assert rel_l2(out, _ref(hf, ids)) <= 1e-4
  back = clip_text_to_torch(model, "clip_tower")
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_attention_is_causal():
  """Changing a later token leaves every earlier position's state unchanged."""
  c = CONFIGS["3heads_16pos"]
  hf = _randomize(transformers.CLIPTextModel(_hf_config(c)), seed=10)
  model = load_clip_text(_ours(c), {k: v.numpy() for k, v in hf.state_dict().items()})
  ids = _ids(c, 1, 16, seed=3)
  other = ids.copy()
  other[0, 9] = (other[0, 9] + 1) % c["vocab_size"]
  a = np.asarray(_forward(model, jnp.asarray(ids)))
  b = np.asarray(_forward(model, jnp.asarray(other)))
  np.testing.assert_allclose(a[0, :9], b[0, :9], rtol=0, atol=1e-6)
  assert np.abs(a[0, 9:] - b[0, 9:]).max() > 1e-3


def test_remat_and_sharded_execution_give_the_same_states():
  """remat recomputes (same values, checkpointed program); a (2, 2, 2) mesh shards the weights."""
  c = CONFIGS["4heads_77pos"]
  sd = {k: v.numpy() for k, v in
        _randomize(transformers.CLIPTextModel(_hf_config(c)), seed=11).state_dict().items()}
  ids = jnp.asarray(_ids(c, 4, 77, seed=12))
  plain = load_clip_text(_ours(c), sd)
  want = np.asarray(_forward(plain, ids))

  remat = load_clip_text(_ours(c, remat=True), sd)
  graphdef, state = nnx.split(remat)
  jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids).sum())(state))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  np.testing.assert_allclose(np.asarray(_forward(remat, ids)), want, rtol=0, atol=1e-5)

  mesh = make_mesh((2, 2, 2))
  params = nnx.state(plain, nnx.Param)
  shardings = state_shardings(mesh, params)
  kernel = shardings["encoder"]["layers"]["fc1"]["kernel"]
  assert kernel.spec == P(None, "fsdp", "tensor")     # (layers, embed, mlp)
  with use_mesh(mesh):
    nnx.update(plain, jax.device_put(params, shardings))
    got = _forward(plain, jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp")))))
  assert len(plain.encoder.layers.fc1.kernel[...].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_bf16_compute_against_fp32_reference(tmp_path):
  c = CONFIGS["4heads_77pos"]
  hf = _randomize(transformers.CLIPTextModel(_hf_config(c)), seed=2)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  model = load_clip_text(_ours(c, dtype=jnp.bfloat16), sd)
  assert model.token_embedding.embedding[...].dtype == jnp.float32
  ids = _ids(c, 2, 77, seed=4)
  out = _forward(model, jnp.asarray(ids))
  assert out.dtype == jnp.bfloat16
  err = rel_l2(out.astype(jnp.float32), _ref(hf, ids))
  assert 1e-4 < err <= 3e-2, err


def test_clip_model_and_with_projection_files(tmp_path):
  """Hub layout (text_model.*) beside a vision tower / text_projection / logit_scale."""
  c = CONFIGS["3heads_16pos"]
  vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=14, patch_size=7)
  clip = _randomize(transformers.CLIPModel(transformers.CLIPConfig(
      text_config=_hf_config(c).to_dict(), vision_config=vision.to_dict(), projection_dim=12)),
      seed=5)
  clip.save_pretrained(tmp_path / "clip")
  sd = read_state_dict(tmp_path / "clip")
  sd["text_model.embeddings.position_ids"] = np.arange(16)[None]   # transformers-4 buffer
  assert detect_text_layout(sd) == "clip"
  model = load_clip_text(_ours(c), sd)
  ids = _ids(c, 2, 16, seed=6)
  assert rel_l2(_forward(model, jnp.asarray(ids)), _ref(clip.text_model, ids)) <= 1e-4
  back = clip_text_to_torch(model, "clip")
  assert set(back) == {k for k in sd if k.startswith("text_model.") and "position_ids" not in k}
  for k in back:
    np.testing.assert_array_equal(back[k], sd[k])

  proj = _randomize(transformers.CLIPTextModelWithProjection(_hf_config(c)), seed=7)
  proj.save_pretrained(tmp_path / "proj")
  sd = read_state_dict(tmp_path / "proj")
  assert "text_projection.weight" in sd and detect_text_layout(sd) == "clip"
  model = load_clip_text(_ours(c), tmp_path / "proj")
  # The directories alone: a CLIPModel's text_config section, a CLIPTextModelWithProjection.
  assert clip_text_lib.from_pretrained(tmp_path / "proj").cfg == model.cfg
  assert clip_text_lib.from_pretrained(tmp_path / "clip").cfg == model.cfg
  with pytest.raises(PretrainedConfigError, match=r"hidden_size=24 .*says hidden_size="):
    clip_text_lib.from_pretrained(tmp_path / "clip", hidden_size=24)
  config = json.loads((tmp_path / "proj" / "config.json").read_text())
  (tmp_path / "proj" / "config.json").write_text(json.dumps({**config, "vocab_size": 101}))
  with pytest.raises(PretrainedConfigError, match="says vocab_size=101 but the weights"):
    clip_text_lib.from_pretrained(tmp_path / "proj")
  with torch.no_grad():
    ref = proj(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  assert rel_l2(_forward(model, jnp.asarray(ids)), ref) <= 1e-4


def test_compvis_checkpoint_layout(tmp_path):
  """SD / LEGO single files: cond_stage_model.transformer.text_model.* among UNet, VAE, EMA."""
  c = CONFIGS["4heads_77pos"]
  hf = _randomize(transformers.CLIPTextModel(_hf_config(c)), seed=8)
  hf.save_pretrained(tmp_path / "hf")
  tower = read_state_dict(tmp_path / "hf")
  prefix = "cond_stage_model.transformer.text_model."
  ckpt = {prefix + k: v for k, v in tower.items()}
  ckpt[prefix + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  for junk in ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.quant_conv.bias",
               "model_ema.diffusion_modelinput_blocks00weight", "model_ema.decay",
               "projection_img.weight", "self_attn_mix.layers.0.linear1.weight"]:
    ckpt[junk] = np.zeros((2,), np.float32)
  write_safetensors(ckpt, tmp_path / "sd.safetensors")
  ckpt = read_state_dict(tmp_path / "sd.safetensors")
  assert detect_text_layout(ckpt) == "compvis"
  model = load_clip_text(_ours(c), tmp_path / "sd.safetensors")
  ids = _ids(c, 2, 77, seed=9)
  assert rel_l2(_forward(model, jnp.asarray(ids)), _ref(hf, ids)) <= 1e-4
  back = clip_text_to_torch(model, "compvis")
  expected = {prefix + k: v for k, v in tower.items()}
  assert set(back) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(back[k], expected[k])
  # an explicit layout overrides detection: the same file read as a hub file is an error
  with pytest.raises(KeyMappingError, match="missing parameters"):
    load_clip_text(_ours(c), ckpt, layout="clip")


def test_bad_checkpoints_name_the_culprits():
  c = CONFIGS["3heads_16pos"]
  good = {f"text_model.{k}": v.numpy()
          for k, v in transformers.CLIPTextModel(_hf_config(c)).state_dict().items()}

  sd = dict(good)
  del sd["text_model.encoder.layers.2.self_attn.v_proj.weight"]
  with pytest.raises(KeyMappingError, match=re.escape("encoder.layers.attn.value.kernel")):
    load_clip_text(_ours(c), sd)

  sd = dict(good)
  sd["text_model.encoder.layers.0.self_attn.extra_bias"] = np.zeros(3, np.float32)
  with pytest.raises(KeyMappingError, match=re.escape("layers.0.self_attn.extra_bias")):
    load_clip_text(_ours(c), sd)

  sd = dict(good)
  sd["text_model.embeddings.token_embedding.weight"] = np.zeros((98, 48), np.float32)
  with pytest.raises(KeyMappingError, match=r"token_embedding\.embedding \(98, 48\)"):
    load_clip_text(_ours(c), sd)

  with pytest.raises(KeyMappingError, match="no CLIP text encoder"):
    load_clip_text(_ours(c), {"vision_model.embeddings.patch_embedding.weight": np.zeros(1)})
  with pytest.raises(ValueError, match="unknown CLIP text layout"):
    load_clip_text(_ours(c), good, layout="openclip")


def test_full_size_parameter_count():
  assert CLIPTextConfig(**config_lib.load("lego_ego4d").clip_text) == CLIPTextConfig()
  CLIPTextConfig(**config_lib.load("tiny").clip_text)   # the tiny default's fields exist too
  shapes = abstract_param_shapes(lambda: CLIPText(CLIPTextConfig(), rngs=nnx.Rngs(0)))
  assert sum(int(np.prod(s)) for s in shapes.values()) == 123_060_480   # CLIPTextModel ViT-L/14
  assert shapes["token_embedding.embedding"] == (49408, 768)
  assert shapes["encoder.layers.attn.query.kernel"] == (12, 768, 768)


# ------------------------------------------------------------------------------------------------
# tokenize


def _bytes_to_unicode() -> list[str]:
  # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest past 255.
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  out, n = [], 0
  for b in range(256):
    if b in keep:
      out.append(chr(b))
    else:
      out.append(chr(256 + n))
      n += 1
  return out


def _tiny_clip_tokenizer_dir(tmp_path):
  chars = _bytes_to_unicode()
  vocab = {}
  for tok in chars + [ch + "</w>" for ch in chars]:
    vocab[tok] = len(vocab)
  merges = ["p h", "o t", "ph ot", "phot o</w>"]
  for m in merges:
    vocab[m.replace(" ", "")] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  # the files of openai's tokenizer folder, in their format
  path = tmp_path / "clip_tok"
  path.mkdir()
  (path / "vocab.json").write_text(json.dumps(vocab))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  (path / "tokenizer_config.json").write_text(
      json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))
  return path, vocab


def test_tokenize_with_a_local_clip_tokenizer(tmp_path):
  path, vocab = _tiny_clip_tokenizer_dir(tmp_path)
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  for tok in (transformers.CLIPTokenizer.from_pretrained(path),
              transformers.AutoTokenizer.from_pretrained(path)):
    texts = ["A photo", "photo " * 100]
    ids = tokenize(tok, texts)
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    # lower-cased, "photo" one merged token, EOS, then EOS-padding (openai's pad token)
    np.testing.assert_array_equal(ids[0, :4], [bos, vocab["a</w>"], vocab["photo</w>"], eos])
    assert (ids[0, 4:] == eos).all()
    assert ids[1, 0] == bos and ids[1, 76] == eos and (ids[1, 1:76] == vocab["photo</w>"]).all()
    # Stable Diffusion's own call (FrozenCLIPEmbedder) gives the same ids
    ref = tok(texts, truncation=True, max_length=77, padding="max_length", return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
  assert tokenize(tok, "a photo", max_length=8).shape == (1, 8)


def _bare_tokenizer(with_padding: bool):
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "cut", "the", "carrot", "onion"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)])
  if with_padding:
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
  return tok


def test_tokenize_with_bare_and_fast_tokenizers(tmp_path):
  texts = ["cut the carrot", "cut the onion " * 5]
  want = np.array([[1, 4, 5, 6, 2, 0, 0, 0], [1, 4, 5, 7, 4, 5, 7, 2]], np.int32)
  bare = _bare_tokenizer(with_padding=True)
  np.testing.assert_array_equal(tokenize(bare, texts, max_length=8), want)
  # the caller's tokenizer keeps its own settings
  assert bare.truncation is None and bare.padding["pad_id"] == 0

  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_bare_tokenizer(False),
                                              pad_token="[PAD]", bos_token="[BOS]",
                                              eos_token="[EOS]", unk_token="[UNK]")
  fast.save_pretrained(tmp_path / "fast")
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "fast")
  np.testing.assert_array_equal(tokenize(fast, texts, max_length=8), want)

  # no pad token anywhere: the caller has to say
  with pytest.raises(ValueError, match="pad_id"):
    tokenize(_bare_tokenizer(with_padding=False), texts, max_length=8)
  ids = tokenize(_bare_tokenizer(with_padding=False), texts, max_length=8, pad_id=2)
  np.testing.assert_array_equal(ids[0, 5:], [2, 2, 2])
