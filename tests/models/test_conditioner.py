"""The LEGO conditioner against its PyTorch definition (two nn.Linear + nn.TransformerEncoder)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lego_jax.models import conditioner as cond
from lego_jax.weights import io
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.state import abstract_param_shapes, count_params
from helpers import rel_l2

NUM_IMAGE_TOKENS = 6


class TorchConditioner(torch.nn.Module):
  """The release's modules, with its attribute names (hence its state-dict keys)."""

  def __init__(self, cfg: cond.ConditionerConfig):
    super().__init__()
    self.text_len = cfg.text_len
    self.projection_img = torch.nn.Linear(cfg.llm_dim, cfg.context_dim)
    self.projection_txt = torch.nn.Linear(cfg.llm_dim, cfg.context_dim)
    layer = torch.nn.TransformerEncoderLayer(
        cfg.context_dim, cfg.num_heads, cfg.ffn_dim, dropout=cfg.dropout, activation="relu",
        batch_first=True, norm_first=True)
    self.self_attn_mix = torch.nn.TransformerEncoder(layer, cfg.num_layers,
                                                     enable_nested_tensor=False)

  def forward(self, clip_text, h_img, h_txt):
    t = h_txt.shape[1]
    h_txt = (h_txt[:, :self.text_len] if t >= self.text_len
             else torch.nn.functional.pad(h_txt, (0, 0, 0, self.text_len - t)))
    txt = self.self_attn_mix(self.projection_txt(h_txt))
    return torch.cat([clip_text, self.projection_img(h_img), txt], dim=1)


def _inputs(cfg, t_len, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  clip = rng.normal(size=(batch, cfg.text_len, cfg.context_dim)).astype(np.float32)
  h_img = rng.normal(size=(batch, NUM_IMAGE_TOKENS, cfg.llm_dim)).astype(np.float32)
  h_txt = rng.normal(size=(batch, t_len, cfg.llm_dim)).astype(np.float32)
  return clip, h_img, h_txt


# one jitted forward for all tests (eager NNX dispatch is slow; compiled once per shape/switches)
_apply = nnx.jit(lambda m, *a, **kw: m(*a, **kw),
                 static_argnames=("use_image", "use_text", "deterministic"))


def _from_torch(cfg, sd):
  """Our model with the torch reference's weights, built abstractly (no init to compile)."""
  abstract = nnx.eval_shape(lambda: cond.Conditioner(cfg, rngs=nnx.Rngs(0)))
  return cond.load_conditioner(abstract, sd)


def _torch_sd(ref):
  return {k: v.detach().numpy() for k, v in ref.state_dict().items()}


def _small(**kw):
  base = dict(llm_dim=40, context_dim=64, text_len=9, num_heads=4, ffn_dim=128, num_layers=2)
  base.update(kw)
  return cond.ConditionerConfig(**base)


def _ldm_extras(sd):
  """Keys that share the LEGO checkpoint file with the conditioner (their loaders are elsewhere)."""
  sd = dict(sd)
  sd["model.diffusion_model.out.2.weight"] = np.zeros((4, 8, 3, 3), np.float32)
  sd["model_ema.diffusion_modelout2weight"] = np.zeros((4, 8, 3, 3), np.float32)
  sd["first_stage_model.decoder.conv_out.bias"] = np.zeros((3,), np.float32)
  sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(8, np.float32)
  sd["alphas_cumprod"] = np.ones(1000, np.float32)
  return sd


def test_full_size_parameter_count():
  cfg = cond.ConditionerConfig()
  shapes = abstract_param_shapes(lambda: cond.Conditioner(cfg, rngs=nnx.Rngs(0)))
  total = sum(int(np.prod(s)) for s in shapes.values())
  # 2 x (5120*768 + 768) + 2 x (qkv 1,771,776 + out 590,592 + FFN 3,148,544 + norms 3,072)
  assert total == 2 * (5120 * 768 + 768) + 2 * 5_513_984 == 18_893_824
  assert cond.num_params(cfg) == total
  assert shapes["mix.layers.attn.qkv.kernel"] == (2, 768, 3 * 768)
  assert shapes["proj_img.kernel"] == (5120, 768)


@pytest.mark.parametrize("cfg,t_len,fmt", [
    (_small(), 5, "ckpt"),                                          # H_t shorter: zero padded
    (_small(llm_dim=24, context_dim=48, text_len=7, num_heads=3, ffn_dim=96, num_layers=3),
     11, "safetensors"),                                            # H_t longer: truncated
])
def test_parity_with_torch(tmp_path, cfg, t_len, fmt):
  torch.manual_seed(0)
  ref = TorchConditioner(cfg).eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  if fmt == "ckpt":   # a Lightning-style pickle, the whole LDM file around the conditioner
    full = {k: torch.from_numpy(v) for k, v in _ldm_extras(sd).items()}
    torch.save({"state_dict": full, "global_step": 10}, tmp_path / "lego.ckpt")
    path = tmp_path / "lego.ckpt"
  else:
    path = tmp_path / "conditioner.safetensors"
    io.write_safetensors(sd, path)

  abstract = nnx.eval_shape(lambda: cond.Conditioner(cfg, rngs=nnx.Rngs(1)))
  model = cond.load_conditioner(abstract, path)
  clip, h_img, h_txt = _inputs(cfg, t_len)
  with torch.no_grad():
    want = ref(*map(torch.from_numpy, (clip, h_img, h_txt))).numpy()
  got = np.asarray(_apply(model, jnp.asarray(clip), jnp.asarray(h_img), jnp.asarray(h_txt)))
  assert got.shape == (2, 2 * cfg.text_len + NUM_IMAGE_TOKENS, cfg.context_dim) == want.shape
  assert rel_l2(got, want) <= 1e-4, rel_l2(got, want)
  # the padded rows of H_t are attended to, so the mixed block differs from mixing only T rows
  assert np.abs(want[:, -cfg.text_len:]).min() > 0

  low = _from_torch(cond.ConditionerConfig(**{**cfg.__dict__, "dtype": jnp.bfloat16}), sd)
  got16 = _apply(low, jnp.asarray(clip), jnp.asarray(h_img), jnp.asarray(h_txt))
  assert got16.dtype == jnp.bfloat16
  assert rel_l2(np.asarray(got16.astype(jnp.float32)), want) <= 3e-2


@pytest.fixture(scope="module")
def initialised():
  """One randomly initialised model, reused; "rbg" keys because threefry's random bits take
  XLA:CPU many seconds to compile."""
  cfg = _small(num_layers=3)
  return cfg, cond.Conditioner(cfg, rngs=nnx.Rngs(jax.random.key(3, impl="rbg")))


def test_init_follows_torch_distributions(initialised):
  cfg, model = initialised
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  c = cfg.context_dim
  # nn.Linear: U(+-1/sqrt(fan_in)) for weight and bias; MHA: xavier in_proj, zero biases
  ffn_out = p["mix"]["layers"]["ffn_out"]["kernel"]
  for w, fan_in in ((p["proj_img"]["kernel"], cfg.llm_dim), (ffn_out, cfg.ffn_dim)):
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.1)
  assert 0 < np.abs(p["proj_txt"]["bias"]).max() <= 1 / np.sqrt(cfg.llm_dim)
  qkv = p["mix"]["layers"]["attn"]["qkv"]["kernel"]
  np.testing.assert_allclose(qkv.std(), np.sqrt(6 / (4 * c)) / np.sqrt(3), rtol=0.1)
  assert np.abs(p["mix"]["layers"]["attn"]["qkv"]["bias"]).max() == 0
  assert np.abs(p["mix"]["layers"]["attn"]["out"]["bias"]).max() == 0
  # layers are initialised independently, not copies of one
  assert np.abs(qkv[0] - qkv[1]).max() > 0.01


