"""The noise schedule and the samplers against NumPy references written from the published formulas.

k-diffusion itself is not installed (its wheel requires torchvision, kornia, wandb, ...): the
references below follow its `DiscreteSchedule` / `CompVisDenoiser` / `sample_euler_ancestral`
and CompVis' `DDIMSampler` line by line, in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lego_jax.config import ConfigError
from lego_jax.infer import sampler
from lego_jax.infer.schedule import NoiseSchedule, denoiser_scalings
from helpers import rel_l2

# --- references (float64 NumPy) ----------------------------------------------------------------


def ref_alphas_cumprod(n=1000, start=0.00085, end=0.012):
  betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def ref_kdiffusion_sigmas():
  """What k-diffusion's CompVisDenoiser sees: CompVis keeps alphas_cumprod as a float32 buffer."""
  acp = ref_alphas_cumprod().astype(np.float32).astype(np.float64)
  return np.sqrt((1 - acp) / acp)


def ref_log_sigmas():
  return np.log(ref_kdiffusion_sigmas())


def ref_t_to_sigma(t):
  ls = ref_log_sigmas()
  t = np.asarray(t, np.float64)
  low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
  w = t - low
  return np.exp((1 - w) * ls[low] + w * ls[high])


def ref_get_sigmas(n):
  return np.append(ref_t_to_sigma(np.linspace(999, 0, n)), 0.0)


def ref_sigma_to_t(sigma):
  """k-diffusion's literal algorithm: cumsum of (log_sigma >= table), argmax, clamp, lerp."""
  ls = ref_log_sigmas()
  log_sigma = np.log(np.asarray(sigma, np.float64))
  dists = log_sigma - ls[:, None]
  low = np.minimum(np.cumsum(dists >= 0, axis=0).argmax(axis=0), len(ls) - 2)
  high = low + 1
  w = np.clip((ls[low] - log_sigma) / (ls[low] - ls[high]), 0, 1)
  return (1 - w) * low + w * high


def toy_unet(xp, x8, t, ctx, w):
  """A UNet stand-in, (N,H,W,8), (N,), (N,L,C) -> (N,H,W,4): per-pixel channel mix + a context
  and timestep term, so guidance and the step's t both matter."""
  t = xp.asarray(t, np.float64 if xp is np else jnp.float32).reshape(-1, 1, 1, 1)
  c = ctx.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
  # sin(t / 7): sensitive to the fractional timesteps the CompVis denoiser interpolates
  return x8 @ w + 0.3 * c + 0.2 * xp.sin(t / 7.0)


def ref_guided_eps(x_in, t, cond, uncond, img, st, si, w):
  b = x_in.shape[0]
  t = np.full((b,), t)
  e_ti = toy_unet(np, np.concatenate([x_in, img], -1), t, cond, w)
  e_0i = toy_unet(np, np.concatenate([x_in, img], -1), t, uncond, w)
  e_00 = toy_unet(np, np.concatenate([x_in, 0 * img], -1), t, uncond, w)
  return e_00 + st * (e_ti - e_0i) + si * (e_0i - e_00)


