"""SD-1.5 and LEGO single files (CompVis names, one file) into the LDM's models, and back out.

The references are diffusers / transformers models at small random configs; the single file is
written under CompVis names by our exporters (each exporter is checked key-for-key against an
independently renamed CompVis dict in tests/models/), then read back by `load_ldm_single_file`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from flax import nnx

from lego_jax.models.clip_text import CLIPText, CLIPTextConfig, load_clip_text
from lego_jax.models.conditioner import Conditioner, ConditionerConfig, conditioner_state_dict
from lego_jax.models.unet import UNet, UNetConfig, load_unet
from lego_jax.models.vae import VAE, VAEConfig, load_vae
from lego_jax.weights import checkpoints, io
from helpers import rel_l2

UNET4 = UNetConfig(in_channels=4, block_out_channels=(16, 32), attention_levels=(True, False),
                   layers_per_block=1, num_heads=2, context_dim=24, norm_groups=8)
UNET8 = UNetConfig(**{**UNET4.__dict__, "in_channels": 8})
VAE_CFG = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_groups=4)
TEXT = dict(vocab_size=50, hidden_size=24, intermediate_size=48, num_layers=1, num_heads=2,
            max_position=77)
COND = ConditionerConfig(llm_dim=20, context_dim=24, num_heads=2, ffn_dim=32, num_layers=1)


def _abstract(make):
  return nnx.eval_shape(make)


@pytest.fixture(scope="module")
def refs():
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32),
      layers_per_block=1, cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8).eval()
  ema = UNet2DConditionModel(**unet.config).eval()
  vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4).eval()
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=50, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=77)).eval()
  return unet, ema, vae, text


def _ours_from_refs(refs):
  unet_ref, ema_ref, vae_ref, text_ref = refs
  sd = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}
  unet = load_unet(_abstract(lambda: UNet(UNET4, rngs=nnx.Rngs(0))), sd(unet_ref), layout="diffusers")
  ema = load_unet(_abstract(lambda: UNet(UNET4, rngs=nnx.Rngs(0))), sd(ema_ref), layout="diffusers")
  vae = load_vae(_abstract(lambda: VAE(VAE_CFG, rngs=nnx.Rngs(0))), sd(vae_ref), layout="diffusers")
  text = load_clip_text(_abstract(lambda: CLIPText(CLIPTextConfig(**TEXT), rngs=nnx.Rngs(0))),
                        sd(text_ref))
  return unet, ema, vae, text


def _eps_ref(ref, x, t, ctx):
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
              encoder_hidden_states=torch.from_numpy(ctx)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def test_sd15_single_file_initialises_lego(refs, tmp_path):
  """SD-1.5 -> LEGO: 4-channel conv_in widened to 8 with zero new channels; VAE and CLIP text."""
  unet4, _, vae4, text4 = _ours_from_refs(refs)
  path = checkpoints.export_ldm_single_file(tmp_path / "sd15.safetensors", unet=unet4, vae=vae4,
                                            clip_text=text4)
  keys = io.read_state_dict(path)
  assert any(k.startswith("model.diffusion_model.input_blocks.0.0.") for k in keys)
  assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
  assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)

  unet = _abstract(lambda: UNet(UNET8, rngs=nnx.Rngs(0)))
  vae = _abstract(lambda: VAE(VAE_CFG, rngs=nnx.Rngs(0)))
  text = _abstract(lambda: CLIPText(CLIPTextConfig(**TEXT), rngs=nnx.Rngs(0)))
  checkpoints.load_ldm_single_file(path, unet=unet, vae=vae, clip_text=text, widen_from_sd=True)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  extra = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([10, 700], np.int64)
  ctx = rng.normal(size=(2, 9, 24)).astype(np.float32)
  ours = unet(jnp.concatenate([x, extra], -1), jnp.asarray(t), jnp.asarray(ctx))
  assert rel_l2(ours, _eps_ref(refs[0], x, t, ctx)) <= 1e-4
  assert np.all(np.asarray(unet.conv_in.kernel[...])[:, :, 4:] == 0)

  img = rng.uniform(-1, 1, size=(1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mean_ref = refs[2].encode(torch.from_numpy(img.transpose(0, 3, 1, 2))).latent_dist.mean
  assert rel_l2(vae.mode(jnp.asarray(img)), mean_ref.numpy().transpose(0, 2, 3, 1)) <= 1e-4
  ids = rng.integers(0, 50, (1, 77))
  with torch.no_grad():
    ref_text = refs[3](torch.from_numpy(ids)).last_hidden_state.numpy()
  assert rel_l2(text(jnp.asarray(ids, jnp.int32)), ref_text) <= 1e-4


def test_lego_release_file_with_ema_and_conditioner(refs, tmp_path):
  unet4, ema4, vae4, text4 = _ours_from_refs(refs)
  from lego_jax.models.unet import widen_input

  unet8, ema8 = widen_input(unet4, 8), widen_input(ema4, 8)
  cond = Conditioner(COND, rngs=nnx.Rngs(3))
  path = checkpoints.export_ldm_single_file(tmp_path / "lego.safetensors", unet=unet8, vae=vae4,
                                            clip_text=text4, conditioner=cond, ema_unet=ema8)
  sd = io.read_state_dict(path)
  assert "model_ema.diffusion_modelinput_blocks00weight" in sd
  assert "self_attn_mix.layers.0.self_attn.in_proj_weight" in sd
  for use_ema, expect in ((True, ema8), (False, unet8)):
    unet = _abstract(lambda: UNet(UNET8, rngs=nnx.Rngs(0)))
    cond2 = _abstract(lambda: Conditioner(COND, rngs=nnx.Rngs(0)))
    checkpoints.load_ldm_single_file(sd, unet=unet, conditioner=cond2, use_ema=use_ema)
    for a, b in zip(jax.tree.leaves(nnx.state(unet)), jax.tree.leaves(nnx.state(expect))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k, v in conditioner_state_dict(cond).items():
      np.testing.assert_array_equal(conditioner_state_dict(cond2)[k], v)


def test_convert_command_round_trip(refs, tmp_path):
  """`convert --kind=lego` -> Orbax -> restored parts equal the single file's weights."""
  import dataclasses

  import ml_collections

  from lego_jax.weights import convert

  unet4, ema4, vae4, text4 = _ours_from_refs(refs)
  from lego_jax.models.unet import widen_input

  unet8 = widen_input(unet4, 8)
  cond = Conditioner(COND, rngs=nnx.Rngs(5))
  path = checkpoints.export_ldm_single_file(tmp_path / "lego.safetensors", unet=unet8, vae=vae4,
                                            clip_text=text4, conditioner=cond)
  fields = lambda c: {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
                      if f.name not in ("dtype", "param_dtype")}
  cfg = ml_collections.ConfigDict({
      "unet": fields(UNET8), "vae": fields(VAE_CFG), "clip_text": TEXT, "conditioner": fields(COND),
      "ldm_train": {"init_use_ema": True}})
  parts = convert.convert(cfg, "lego", str(path))
  out = convert.save_converted(parts, tmp_path / "orbax", {"kind": "lego"})
  fresh = convert.build_parts(cfg, "lego")
  convert.restore_converted(out, fresh)
  for name, expect in (("unet", unet8), ("vae", vae4), ("clip_text", text4), ("conditioner", cond)):
    got = jax.tree.leaves(nnx.state(fresh[name], nnx.Param))
    want = jax.tree.leaves(nnx.state(expect, nnx.Param))
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_sizes_from_the_directory_config_or_the_yaml(refs, tmp_path):
  """`convert` of a diffusers directory needs no size flags: the tiny config's sections (other
  sizes) are not used; a CompVis single file is sized by the yaml beside it."""
  import yaml

  from lego_jax import config as config_lib
  from lego_jax.models.unet import widen_input
  from lego_jax.weights import convert
  from lego_jax.weights.state import flat_params

  cfg = config_lib.load("tiny")
  assert cfg.unet.block_out_channels != UNET4.block_out_channels and cfg.unet.in_channels == 8
  unet_ref, _, vae_ref, _ = refs
  unet_ref.save_pretrained(tmp_path / "unet")
  vae_ref.save_pretrained(tmp_path / "vae")
  unet4, _, vae4, text4 = _ours_from_refs(refs)
  unet8 = widen_input(unet4, 8)                    # LEGO's 8 input channels, as convert widens
  parts = convert.convert(cfg, "unet", str(tmp_path / "unet"))
  assert parts["unet"].config == UNET8
  parts.update(convert.convert(cfg, "vae", str(tmp_path / "vae")))
  assert parts["vae"].config == VAE_CFG
  for got, want in ((parts["unet"], unet8), (parts["vae"], vae4)):
    want = flat_params(want)
    assert all(np.array_equal(v, want[k]) for k, v in flat_params(got).items())
  meta = convert._sizes(parts["unet"])
  assert meta["num_heads"] == 2 and meta["block_out_channels"] == [16, 32]
  # A stated override that disagrees is refused by name.
  with pytest.raises(config_lib.ConfigError, match="num_heads=3 was asked for"):
    convert.convert(cfg, "unet", str(tmp_path / "unet"), overrides={"unet": {"num_heads": 3}})

  # An SD-1.5 single file with its CompVis yaml (ldm's UNetModel / AutoencoderKL parameters):
  # the UNet is widened to LEGO's 8 channels. The yaml does not say what ldm hard-codes (32 norm
  # groups, FrozenCLIPEmbedder = ViT-L/14's text tower), so this test's small models say it.
  path = checkpoints.export_ldm_single_file(tmp_path / "sd15.safetensors", unet=unet4, vae=vae4,
                                            clip_text=text4)
  params = {"scale_factor": 0.18215,
            "unet_config": {"params": dict(
                in_channels=4, out_channels=4, model_channels=16, attention_resolutions=[1],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                transformer_depth=1, context_dim=24, legacy=False)},
            "first_stage_config": {"params": dict(embed_dim=4, ddconfig=dict(
                double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=8,
                ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0))},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}
  (tmp_path / "sd15.yaml").write_text(yaml.safe_dump({"model": {"params": params}}))
  parts = convert.convert(cfg, "sd15", str(path), overrides={
      "clip_text": TEXT, "unet": {"norm_groups": 8}, "vae": {"norm_groups": 4}})
  assert parts["unet"].config == UNET8 and parts["vae"].config == VAE_CFG
  for got, want in ((parts["unet"], unet8), (parts["vae"], vae4), (parts["clip_text"], text4)):
    want = flat_params(want)
    assert all(np.array_equal(v, want[k]) for k, v in flat_params(got).items())


def test_convert_command_refuses_a_disagreeing_size_flag(refs, tmp_path):
  """The command line: a --config.unet.* flag that contradicts the directory's config.json ends
  in one line naming the field, exit 2."""
  import subprocess
  import sys

  refs[0].save_pretrained(tmp_path / "unet")
  proc = subprocess.run(
      [sys.executable, "-m", "lego_jax", "convert", "--kind=unet", f"--source={tmp_path / 'unet'}",
       "--config.unet.num_heads=4", f"--workdir={tmp_path / 'w'}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "num_heads=4 was asked for" in last and "(attention_head_dim)=2" in last
  assert "Traceback" not in proc.stderr
