"""Parity of the NNX SD UNet with diffusers' UNet2DConditionModel, for both checkpoint layouts."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from flax import nnx
from jax.sharding import PartitionSpec as P

from lego_jax.models import unet as unet_lib
from lego_jax.models.unet import (
    Level, UNet, UNetConfig, load_unet, timestep_embedding, unet_rules, unet_to_torch, widen_input)
from lego_jax.parallel.sharding import make_mesh, state_shardings
from lego_jax.weights.io import read_state_dict, write_safetensors
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.pretrained import PretrainedConfigError
from lego_jax.weights.state import flat_params, load_params, param_shapes
from helpers import rel_l2, rel_max

# (config, use_linear_projection of the reference, latent height x width)
CASES = {
    # SD-like: no attention at the deepest level, 2 resnets per level, context width != width
    "sd_like": (UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False),
                           layers_per_block=2, num_heads=4, context_dim=24, norm_groups=8),
                False, (8, 12)),
    # three levels, attention only deeper, 1 resnet per level, 16 groups; 7x10 latents make the
    # up path take its skips' (odd) sizes
    "3lvl_odd": (UNetConfig(block_out_channels=(32, 48, 64), attention_levels=(False, True, True),
                            layers_per_block=1, num_heads=2, context_dim=40, norm_groups=16),
                 False, (7, 10)),
    # per-level head counts (3 at the first level, odd; 4 at the second and in the mid block),
    # two stacked transformer blocks, SD-2-style linear projections
    "heads_3_4_depth2": (UNetConfig(block_out_channels=(24, 48), attention_levels=(True, True),
                                 layers_per_block=1, num_heads=(3, 4), transformer_depth=2,
                                 context_dim=16, norm_groups=8),
                      True, (8, 8)),
}
SEQ = 5

_apply = jax.jit(lambda m, x, t, c: m(x, t, c))


_ABSTRACT: dict[UNetConfig, UNet] = {}


def _abstract(cfg: UNetConfig) -> UNet:
  """A UNet without random init (eager init compiles one RNG program per shape); tests fill it.

  Tracing the init takes seconds, so each config is traced once and cloned.
  """
  if cfg not in _ABSTRACT:
    _ABSTRACT[cfg] = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  return nnx.clone(_ABSTRACT[cfg])


def _reference(cfg: UNetConfig, linear_projection: bool, seed: int) -> UNet2DConditionModel:
  torch.manual_seed(seed)
  ref = UNet2DConditionModel(
      sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D"
                             for a in cfg.attention_levels),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                           for a in reversed(cfg.attention_levels)),
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads,  # = heads (SD quirk)
      transformer_layers_per_block=cfg.transformer_depth, norm_num_groups=cfg.norm_groups,
      use_linear_projection=linear_projection).eval()
  with torch.no_grad():  # non-trivial norms, so a swapped scale/bias could not pass
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
  return ref


def _inputs(cfg: UNetConfig, hw, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, *hw, cfg.in_channels)).astype(np.float32)
  t = np.array([3.0, 917.0], np.float32)
  ctx = rng.normal(size=(2, SEQ, cfg.context_dim)).astype(np.float32)
  return x, t, ctx


def _run_reference(ref, x, t, ctx) -> np.ndarray:
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
              torch.from_numpy(ctx)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def diffusers_to_compvis(sd: dict, layers_per_block: int) -> dict:
  """CompVis (ldm UNetModel) names of a diffusers UNet2DConditionModel state dict.

  Written from the two codebases' module layouts, independently of lego_jax's rules; the test
  checks it against diffusers' own single-file converter.
  """
  per = layers_per_block + 1
  up_attends = {int(m[1]) for k in sd
                for m in [re.match(r"up_blocks\.(\d+)\.attentions\.", k)] if m}
  resnet_names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
  fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

  def rename(key: str) -> str:
    module, param = key.rsplit(".", 1)
    if module in fixed:
      return f"{fixed[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
      return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
      blk = int(m[1])
      return f"output_blocks.{blk * per + per - 1}.{2 if blk in up_attends else 1}.conv.{param}"
    m = re.fullmatch(r"(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.(resnets|attentions)\.(\d+)"
                     r"\.(.+)", module)
    part, blk, kind, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    if kind == "resnets":
      rest = resnet_names[rest]
    if part == "down_blocks":
      where = f"input_blocks.{1 + blk * per + j}.{0 if kind == 'resnets' else 1}"
    elif part == "up_blocks":
      where = f"output_blocks.{blk * per + j}.{0 if kind == 'resnets' else 1}"
    else:
      where = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
    return f"{where}.{rest}.{param}"

  return {rename(k): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Each case's reference model saved with save_pretrained, its inputs and its output."""
  out = {}
  for i, (name, (cfg, linear, hw)) in enumerate(CASES.items()):
    ref = _reference(cfg, linear, seed=i)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    x, t, ctx = _inputs(cfg, hw, seed=i)
    out[name] = (cfg, ref, path, (x, t, ctx), _run_reference(ref, x, t, ctx))
  return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_diffusers_parity(saved, name):
  cfg, _, path, inputs, want = saved[name]
  model = load_unet(_abstract(cfg), read_state_dict(path))  # layout and prefix found
  got = _apply(model, *inputs)
  assert got.shape == want.shape
  assert rel_max(got, want) <= 1e-4, rel_max(got, want)


