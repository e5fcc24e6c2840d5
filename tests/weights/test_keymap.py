"""The key-map helpers every SD-layout loader shares (lego_jax/weights/keymap.py): tables joined
into rules per layout, the model's prefix found from anchor keys (ambiguity is an error), and
load / export through a prefix, round trip exact."""

import numpy as np
import pytest
from flax import nnx

from lego_jax.models.layers import conv2d, group_norm
from lego_jax.weights import keymap
from lego_jax.weights.mapping import Kind, KeyMappingError


def test_block_rules_join_prefixes_and_pick_each_layouts_kind():
  table = (keymap.param_rows("proj", {"diffusers": "to_q", "compvis": "q"},
                             {"diffusers": Kind.LINEAR, "compvis": Kind.CONV1X1_LINEAR})
           + keymap.norm_rows("norm", keymap.same("norm")))
  blocks = [("mid.attention", {"diffusers": "mid_block.attentions.0", "compvis": "mid.attn_1"},
             table, None)]
  got = {layout: [(r.torch, r.jax, r.kind) for r in keymap.block_rules(blocks, layout)]
         for layout in keymap.LAYOUTS}
  assert got["diffusers"] == [
      ("mid_block.attentions.0.to_q.weight", "mid.attention.proj.kernel", Kind.LINEAR),
      ("mid_block.attentions.0.to_q.bias", "mid.attention.proj.bias", Kind.IDENTITY),
      ("mid_block.attentions.0.norm.weight", "mid.attention.norm.scale", Kind.IDENTITY),
      ("mid_block.attentions.0.norm.bias", "mid.attention.norm.bias", Kind.IDENTITY)]
  assert got["compvis"][0] == ("mid.attn_1.q.weight", "mid.attention.proj.kernel",
                               Kind.CONV1X1_LINEAR)
  # An empty suffix (a block that is one layer) leaves no stray dots.
  conv = keymap.block_rules([("conv_in", keymap.same("conv_in"), keymap.CONV_TABLE, None)],
                            "compvis")
  assert [(r.torch, r.jax) for r in conv] == [("conv_in.weight", "conv_in.kernel"),
                                              ("conv_in.bias", "conv_in.bias")]
  with pytest.raises(ValueError, match="unknown layout 'ldm'"):
    keymap.block_rules(blocks, "ldm")


def test_find_prefix_reads_the_layout_and_refuses_to_guess():
  anchors = {"diffusers": "encoder.down_blocks.0.w", "compvis": "encoder.down.0.w"}
  sd = {"first_stage_model.encoder.down.0.w": 0, "model.x": 0}
  assert keymap.find_prefix(sd, anchors, None, "autoencoder") == ("compvis", "first_stage_model.")
  two = {"a.encoder.down.0.w": 0, "b.encoder.down.0.w": 0}
  with pytest.raises(KeyMappingError, match=r"compvis at 'a\.', compvis at 'b\.'"):
    keymap.find_prefix(two, anchors, None, "autoencoder")
  assert keymap.find_prefix(two, anchors, "b.", "autoencoder") == ("compvis", "b.")
  with pytest.raises(KeyMappingError, match="candidates: none"):
    keymap.find_prefix({"unet.w": 0}, anchors, None, "autoencoder")


class Tiny(nnx.Module):
  def __init__(self):
    kw = dict(dtype=np.float32, param_dtype=np.float32, rngs=nnx.Rngs(0))
    self.conv = conv2d(2, 4, 3, **kw)
    self.norm = group_norm(4, 2, 1e-6, **kw)


TINY_BLOCKS = [("conv", {"diffusers": "conv", "compvis": "c"}, keymap.CONV_TABLE, None),
               ("norm", {"diffusers": "norm", "compvis": "n"}, keymap.NORM_TABLE, None)]


def test_load_and_export_through_a_prefix_round_trip():
  model = Tiny()
  rules = keymap.block_rules(TINY_BLOCKS, "compvis")
  exported = keymap.export_mapped(model, rules, "first_stage_model.")
  assert sorted(exported) == ["first_stage_model.c.bias", "first_stage_model.c.weight",
                              "first_stage_model.n.bias", "first_stage_model.n.weight"]
  assert exported["first_stage_model.c.weight"].shape == (4, 2, 3, 3)  # PyTorch's (O, I, kh, kw)
  # Keys outside the prefix belong to other models; the ignore list covers buffers.
  sd = {**exported, "model.other.weight": np.zeros(3, np.float32),
        "first_stage_model.loss.w": np.zeros(1, np.float32)}
  loaded = keymap.load_mapped(model, sd, rules, "first_stage_model.", (r"^loss\.",), "test")
  assert sorted(loaded) == ["conv.bias", "conv.kernel", "norm.bias", "norm.scale"]
  np.testing.assert_array_equal(loaded["conv.kernel"], np.asarray(model.conv.kernel.get_value()))
  with pytest.raises(KeyMappingError, match="unexpected keys \\(1\\): loss.w"):
    keymap.load_mapped(model, sd, rules, "first_stage_model.", (), "test")