def ref_euler_ancestral(x_T, noises, n, cond, uncond, img, st, si, w, eta=1.0):
  sigmas = ref_get_sigmas(n)
  x = x_T
  for i in range(n):
    s, s_next = sigmas[i], sigmas[i + 1]
    eps = ref_guided_eps(x / np.sqrt(s ** 2 + 1), ref_sigma_to_t(np.array([s]))[0], cond, uncond,
                         img, st, si, w)
    denoised = x - s * eps
    sigma_up = min(s_next, eta * np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
    sigma_down = np.sqrt(s_next ** 2 - sigma_up ** 2)
    x = x + (x - denoised) / s * (sigma_down - s)
    if s_next > 0:
      x = x + noises[i] * sigma_up
  return x


def ref_ddim(x_T, n, eps_at, eta=0.0, noises=None):
  acp = ref_alphas_cumprod()
  ts = np.arange(0, 1000, 1000 // n) + 1
  a, a_prev = acp[ts], np.concatenate([acp[:1], acp[ts[:-1]]])
  sig = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  x = x_T
  for j, i in enumerate(range(len(ts) - 1, -1, -1)):
    e = eps_at(x, ts[i])
    x0 = (x - np.sqrt(1 - a[i]) * e) / np.sqrt(a[i])
    x = np.sqrt(a_prev[i]) * x0 + np.sqrt(1 - a_prev[i] - sig[i] ** 2) * e
    if eta:
      x = x + sig[i] * noises[j]
  return x


def _problem(b=2, hw=4, length=3, c=5, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(b, hw, hw, 4)).astype(np.float32)
  cond = rng.normal(size=(b, length, c)).astype(np.float32)
  uncond = np.zeros_like(cond)
  uncond[:, :1] = rng.normal(size=(b, 1, c))  # CLIP("") is not zero
  w = (0.1 * rng.normal(size=(8, 4))).astype(np.float32)
  return img, cond, uncond, w


def key(seed):
  # the samplers work with any PRNG; "rbg" keys compile in a third of threefry's time on XLA:CPU
  return jax.random.key(seed, impl="rbg")


def _draw(key, i, shape):
  return np.asarray(sampler.step_noise(key, i, shape, jnp.float32), np.float64)


# --- schedule ----------------------------------------------------------------------------------


def test_schedule_matches_kdiffusion_formulas():
  s = NoiseSchedule()
  acp = ref_alphas_cumprod()
  ref_sigmas = ref_kdiffusion_sigmas()
  assert np.max(np.abs(s.sigmas / ref_sigmas - 1)) <= 1e-6
  assert np.max(np.abs(s.alphas_cumprod / acp - 1)) <= 1e-6
  # that float32 buffer moves sigma_min by ~1.3e-5 relative to an all-float64 computation
  exact = np.sqrt((1 - acp) / acp)
  assert 5e-6 < np.max(np.abs(s.sigmas / exact - 1)) <= 3e-5
  # SD-1.x's well-known range
  np.testing.assert_allclose([s.sigma_min, s.sigma_max], [0.0291675, 14.614642], rtol=1e-5)
  got = np.asarray(s.get_sigmas(100))
  want = ref_get_sigmas(100)
  assert got.shape == (101,) and got[-1] == 0.0
  assert np.max(np.abs(got[:-1] / want[:-1] - 1)) <= 1e-5
  assert np.all(np.diff(got) < 0)
  # sigma -> t: inside the table, between neighbours, and clamped outside it
  sig = np.concatenate([np.geomspace(0.01, 20.0, 257), ref_sigmas[[0, 1, 500, 998, 999]]])
  np.testing.assert_allclose(np.asarray(s.sigma_to_t(jnp.asarray(sig, jnp.float32))),
                             ref_sigma_to_t(sig), rtol=1e-5, atol=2e-3)
  np.testing.assert_allclose(np.asarray(s.sigma_to_t(jnp.asarray(s.sigmas))), np.arange(1000),
                             atol=2e-3)
  t = np.array([0.0, 0.25, 3.5, 998.9, 999.0])
  np.testing.assert_allclose(np.asarray(s.t_to_sigma(t)), ref_t_to_sigma(t), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s.sigma_to_t(s.t_to_sigma(t))), t, atol=2e-3)


def test_q_sample_ddim_timesteps_and_scalings():
  s = NoiseSchedule()
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
  t = np.array([0, 999])
  acp = ref_alphas_cumprod()[t][:, None, None, None]
  np.testing.assert_allclose(
      np.asarray(s.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                            jnp.asarray(noise, jnp.float32))),
      np.sqrt(acp) * x0 + np.sqrt(1 - acp) * noise, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s.ddim_timesteps(100), np.arange(1, 1000, 10))
  assert len(s.ddim_timesteps(30)) == 31   # CompVis' count when 1000 // n does not divide 1000
  with pytest.raises(ValueError):
    s.ddim_timesteps(600)
  c_skip, c_out, c_in = denoiser_scalings(jnp.float32(2.0))
  np.testing.assert_allclose([float(c_skip), float(c_out), float(c_in)],
                             [1.0, -2.0, 1 / np.sqrt(5.0)], rtol=1e-6)


def test_ancestral_step():
  down, up = sampler.ancestral_step(jnp.float32(3.0), jnp.float32(2.0), 1.0)
  np.testing.assert_allclose(float(up), np.sqrt(4 * (9 - 4) / 9), rtol=1e-6)
  np.testing.assert_allclose(float(down) ** 2 + float(up) ** 2, 4.0, rtol=1e-6)
  down, up = sampler.ancestral_step(jnp.float32(3.0), jnp.float32(2.0), 0.0)
  assert (float(down), float(up)) == (2.0, 0.0)
  down, up = sampler.ancestral_step(jnp.float32(0.03), jnp.float32(0.0), 1.0)
  assert (float(down), float(up)) == (0.0, 0.0)


