"""Parity of the NNX KL-f8 VAE with diffusers' AutoencoderKL, for both checkpoint layouts."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from flax import nnx

from lego_jax.models import vae as vae_lib
from lego_jax.models.vae import VAE, VAEConfig, load_vae, vae_rules, vae_to_torch
from lego_jax.weights.io import read_state_dict, write_safetensors
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.pretrained import PretrainedConfigError
from lego_jax.weights.state import abstract_param_shapes
from helpers import rel_l2, rel_max

CONFIGS = {
    # two levels (one downsampling), one resnet per level, 8 groups, a 3-channel latent
    "2lvl": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8,
                      latent_channels=3),
    # the tiny config's topology: three levels, equal widths at the bottom (no shortcut there)
    "3lvl": VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, norm_groups=16),
}


def _abstract(cfg: VAEConfig) -> VAE:
  """A VAE without random init (eager init compiles one RNG program per shape: seconds each);
  every test fills it from a checkpoint."""
  return nnx.eval_shape(lambda: VAE(cfg, rngs=nnx.Rngs(0)))


# Module-level jits: models of one config share one compiled program across tests.
_encode = jax.jit(lambda m, x: m.encode(x))
_decode = jax.jit(lambda m, z: m.decode(z))


def _reference(cfg: VAEConfig, seed: int) -> AutoencoderKL:
  torch.manual_seed(seed)
  n = len(cfg.block_out_channels)
  ref = AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                      down_block_types=("DownEncoderBlock2D",) * n,
                      up_block_types=("UpDecoderBlock2D",) * n,
                      block_out_channels=cfg.block_out_channels,
                      layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                      norm_num_groups=cfg.norm_groups).eval()
  # Default GroupNorm init is (1, 0): randomise it so a swapped scale/bias could not pass.
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
  return ref


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _reference_outputs(ref: AutoencoderKL, x: np.ndarray, z: np.ndarray):
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    image = ref.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  return _nhwc(post.mean), _nhwc(post.logvar), _nhwc(image)


def _inputs(cfg: VAEConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  f = cfg.downsample_factor
  x = rng.uniform(-1, 1, size=(2, 6 * f, 4 * f, cfg.in_channels)).astype(np.float32)
  z = rng.normal(size=(2, 3, 5, cfg.latent_channels)).astype(np.float32)
  return x, z


def _check(model: VAE, ref_out, x, z, tol):
  mean, logvar = _encode(model, x)
  image = _decode(model, z)
  for got, want in zip((mean, logvar, image), ref_out):
    assert got.shape == want.shape
    assert rel_max(got, want) <= tol, rel_max(got, want)


def diffusers_to_compvis(sd: dict, num_levels: int) -> dict:
  """The CompVis (ldm `Encoder`/`Decoder`) names of a diffusers AutoencoderKL state dict.

  Written from the two codebases' module names, independently of lego_jax's rules; the test
  checks it against diffusers' own single-file converter.
  """
  up = lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}."  # noqa: E731
  subs = [
      (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
      (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
      (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block."),
      (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample."),
      (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
      (r"mid_block\.attentions\.0\.", "mid.attn_1."), (r"conv_shortcut", "nin_shortcut"),
      (r"conv_norm_out", "norm_out"), (r"attn_1\.group_norm", "attn_1.norm"),
      (r"attn_1\.to_([qkv])\.", r"attn_1.\1."), (r"attn_1\.to_out\.0\.", "attn_1.proj_out."),
  ]
  out = {}
  for key, value in sd.items():
    for pattern, repl in subs:
      key = re.sub(pattern, repl, key)
    if "attn_1." in key and value.ndim == 2:  # CompVis attention projections are 1x1 convs
      value = value[:, :, None, None]
    out[key] = value
  return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Each config's reference model, saved with save_pretrained, and its outputs."""
  out = {}
  for i, (name, cfg) in enumerate(CONFIGS.items()):
    ref = _reference(cfg, seed=i)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    x, z = _inputs(cfg, seed=i)
    out[name] = (cfg, ref, path, x, z, _reference_outputs(ref, x, z))
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_parity(saved, name):
  cfg, _, path, x, z, ref_out = saved[name]
  if name == "2lvl":  # the directory alone: every size (3 latent channels) from config.json
    model = vae_lib.from_pretrained(path)
    assert model.config == cfg
  else:
    model = load_vae(_abstract(cfg), read_state_dict(path))  # layout found automatically
  _check(model, ref_out, x, z, tol=1e-4)


def test_from_pretrained_refuses_disagreements_and_compvis_yaml_table(saved, tmp_path):
  cfg, _, path, *_ = saved["2lvl"]
  with pytest.raises(PretrainedConfigError, match=r"norm_groups=4 .*\(norm_num_groups\)=8"):
    vae_lib.from_pretrained(path, norm_groups=4)
  config = json.loads((path / "config.json").read_text())
  shutil.copytree(path, tmp_path / "bad")
  for change, message in (
      ({"latent_channels": 4}, "says latent_channels=4 but the weights have latent_channels=3"),
      ({"block_out_channels": [16, 48]}, r"block_out_channels=\(16, 48\) but the weights"),
      ({"out_channels": 1}, "out_channels=1 is not supported"),
      ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "not supported")):
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PretrainedConfigError, match=message):
      vae_lib.from_pretrained(tmp_path / "bad")
  # ldm's AutoencoderKL (first_stage_config.params of SD's yaml) -> the default (SD) VAEConfig.
  sd = dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=256,
                                       in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                                       num_res_blocks=2, attn_resolutions=[], dropout=0.0))
  assert vae_lib.vae_config_from_compvis(sd, 0.18215) == VAEConfig()
  with pytest.raises(PretrainedConfigError, match="attn_resolutions"):
    vae_lib.vae_config_from_compvis(dict(sd, ddconfig=dict(sd["ddconfig"], attn_resolutions=[32])),
                                    0.18215)