def test_compvis_single_file_and_ema_parity(saved, tmp_path):
  cfg, ref, _, inputs, want = saved["sd_like"]
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  compvis = {f"model.diffusion_model.{k}": v
             for k, v in diffusers_to_compvis(sd, cfg.layers_per_block).items()}
  # The renaming must be exactly what diffusers' converter undoes.
  back = convert_ldm_unet_checkpoint(compvis, dict(ref.config))
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  # An SD single file: the UNet beside the autoencoder, text encoder and schedule buffers.
  single = dict(compvis)
  single["first_stage_model.encoder.conv_in.weight"] = np.zeros((4, 3, 3, 3), np.float32)
  single["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(8, np.float32)
  single["alphas_cumprod"] = np.ones(10, np.float32)
  write_safetensors(single, tmp_path / "sd.safetensors")
  model = load_unet(_abstract(cfg), tmp_path / "sd.safetensors")
  assert rel_max(_apply(model, *inputs), want) <= 1e-4
  # Export back to CompVis reproduces the file's UNet keys and values.
  exported = unet_to_torch(model, "compvis")
  assert set(exported) == set(compvis)
  for k in compvis:
    np.testing.assert_array_equal(exported[k], compvis[k])
  # LitEma's copy (model_ema.<key without dots>) next to deliberately different live weights.
  ema = {"model_ema." + "".join(k.split(".")[1:]): v for k, v in compvis.items()}
  live = {k: np.zeros_like(v) for k, v in compvis.items()}
  both = live | ema | {"model_ema.num_updates": np.array(7), "model_ema.decay": np.array(0.9999)}
  model = load_unet(_abstract(cfg), both, ema=True)
  assert rel_max(_apply(model, *inputs), want) <= 1e-4


def test_export_round_trip_into_diffusers(saved):
  cfg, ref, path, inputs, want = saved["heads_3_4_depth2"]
  model = load_unet(_abstract(cfg), path)
  exported = unet_to_torch(model, "diffusers", linear_projection=True)
  sd = ref.state_dict()
  assert set(exported) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v.numpy())
  fresh = _reference(cfg, True, seed=123)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()},
                        strict=True)
  np.testing.assert_array_equal(_run_reference(fresh, *inputs), want)


def test_bf16_compute_close_to_fp32(saved):
  cfg, _, path, inputs, want = saved["heads_3_4_depth2"]
  model = load_unet(_abstract(dataclasses.replace(cfg, dtype=jnp.bfloat16)), path)
  assert model.conv_in.kernel.get_value().dtype == jnp.float32  # params stay fp32
  got = _apply(model, *inputs)
  assert got.dtype == jnp.float32
  assert 1e-4 < rel_l2(got, want) <= 3e-2  # really computed in bf16, and still close


