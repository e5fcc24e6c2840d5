"""The LDM's learning-efficiency options (lego_jax/infer/schedule.py) against diffusers:
zero-terminal-SNR betas and v-prediction targets (DDPMScheduler), min-SNR weights (the formula of
diffusers' training examples over training_utils.compute_snr), and the samplers' v / trailing-step
handling on a model that knows x0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax.infer import sampler
from lego_jax.infer import schedule as schedule_lib
from lego_jax.infer.schedule import NoiseSchedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.training_utils import compute_snr  # noqa: E402


def _ddpm(**kw):
  return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", **kw)


def test_zero_terminal_snr_alphas_cumprod_match_diffusers():
  ours = NoiseSchedule(zero_terminal_snr=True)
  ref = _ddpm(rescale_betas_zero_snr=True, prediction_type="v_prediction")
  acp = ref.alphas_cumprod.numpy()
  # diffusers builds the betas in float32, CompVis (and we) in float64
  np.testing.assert_allclose(ours.alphas_cumprod, acp, rtol=2e-5, atol=2e-7)
  assert ours.alphas_cumprod[-1] == 0.0 and ours.snr[-1] == 0.0
  assert ours.alphas_cumprod[0] == pytest.approx(NoiseSchedule().alphas_cumprod[0], rel=1e-6)
  # the sampler's top sigma is held finite (acp floored at 2**-24), the rest is the table's
  assert ours.sigma_max == pytest.approx(((1 - 2.0 ** -24) / 2.0 ** -24) ** 0.5, rel=1e-5)
  np.testing.assert_allclose(ours.sigmas[:-1], ((1 - acp[:-1]) / acp[:-1]) ** 0.5, rtol=5e-5)
  # off: the release's schedule, bit for bit
  np.testing.assert_array_equal(NoiseSchedule(zero_terminal_snr=False).alphas_cumprod,
                                NoiseSchedule().alphas_cumprod)


def test_velocity_matches_diffusers_get_velocity():
  ref = _ddpm(rescale_betas_zero_snr=True, prediction_type="v_prediction")
  ours = NoiseSchedule(zero_terminal_snr=True)
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 317, 998, 999])
  # diffusers' tensors are NCHW; the formula is elementwise, so the layout does not matter
  want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  got = schedule_lib.velocity(ours.alphas_cumprod, jnp.asarray(x0), jnp.asarray(noise),
                              jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got)[3], -x0[3], atol=1e-6)   # zero SNR: v = -x0
  eps_target = schedule_lib.model_target("epsilon", ours.alphas_cumprod, x0, noise, t)
  np.testing.assert_array_equal(np.asarray(eps_target), noise)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_training_formula(prediction):
  ref = _ddpm(prediction_type=prediction)
  t = torch.tensor([0, 1, 50, 200, 500, 800, 999])
  snr = compute_snr(ref, t)
  gamma = 5.0
  # diffusers/examples/text_to_image/train_text_to_image.py (snr_gamma)
  want = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
  want = want / snr if prediction == "epsilon" else want / (snr + 1)
  ours = NoiseSchedule()
  got = schedule_lib.min_snr_weights(jnp.asarray(ours.snr)[t.numpy()], gamma, prediction)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4)
  if prediction == "epsilon":  # low noise (snr > gamma) is down-weighted, high noise kept at 1
    assert float(got[0]) < 0.01 and float(got[-1]) == pytest.approx(1.0)
  # zero SNR: epsilon's undefined ratio weighs 1 (as diffusers' examples set it), v's 0
  z = schedule_lib.min_snr_weights(jnp.zeros(1), gamma, prediction)
  assert float(z[0]) == (1.0 if prediction == "epsilon" else 0.0)


def test_scalings_and_trailing_timesteps():
  c_skip, c_out, c_in = schedule_lib.denoiser_scalings(jnp.float32(2.0), "v_prediction")
  assert (float(c_skip), float(c_out), float(c_in)) == pytest.approx(
      (1 / 5, -2 / 5 ** 0.5, 1 / 5 ** 0.5), rel=1e-6)
  ref = _ddpm(rescale_betas_zero_snr=True, timestep_spacing="trailing")
  ref.set_timesteps(20)
  got = NoiseSchedule(zero_terminal_snr=True).ddim_timesteps(20)
  np.testing.assert_array_equal(got, np.sort(ref.timesteps.numpy()))
  assert got[-1] == 999


def _oracle(x0, schedule, prediction):
  """A 'UNet' that knows the clean latent: returns the exact eps or v of x_t (UNet scale)."""
  def unet(x, t, ctx):
    del ctx
    xt = x[..., :x0.shape[-1]]
    acp = 1 / (1 + schedule.t_to_sigma(t[0]) ** 2)   # the sampler's own t <-> sigma map
    a, s = jnp.sqrt(acp), jnp.sqrt(1 - acp)
    eps = (xt - a * x0) / jnp.maximum(s, 1e-12)
    return eps if prediction == "epsilon" else a * eps - s * x0
  return unet


def _run(kind, prediction, schedule, x0):
  unet = _oracle(x0, schedule, prediction)
  ctx = jnp.zeros((x0.shape[0], 3, 8))
  return np.asarray(sampler.sample(unet, jnp.zeros_like(x0), ctx, ctx, jax.random.key(0),
                                   num_steps=10, kind=kind, text_scale=1.0, image_scale=1.0,
                                   schedule=schedule, prediction_type=prediction))


def test_samplers_with_v_prediction_and_zero_terminal_snr():
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 4)), jnp.float32) * 0.5
  zero_snr = NoiseSchedule(zero_terminal_snr=True)
  # Euler ancestral from the (finite) top sigma of a zero-SNR schedule lands on x0
  out = _run("euler_ancestral", "v_prediction", zero_snr, x0)
  np.testing.assert_allclose(out, np.asarray(x0), atol=2e-2)
  # DDIM (trailing steps from t=999, where acp = 0 exactly) ends at t=0's x_t, close to x0
  out = _run("ddim", "v_prediction", zero_snr, x0)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, np.asarray(x0), atol=0.1)


def test_epsilon_on_zero_terminal_snr_is_refused():
  ctx = jnp.zeros((1, 3, 8))
  with pytest.raises(ValueError, match="v_prediction"):
    sampler.sample(lambda x, t, c: x[..., :4], jnp.zeros((1, 4, 4, 4)), ctx, ctx,
                   jax.random.key(0), num_steps=4, schedule=NoiseSchedule(zero_terminal_snr=True))


def test_paper_configs_keep_the_release_recipe_and_tiny_uses_v():
  from lego_jax import config

  for name in ("lego_ego4d", "lego_epickitchens"):
    t = config.load(name).ldm_train
    assert (t.prediction_type, t.min_snr_gamma, t.zero_terminal_snr) == ("epsilon", 0.0, False)
  t = config.load("tiny").ldm_train   # measured: docs/experiments/ldm-learning-options.md
  assert (t.prediction_type, t.min_snr_gamma, t.zero_terminal_snr) == ("v_prediction", 0.0, False)
