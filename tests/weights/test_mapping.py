import numpy as np
import pytest
import torch

from lego_jax.weights import io, mapping
from lego_jax.weights.mapping import Kind, Rule

RULES = [
    Rule("model.layers.{l}.proj.weight", "layers.proj.kernel", Kind.LINEAR, stack="l"),
    Rule("model.layers.{l}.proj.bias", "layers.proj.bias", stack="l"),
    Rule("blocks.{b}.conv.weight", "blocks.{b}.conv.kernel", Kind.CONV2D),
    Rule("attn.q.weight", "attn.q.kernel", Kind.CONV1X1_LINEAR),
]


def _sd(rng):
  return {
      "model.layers.0.proj.weight": rng.normal(size=(5, 3)).astype(np.float32),
      "model.layers.1.proj.weight": rng.normal(size=(5, 3)).astype(np.float32),
      "model.layers.0.proj.bias": rng.normal(size=(5,)).astype(np.float32),
      "model.layers.1.proj.bias": rng.normal(size=(5,)).astype(np.float32),
      "blocks.0.conv.weight": rng.normal(size=(6, 2, 3, 3)).astype(np.float32),
      "blocks.7.conv.weight": rng.normal(size=(6, 2, 1, 1)).astype(np.float32),
      "attn.q.weight": rng.normal(size=(4, 2, 1, 1)).astype(np.float32),
  }


SHAPES = {"layers.proj.kernel": (2, 3, 5), "layers.proj.bias": (2, 5),
          "blocks.0.conv.kernel": (3, 3, 2, 6), "blocks.7.conv.kernel": (1, 1, 2, 6),
          "attn.q.kernel": (2, 4)}


def test_round_trip_and_layouts():
  sd = _sd(np.random.default_rng(0))
  out = mapping.torch_to_jax(sd, RULES, SHAPES)
  np.testing.assert_array_equal(out["layers.proj.kernel"][1], sd["model.layers.1.proj.weight"].T)
  # torch conv (O,I,kh,kw) and flax conv (kh,kw,I,O) compute the same thing
  x = np.random.default_rng(1).normal(size=(1, 2, 5, 5)).astype(np.float32)
  ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(sd["blocks.0.conv.weight"]))
  import jax
  got = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), out["blocks.0.conv.kernel"], (1, 1),
                                     "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref.numpy(), rtol=1e-5, atol=1e-5)
  back = mapping.jax_to_torch(out, RULES)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_errors_list_every_culprit():
  sd = _sd(np.random.default_rng(0))
  sd["extra.weight"] = np.zeros(1, np.float32)
  sd["position_ids"] = np.zeros(1, np.float32)
  del sd["attn.q.weight"]
  sd["blocks.0.conv.weight"] = np.zeros((6, 2, 5, 5), np.float32)
  with pytest.raises(mapping.KeyMappingError) as e:
    mapping.torch_to_jax(sd, RULES, SHAPES, ignore=[r"^position_ids$"])
  msg = str(e.value)
  assert "extra.weight" in msg and "attn.q.kernel" in msg and "blocks.0.conv.kernel" in msg
  assert "position_ids" not in msg


def test_missing_layer_of_a_stack_is_reported():
  sd = _sd(np.random.default_rng(0))
  del sd["model.layers.1.proj.bias"]
  with pytest.raises(mapping.KeyMappingError, match="layers.proj.bias"):
    mapping.torch_to_jax(sd, RULES, SHAPES)


def test_io_reads_safetensors_dirs_and_refuses_unsafe_pickles(tmp_path):
  sd = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
  io.write_safetensors(sd, tmp_path / "m.safetensors")
  np.testing.assert_array_equal(io.read_state_dict(tmp_path)["a"], sd["a"])
  torch.save({"state_dict": {"b": torch.ones(2, dtype=torch.bfloat16)}}, tmp_path / "x.ckpt")
  got = io.read_state_dict(tmp_path / "x.ckpt")
  assert got["b"].dtype.name == "bfloat16" and float(got["b"].astype(np.float32).sum()) == 2.0

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  torch.save({"x": Evil()}, tmp_path / "evil.pth")
  with pytest.raises(io.UnsafeCheckpointError, match="evil.pth"):
    io.read_state_dict(tmp_path / "evil.pth")
  with pytest.raises(io.WeightFileError, match="not found"):
    io.read_state_dict(tmp_path / "nope.safetensors")