def test_widen_4_to_8_channels(saved, tmp_path):
  cfg8, _, _, (x8, t, ctx), _ = saved["sd_like"]
  cfg4 = dataclasses.replace(cfg8, in_channels=4)
  ref4 = _reference(cfg4, False, seed=7)
  ref4.save_pretrained(tmp_path)
  want = _run_reference(ref4, x8[..., :4], t, ctx)
  # SD-1.5 -> LEGO at load time: 4-channel file into the 8-channel model, new inputs zeroed.
  model = load_unet(_abstract(cfg8), tmp_path, widen_input_channels=True)
  kernel = np.asarray(model.conv_in.kernel.get_value())
  assert kernel.shape[2] == 8 and not kernel[:, :, 4:].any() and kernel[:, :, :4].any()
  assert rel_max(_apply(model, x8, t, ctx), want) <= 1e-4  # channels 4..7 hold noise: no effect
  # Without the flag the narrower file is a shape error, not a silent widening.
  with pytest.raises(KeyMappingError, match="conv_in.kernel"):
    load_unet(_abstract(cfg8), tmp_path)
  # The same through widen_input on a loaded 4-channel model (in place) and on a params dict.
  model4 = load_unet(_abstract(cfg4), tmp_path)
  params4 = flat_params(model4)
  widened = widen_input(model4, 8)
  assert widened.config.in_channels == 8
  np.testing.assert_array_equal(flat_params(widened)["conv_in.kernel"], kernel)
  from_dict = load_params(_abstract(cfg8), widen_input(params4, 8))
  np.testing.assert_array_equal(flat_params(from_dict)["conv_in.kernel"], kernel)