# --- guidance ----------------------------------------------------------------------------------


def test_dual_guidance_is_one_batch_of_three():
  img, cond, uncond, w = _problem()
  rng = np.random.default_rng(1)
  x = rng.normal(size=img.shape).astype(np.float32)
  calls = []

  def unet(x8, t, ctx):
    calls.append((x8.shape, t.shape, ctx.shape))
    ctx_gain = ctx.sum((1, 2))[:, None, None, None]
    return jnp.tanh(toy_unet(jnp, x8, t, ctx, w) + 0.05 * x8[..., 4:] * ctx_gain)

  t = jnp.float32(420.5)
  got = sampler.dual_guidance_eps(unet, jnp.asarray(x), t, jnp.asarray(cond), jnp.asarray(uncond),
                                  jnp.asarray(img), text_scale=7.5, image_scale=1.5)
  assert calls == [((6, 4, 4, 8), (6,), (6, 3, 5))]
  tb = jnp.full((2,), t)
  e_ti = unet(jnp.concatenate([x, img], -1), tb, cond)
  e_0i = unet(jnp.concatenate([x, img], -1), tb, uncond)
  e_00 = unet(jnp.concatenate([x, np.zeros_like(img)], -1), tb, uncond)
  want = e_00 + 7.5 * (e_ti - e_0i) + 1.5 * (e_0i - e_00)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert rel_l2(e_ti, e_0i) > 1e-2 and rel_l2(e_0i, e_00) > 1e-2   # every branch matters here
  ones = sampler.dual_guidance_eps(unet, jnp.asarray(x), t, jnp.asarray(cond),
                                   jnp.asarray(uncond), jnp.asarray(img), 1.0, 1.0)
  np.testing.assert_allclose(ones, e_ti, rtol=1e-5, atol=1e-6)


# --- full samplers -----------------------------------------------------------------------------


def test_euler_ancestral_trajectory_matches_reference():
  img, cond, uncond, w = _problem()
  k, n = key(7), 25
  unet = functools.partial(toy_unet, jnp, w=jnp.asarray(w))
  got = sampler.sample(unet, img, cond, uncond, k, num_steps=n, text_scale=7.5,
                       image_scale=1.5)
  # the documented noise contract: start from fold(key, 0), step i from fold(key, 1) at i
  x_T = _draw(sampler.fold_key(k, 0), 0, img.shape) * ref_get_sigmas(n)[0]
  noises = [_draw(sampler.fold_key(k, 1), i, img.shape) for i in range(n)]
  want = ref_euler_ancestral(x_T, noises, n, cond, uncond, img, 7.5, 1.5, w.astype(np.float64))
  assert got.shape == img.shape and got.dtype == jnp.float32
  assert rel_l2(got, want) <= 1e-5, rel_l2(got, want)
  # eta = 0 is plain Euler: no noise after the start, so another step key changes nothing
  e0 = sampler.euler_ancestral(lambda x, s: x * 0.5, jnp.asarray(x_T, jnp.float32),
                               NoiseSchedule().get_sigmas(n), key(1), eta=0.0)
  e1 = sampler.euler_ancestral(lambda x, s: x * 0.5, jnp.asarray(x_T, jnp.float32),
                               NoiseSchedule().get_sigmas(n), key(2), eta=0.0)
  np.testing.assert_array_equal(e0, e1)