def test_export_round_trip_uses_release_names(initialised):
  cfg, model = initialised
  ref = TorchConditioner(cfg)
  exported = cond.conditioner_state_dict(model)
  want = ref.state_dict()
  assert set(exported) == set(want)
  for k, v in exported.items():
    assert v.shape == tuple(want[k].shape), k
  # torch accepts the export and then computes what we compute
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()})
  ref.eval()
  clip, h_img, h_txt = _inputs(cfg, 4, seed=1)
  with torch.no_grad():
    want_out = ref(*map(torch.from_numpy, (clip, h_img, h_txt))).numpy()
  got = np.asarray(_apply(model, jnp.asarray(clip), jnp.asarray(h_img), jnp.asarray(h_txt)))
  assert rel_l2(got, want_out) <= 1e-4
  # the in_proj rows are [q; k; v]: the export is the packed kernel transposed, unsplit
  np.testing.assert_array_equal(
      exported["self_attn_mix.layers.2.self_attn.in_proj_weight"],
      np.asarray(model.mix.layers.attn.qkv.kernel[...][2]).T)


def test_unknown_and_missing_keys_are_errors():
  cfg = _small()
  sd = _torch_sd(TorchConditioner(cfg))
  model = nnx.eval_shape(lambda: cond.Conditioner(cfg, rngs=nnx.Rngs(0)))
  extra = dict(sd, **{"projection_ctx.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(KeyMappingError, match="projection_ctx.weight"):
    cond.load_conditioner(model, extra)
  missing = {k: v for k, v in sd.items() if k != "self_attn_mix.layers.1.norm2.bias"}
  with pytest.raises(KeyMappingError, match="mix.layers.norm2.bias"):
    cond.load_conditioner(model, missing)
  # the rest of an LDM file is only skipped on purpose: with no ignore list it is reported
  with pytest.raises(KeyMappingError, match="model.diffusion_model.out.2.weight"):
    cond.load_conditioner(model, _ldm_extras(sd), ignore=())


def test_ablation_lengths_and_unconditional_context():
  cfg = _small()
  torch.manual_seed(1)
  model = _from_torch(cfg, _torch_sd(TorchConditioner(cfg)))
  clip, h_img, h_txt = map(jnp.asarray, _inputs(cfg, 5))
  full = _apply(model, clip, h_img, h_txt)
  n, ti = cfg.text_len, NUM_IMAGE_TOKENS
  no_img = _apply(model, clip, h_img, h_txt, use_image=False)
  no_txt = _apply(model, clip, h_img, h_txt, use_text=False)
  neither = _apply(model, clip, h_img, h_txt, use_image=False, use_text=False)
  assert [x.shape[1] for x in (full, no_img, no_txt, neither)] == [2 * n + ti, 2 * n, n + ti, n]
  np.testing.assert_allclose(no_img, jnp.concatenate([full[:, :n], full[:, n + ti:]], 1),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(no_txt, full[:, :n + ti], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(neither, clip)
  for kw, length in (({}, 2 * n + ti), ({"use_image": False}, 2 * n),
                     ({"use_text": False}, n + ti)):
    u = model.unconditional(clip, ti, **kw)
    assert u.shape == (2, length, cfg.context_dim)
    assert model.context_length(ti, **kw) == length
    np.testing.assert_array_equal(u[:, :n], clip)
    assert float(jnp.abs(u[:, n:]).max()) == 0.0
  # full size: the 410-token context of the paper
  full_size = nnx.eval_shape(lambda: cond.Conditioner(cond.ConditionerConfig(), rngs=nnx.Rngs(0)))
  assert full_size.context_length() == 410
  assert full_size.context_length(use_image=False) == 154
  assert full_size.context_length(use_text=False) == 333


def test_pad_text_features():
  h = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) + 1
  padded = cond.pad_text_features(h, 5)
  assert padded.shape == (2, 5, 2)
  np.testing.assert_array_equal(padded[:, :3], h)
  assert float(jnp.abs(padded[:, 3:]).max()) == 0.0
  np.testing.assert_array_equal(cond.pad_text_features(h, 2), h[:, :2])


def test_dropout_only_when_not_deterministic():
  cfg = _small(dropout=0.5)
  model = _from_torch(cfg, _torch_sd(TorchConditioner(cfg)))
  clip, h_img, h_txt = map(jnp.asarray, _inputs(cfg, 5))
  # "rbg" keys: threefry's dropout masks take XLA:CPU many seconds to compile
  key = lambda seed: jax.random.key(seed, impl="rbg")  # noqa: E731
  a = _apply(model, clip, h_img, h_txt)
  np.testing.assert_array_equal(a, _apply(model, clip, h_img, h_txt, rngs=key(1)))
  b = _apply(model, clip, h_img, h_txt, deterministic=False, rngs=key(1))
  c = _apply(model, clip, h_img, h_txt, deterministic=False, rngs=key(2))
  np.testing.assert_array_equal(b, _apply(model, clip, h_img, h_txt, deterministic=False,
                                          rngs=key(1)))
  n = cfg.text_len + NUM_IMAGE_TOKENS
  # dropout lives in the mixer only: CLIP and image blocks are untouched
  np.testing.assert_array_equal(b[:, :n], a[:, :n])
  assert rel_l2(b[:, n:], a[:, n:]) > 0.05 and rel_l2(c[:, n:], b[:, n:]) > 0.05
  # an nnx.Rngs works as well: its `dropout` stream is drawn
  d = _apply(model, clip, h_img, h_txt, deterministic=False, rngs=nnx.Rngs(dropout=key(1)))
  assert d.shape == a.shape and rel_l2(d[:, n:], a[:, n:]) > 0.05
  with pytest.raises(ValueError, match="rngs"):
    model(clip, h_img, h_txt, deterministic=False)


def test_parameters_carry_logical_axes():
  cfg = _small()
  model = nnx.eval_shape(lambda: cond.Conditioner(cfg, rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs["mix"]["layers"]["attn"]["qkv"]["kernel"].get_value()) == \
      ("layers", "embed", None)
  assert tuple(specs["mix"]["layers"]["ffn_in"]["kernel"].get_value()) == ("layers", "embed", "mlp")
  assert tuple(specs["proj_img"]["kernel"].get_value()) == ("mlp", "embed")
  assert count_params(model) == cond.num_params(cfg)