def _count_checkpoints(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in ("checkpoint", "remat", "remat2")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_checkpoints(sub)
  return n


def test_remat_wraps_every_block(saved):
  cfg, _, path, (x, t, ctx), _ = saved["heads_3_4_depth2"]
  n, per, attn = len(cfg.block_out_channels), cfg.layers_per_block, sum(cfg.attention_levels)
  resnets = n * per + 2 + n * (per + 1)
  transformers = attn * per + 1 + attn * (per + 1)  # one checkpoint in each scan body
  for remat, want in ((False, 0), (True, resnets + transformers)):
    model = load_unet(_abstract(dataclasses.replace(cfg, remat=remat)), path)
    jaxpr = jax.make_jaxpr(lambda m: m(x, t, ctx))(model)
    assert _count_checkpoints(jaxpr.jaxpr) == want


def test_remat_keeps_values_and_gradients():
  """Gradients through remat'ed ResNet + scanned transformer blocks reach every parameter."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 4, 4, 8)).astype(np.float32)
  temb = rng.normal(size=(1, 32)).astype(np.float32)
  ctx = rng.normal(size=(1, 3, 8)).astype(np.float32)
  params = None
  results = []
  for remat in (False, True):
    cfg = UNetConfig(block_out_channels=(8,), attention_levels=(True,), num_heads=2,
                     transformer_depth=2, context_dim=8, norm_groups=4, remat=remat)
    level = nnx.eval_shape(lambda: Level(((8, 8),), True, 2, None, cfg, nnx.Rngs(0)))
    if params is None:
      params = {k: (0.3 * rng.normal(size=s)).astype(np.float32)
                for k, s in param_shapes(level).items()}
    load_params(level, params)
    loss = lambda m: jnp.mean(m.block(0, x, temb, ctx) ** 2)  # noqa: E731
    results.append(nnx.jit(nnx.value_and_grad(loss))(level))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(leaves0) == len(leaves1) == len(params)
  for a, b in zip(leaves0, leaves1):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_timestep_embedding_is_sd_sinusoid():
  emb = np.asarray(timestep_embedding(jnp.array([0.0, 10.0, 999.0]), 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  args = np.array([0.0, 10.0, 999.0])[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-4)


def test_key_errors_name_every_culprit(saved):
  cfg, _, path, *_ = saved["sd_like"]
  sd = read_state_dict(path)
  del sd["up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"]
  sd["mid_block.resnets.1.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  sd["down_blocks.0.attentions.0.extra.bias"] = np.zeros(3, np.float32)
  with pytest.raises(KeyMappingError) as e:
    load_unet(_abstract(cfg), sd)
  msg = str(e.value)
  for culprit in ("up_blocks.1.attentions.2.transformer_blocks.attn2.to_k.kernel",
                  "mid_block.resnets.1.conv1.kernel", "down_blocks.0.attentions.0.extra.bias"):
    assert culprit in msg
  # A checkpoint of another topology (3 levels) is refused rather than half-loaded.
  with pytest.raises(KeyMappingError):
    load_unet(_abstract(cfg), saved["3lvl_odd"][2])


def test_full_size_param_count_rules_and_shardings():
  cfg = UNetConfig()
  model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  shapes = param_shapes(model)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 859_532_484
  # depth-stacked transformer params carry the leading layer axis, also in their logical names
  assert shapes["down_blocks.0.attentions.0.transformer_blocks.attn1.to_q.kernel"] == (1, 320, 320)
  shardings = state_shardings(make_mesh((2, 2, 2)), nnx.state(model, nnx.Param))
  specs = {".".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(shardings)}
  assert specs["down_blocks.0.attentions.0.transformer_blocks.attn1.to_q.kernel"] == P(
      None, "fsdp", "tensor")
  assert specs["up_blocks.1.resnets.0.conv1.kernel"] == P(None, None, None, "fsdp")
  assert specs["mid_block.attentions.0.transformer_blocks.ff.proj.kernel"] == P(
      None, "fsdp", "tensor")
  for layout in ("diffusers", "compvis"):
    rules = unet_rules(cfg, layout)
    assert sorted(r.jax for r in rules) == sorted(shapes)
    assert len({r.torch for r in rules}) == len(rules)
  compvis = {r.torch for r in unet_rules(cfg, "compvis")}
  # spot checks of SD-1.5's single-file names
  for key in ("input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
              "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
              "output_blocks.11.1.proj_out.weight",
              "middle_block.1.transformer_blocks.{d}.ff.net.2.bias"):
    assert key in compvis, key


def test_from_pretrained_reads_sizes_and_per_level_heads(saved):
  """The directory alone builds the model: diffusers' attention_head_dim (3, 4) is the number of
  heads per level (the mid block takes the last), and the output equals diffusers'."""
  cfg, _, path, inputs, want = saved["heads_3_4_depth2"]
  model = unet_lib.from_pretrained(path)
  assert model.config == cfg and model.config.level_heads == (3, 4)
  assert model.mid_block.attentions[0].transformer_blocks.attn1.heads == 4
  assert rel_max(_apply(model, *inputs), want) <= 1e-4


def test_from_pretrained_refuses_disagreements_by_field(saved, tmp_path):
  _, _, path, *_ = saved["sd_like"]
  with pytest.raises(PretrainedConfigError, match=r"num_heads=8 .*\(attention_head_dim\)=4"):
    unet_lib.from_pretrained(path, num_heads=8)
  config = json.loads((path / "config.json").read_text())
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  for change, message in (
      ({"layers_per_block": 3}, "says layers_per_block=3 but the weights have layers_per_block=2"),
      ({"cross_attention_dim": 32}, "says context_dim=32 but the weights have context_dim=24"),
      ({"down_block_types": ["CrossAttnDownBlock2D"] * 2,
        "up_block_types": ["CrossAttnUpBlock2D"] * 2}, r"attention_levels=\(True, True\) but the"),
      ({"num_attention_heads": 4}, "num_attention_heads is set"),
      ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
      ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "up_block_types=.* mirrors")):
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PretrainedConfigError, match=message):
      unet_lib.from_pretrained(bad)


def test_compvis_yaml_table():
  """ldm's UNetModel parameters (the SD yaml's unet_config.params) -> UNetConfig."""
  sd15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
              attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
              num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
              use_checkpoint=True, legacy=False)
  assert unet_lib.unet_config_from_compvis(sd15) == UNetConfig(in_channels=4)
  # SD-2.x fixes the head SIZE (64): heads per level 320/64 .. 1280/64, as diffusers' SD-2
  # config.json states them (attention_head_dim [5, 10, 20, 20]).
  sd2 = dict(sd15, num_heads=-1, num_head_channels=64, context_dim=1024,
             use_linear_in_transformer=True)
  assert unet_lib.unet_config_from_compvis(sd2).level_heads == (5, 10, 20, 20)
  diffusers_sd2 = {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                   "use_linear_projection": True}
  assert (unet_lib.unet_config_from_hf(diffusers_sd2)
          == unet_lib.unet_config_from_compvis(sd2, in_channels=4))
  with pytest.raises(PretrainedConfigError, match="in_channels=8 was asked for"):
    unet_lib.unet_config_from_compvis(sd15, in_channels=8)
  with pytest.raises(ValueError, match="one entry per level"):
    UNetConfig(num_heads=(8, 8))