def test_ddim_matches_reference_and_is_deterministic_at_eta_0():
  img, cond, uncond, w = _problem(seed=3)
  s, n = NoiseSchedule(), 20
  k0 = key(5)
  unet = functools.partial(toy_unet, jnp, w=jnp.asarray(w))
  got = sampler.sample(unet, img, cond, uncond, k0, num_steps=n, kind="ddim")
  x_T = _draw(sampler.fold_key(k0, 0), 0, img.shape)
  want = ref_ddim(x_T, n, lambda x, t: ref_guided_eps(x, t, cond, uncond, img, 7.5, 1.5,
                                                      w.astype(np.float64)))
  assert rel_l2(got, want) <= 1e-5, rel_l2(got, want)

  eps = lambda x, t: 0.2 * x + 0.01 * t  # noqa: E731
  args = (jnp.asarray(x_T, jnp.float32), s.ddim_timesteps(n), s.alphas_cumprod)
  a = sampler.ddim(eps, *args, key(1), eta=0.0)
  np.testing.assert_array_equal(a, sampler.ddim(eps, *args, key(2), eta=0.0))
  np.testing.assert_allclose(a, ref_ddim(x_T, n, lambda x, t: 0.2 * x + 0.01 * t), rtol=1e-5,
                             atol=1e-5)
  # eta = 1: the step noise enters, and matches the reference drawn from the same keys
  k = key(3)
  b = sampler.ddim(eps, *args, k, eta=1.0)
  want_b = ref_ddim(x_T, n, lambda x, t: 0.2 * x + 0.01 * t, eta=1.0,
                    noises=[_draw(k, j, img.shape) for j in range(n)])
  assert rel_l2(b, want_b) <= 1e-5 and rel_l2(b, a) > 1e-2


def test_sampler_is_one_program_compiled_once():
  img, cond, uncond, w = _problem()
  traces = []

  def unet(x8, t, ctx):
    traces.append(x8.shape)
    return toy_unet(jnp, x8, t, ctx, jnp.asarray(w))

  a = sampler.sample(unet, img, cond, uncond, key(0), num_steps=8)
  b = sampler.sample(unet, img + 1, cond, uncond, key(1), num_steps=8, text_scale=3.0,
                     image_scale=1.2)
  assert traces == [(6, 4, 4, 8)] and rel_l2(a, b) > 1e-2  # traced once, for all 8 steps
  hlo = jax.jit(functools.partial(sampler.sample, unet, num_steps=8)).lower(
      img, cond, uncond, key(0)).as_text()
  assert "stablehlo.while" in hlo
  assert hlo.count("stablehlo.sine") == 1   # the UNet body appears once, not unrolled per step

  class Unet(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.asarray(w))

    def __call__(self, x8, t, ctx):
      traces.append("module")
      return toy_unet(jnp, x8, t, ctx, self.w[...])

  model = Unet()
  c = sampler.sample(model, img, cond, uncond, key(0), num_steps=8)
  np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-6)
  model.w[...] = 2 * model.w[...]
  d = sampler.sample(model, img, cond, uncond, key(0), num_steps=8)
  # the weights are inputs of the program: new values are used without retracing
  assert traces.count("module") == 1 and rel_l2(d, c) > 1e-3


def test_unguided_sampling_runs_one_row_and_equals_the_three_way_batch():
  img, cond, uncond, w = _problem(seed=2)
  shapes = []

  def unet(x8, t, ctx):
    shapes.append(x8.shape)
    return toy_unet(jnp, x8, t, ctx, jnp.asarray(w))

  for kind in sampler.SAMPLERS:
    shapes.clear()
    three = sampler.sample(unet, img, cond, uncond, key(3), num_steps=10, kind=kind,
                           text_scale=1.0, image_scale=1.0, guided=True)
    one = sampler.sample(unet, img, cond, uncond, key(3), num_steps=10, kind=kind,
                         text_scale=1.0, image_scale=1.0)
    assert shapes == [(6, 4, 4, 8), (2, 4, 4, 8)], shapes  # scales (1, 1): a third of the batch
    assert rel_l2(one, three) <= 1e-5, rel_l2(one, three)
  assert sampler.unguided(1, 1.0) and not sampler.unguided(1.0, 1.5)
  assert not sampler.unguided(jnp.float32(1.0), 1.0)  # traced values may change: stay guided


