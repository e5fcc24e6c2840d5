"""Weight files whose tensors are not what the model's parameters can hold are refused by key:
integer / bool tensors (a cast would invent weights), values a narrower parameter dtype cannot
hold; a malformed sharded-checkpoint index is one line naming the file."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lego_jax.models.clip_text import CLIPText, CLIPTextConfig, load_clip_text, text_rules
from lego_jax.weights import io
from lego_jax.weights.mapping import KeyMappingError, jax_to_torch
from lego_jax.weights.state import param_shapes

SMALL = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
             max_position=8)
EMB = "text_model.embeddings.token_embedding.weight"
FC1 = "text_model.encoder.layers.0.mlp.fc1.weight"


def _model(param_dtype=jnp.float32):
  """Abstract (no init spent): the loader fills it."""
  cfg = CLIPTextConfig(**SMALL, param_dtype=param_dtype)
  return nnx.eval_shape(lambda: CLIPText(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def weights():
  rng = np.random.default_rng(0)
  arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in param_shapes(_model()).items()}
  return jax_to_torch(arrays, text_rules("clip"))


def test_integer_and_bool_tensors_are_refused_by_key(weights, tmp_path):
  sd = dict(weights)
  sd[EMB] = np.rint(sd[EMB] * 100).astype(np.int32)
  sd[FC1] = sd[FC1] > 0
  path = io.write_safetensors(sd, tmp_path / "m.safetensors")
  with pytest.raises(KeyMappingError) as e:
    load_clip_text(_model(), path)
  msg = str(e.value)
  assert "integer / bool / complex tensors for floating-point parameters" in msg
  assert f"{EMB} (int32)" in msg and f"{FC1} (bool)" in msg
  assert "m.safetensors" in msg
  # The intact file loads.
  load_clip_text(_model(), io.write_safetensors(weights, tmp_path / "ok.safetensors"))


def test_float_widths_lossless_or_the_models_choice_and_never_overflow(weights):
  half = {k: v.astype(np.float16) for k, v in weights.items()}
  model = load_clip_text(_model(jnp.float32), half)   # widening: exact
  got = np.asarray(model.token_embedding.embedding.get_value())
  np.testing.assert_array_equal(got, half[EMB].astype(np.float32))
  assert got.dtype == np.float32
  load_clip_text(_model(jnp.bfloat16), weights)        # narrowing the config chose: in range
  big = dict(weights)
  big[FC1] = big[FC1].copy()
  big[FC1][0, 0] = 1e6                                 # float16's largest is 65504
  with pytest.raises(KeyMappingError, match=r"float32 values beyond the range of the model's "
                     r"float16 \(largest \|x\| 1e\+06\)"):
    load_clip_text(_model(jnp.float16), big)


@pytest.mark.parametrize("text", ['{"weight_map": ', '{"metadata": {}}', '{"weight_map": [1]}',
                                  '{"weight_map": {"a": 3}}'])
def test_malformed_index_is_named(tmp_path, text):
  (tmp_path / "model.safetensors.index.json").write_text(text)
  with pytest.raises(io.WeightFileError, match="model.safetensors.index.json: not a weight index"):
    io.read_state_dict(tmp_path)