def test_compvis_single_file_parity(saved, tmp_path):
  cfg, ref, _, x, z, ref_out = saved["3lvl"]
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  compvis = diffusers_to_compvis(sd, len(cfg.block_out_channels))
  # The renaming above must be exactly what diffusers' converter undoes.
  back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in compvis.items()},
                                    dict(ref.config))
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  # A single file: the autoencoder beside other models' keys and its own loss modules.
  single = {f"first_stage_model.{k}": v for k, v in compvis.items()}
  single["model.diffusion_model.out.2.bias"] = np.zeros(4, np.float32)
  single["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
  write_safetensors(single, tmp_path / "sd.safetensors")
  model = load_vae(_abstract(cfg), tmp_path / "sd.safetensors", layout="compvis")
  _check(model, ref_out, x, z, tol=1e-4)
  # Export to CompVis gives the file's autoencoder keys back, values and 1x1-conv shapes exact.
  exported = vae_to_torch(model, "compvis")
  expected = {k: v for k, v in single.items()
              if k.startswith("first_stage_model.") and ".loss." not in k}
  assert set(exported) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(exported[k], expected[k])


def test_export_round_trip_into_diffusers(saved):
  cfg, ref, path, x, z, ref_out = saved["2lvl"]
  model = load_vae(_abstract(cfg), path)
  exported = vae_to_torch(model, "diffusers")
  sd = ref.state_dict()
  assert set(exported) == set(sd)
  fresh = _reference(cfg, seed=99)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()},
                        strict=True)
  np.testing.assert_allclose(_reference_outputs(fresh, x, z)[2], ref_out[2], rtol=0, atol=0)


def test_bf16_compute_close_to_fp32(saved):
  cfg, _, path, x, z, ref_out = saved["2lvl"]
  bf16 = VAEConfig(**{**cfg.__dict__, "dtype": jnp.bfloat16})
  model = load_vae(_abstract(bf16), path)
  assert model.encoder.conv_in.kernel.get_value().dtype == jnp.float32  # params stay fp32
  mean, _ = _encode(model, x)
  image = _decode(model, z)
  assert 1e-4 < rel_l2(mean, ref_out[0]) <= 3e-2  # really computed in bf16, and still close
  assert rel_l2(image, ref_out[2]) <= 3e-2


def test_sample_and_mode(saved):
  cfg, _, path, x, _, ref_out = saved["2lvl"]
  model = load_vae(_abstract(cfg), path)
  rng = jax.random.key(3)
  mean, logvar = ref_out[0], ref_out[1]
  sample, mode = jax.jit(lambda m, x, r: (m.sample(x, r), m.mode(x)))(model, x, rng)
  noise = (np.asarray(sample) - mean) / np.exp(0.5 * logvar)
  np.testing.assert_allclose(noise, jax.random.normal(rng, mean.shape), atol=2e-3)
  assert rel_max(mode, mean) <= 1e-4


def test_logvar_is_clamped(saved):
  cfg, _, path, x, *_ = saved["2lvl"]
  model = load_vae(_abstract(cfg), path)
  bias = np.zeros(2 * cfg.latent_channels, np.float32)
  bias[cfg.latent_channels:] = [-100.0, 100.0, 0.0]
  model.quant_conv.kernel.set_value(jnp.zeros_like(model.quant_conv.kernel.get_value()))
  model.quant_conv.bias.set_value(jnp.asarray(bias))
  _, logvar = _encode(model, x)
  np.testing.assert_array_equal(np.asarray(logvar)[0, 0, 0], [-30.0, 20.0, 0.0])


def test_key_errors_name_every_culprit(saved):
  cfg, _, path, *_ = saved["2lvl"]
  sd = read_state_dict(path)
  del sd["decoder.up_blocks.0.resnets.1.conv2.bias"]
  sd["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((32, 31), np.float32)
  sd["encoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(KeyMappingError) as e:
    load_vae(_abstract(cfg), sd)
  msg = str(e.value)
  for culprit in ("decoder.up_blocks.0.resnets.1.conv2.bias", "encoder.mid_block.attention.to_q",
                  "encoder.extra.weight"):
    assert culprit in msg
  # A checkpoint of another width is refused rather than half-loaded.
  with pytest.raises(KeyMappingError, match="mis-shaped"):
    load_vae(_abstract(CONFIGS["3lvl"]), read_state_dict(saved["3lvl"][2]) | {
        "encoder.conv_in.weight": np.zeros((16, 4, 3, 3), np.float32)})


def test_full_size_param_count_and_rules_cover_it():
  cfg = VAEConfig()
  shapes = abstract_param_shapes(lambda: VAE(cfg, rngs=nnx.Rngs(0)))
  assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
  for layout in ("diffusers", "compvis"):
    rules = vae_rules(cfg, layout)
    assert sorted(r.jax for r in rules) == sorted(shapes)
    assert len({r.torch for r in rules}) == len(rules)