def test_per_frame_keys_make_frames_independent_of_the_batch():
  img, cond, uncond, w = _problem(b=2)
  unet = functools.partial(toy_unet, jnp, w=jnp.asarray(w))
  # threefry (the default): "rbg" bits are not invariant under vmap
  k = jax.random.split(jax.random.key(11), 3)
  first = sampler.sample(unet, img, cond, uncond, k[:2], num_steps=6)
  # another frame with another key beside frame 1: frame 1's result does not move
  img2, cond2 = img.copy(), cond.copy()
  img2[0], cond2[0] = -img[0], 2 * cond[0]
  second = sampler.sample(unet, img2, cond2, uncond, jnp.stack([k[2], k[1]]), num_steps=6)
  np.testing.assert_allclose(second[1], first[1], rtol=1e-6, atol=1e-6)
  assert rel_l2(second[0], first[0]) > 0.1
  # raw uint32 keys (jax.random.PRNGKey) are accepted and mean the same keys
  typed = jax.random.split(jax.random.key(4), 2)
  np.testing.assert_array_equal(
      sampler.step_noise(jax.random.key_data(typed), 2, img.shape, jnp.float32),
      sampler.step_noise(typed, 2, img.shape, jnp.float32))
  # the noise contract the reference tests rely on
  np.testing.assert_array_equal(sampler.step_noise(key(1), 2, img.shape, jnp.float32),
                                jax.random.normal(jax.random.fold_in(key(1), 2), img.shape))
  with pytest.raises(ValueError, match="sampler"):
    sampler.sample(unet, img, cond, uncond, k[:2], kind="heun")


def test_sdedit_start_matches_diffusers_ddim_img2img_and_the_kdiffusion_reference():
  """strength < 1: the input's latent noised to the first kept step, then only the last
  floor(n * strength) steps, as diffusers' img2img pipelines run DDIMScheduler."""
  import torch
  from diffusers import DDIMScheduler

  img, cond, uncond, w = _problem(seed=4)
  w64 = w.astype(np.float64)
  n, strength, scale, k = 20, 0.7, 0.6756, key(9)
  unet = functools.partial(toy_unet, jnp, w=jnp.asarray(w))
  got = sampler.sample(unet, img, cond, uncond, k, num_steps=n, kind="ddim", text_scale=1.0,
                       image_scale=1.0, strength=strength, latent_scale=scale)
  assert sampler.kept_steps(n, strength) == 14
  noise = _draw(sampler.fold_key(k, 0), 0, img.shape)
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  sched.set_timesteps(n)
  timesteps = sched.timesteps[n - int(n * strength):]
  x = sched.add_noise(torch.from_numpy(img * np.float64(scale)),
                      torch.from_numpy(noise), timesteps[:1])
  for t in timesteps:
    e = toy_unet(np, np.concatenate([x.numpy(), img], -1), np.full((2,), float(t)), cond, w64)
    x = sched.step(torch.from_numpy(e), t, x).prev_sample
  assert rel_l2(got, x.numpy()) <= 1e-4, rel_l2(got, x.numpy())
  # it starts near the input: far closer to it than the pure-noise start's result
  full = sampler.sample(unet, img, cond, uncond, k, num_steps=n, kind="ddim", text_scale=1.0,
                        image_scale=1.0)
  assert rel_l2(got, img * scale) < 0.5 * rel_l2(full, img * scale)

  # Euler ancestral: the last 14 of the 21 sigmas' 20 intervals, from z * scale + sigma * noise
  got = sampler.sample(unet, img, cond, uncond, k, num_steps=n, text_scale=7.5, image_scale=1.5,
                       strength=strength, latent_scale=scale)
  sigmas = ref_get_sigmas(n)[n - 14:]
  x = img * np.float64(scale) + noise * sigmas[0]
  for i in range(14):
    s, s_next = sigmas[i], sigmas[i + 1]
    eps = ref_guided_eps(x / np.sqrt(s ** 2 + 1), ref_sigma_to_t(np.array([s]))[0], cond, uncond,
                         img, 7.5, 1.5, w64)
    sigma_up = min(s_next, np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
    x = x + eps * (np.sqrt(s_next ** 2 - sigma_up ** 2) - s)
    if s_next > 0:
      x = x + _draw(sampler.fold_key(k, 1), i, img.shape) * sigma_up
  assert rel_l2(got, x) <= 1e-5, rel_l2(got, x)
  # a strength below one step still runs the last step; outside (0, 1] it is refused, in the
  # sampler and in the config
  assert sampler.kept_steps(4, 0.2) == 1 and sampler.kept_steps(20, 1.0) == 20
  for bad in (0.0, -0.5, 1.5):
    with pytest.raises(ValueError, match="strength"):
      sampler.sample(unet, img, cond, uncond, k, num_steps=n, strength=bad)
  for bad in (0.0, 1.2, "0.5", True):
    with pytest.raises(ConfigError, match="cfg.sampler.strength"):
      sampler.check_settings({"strength": bad})
  sampler.check_settings({"num_steps": 20, "strength": 0.8})
