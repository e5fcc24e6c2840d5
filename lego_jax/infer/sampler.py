"""Sampling the LDM stage: Euler ancestral (LEGO's sampler) or DDIM, with dual guidance.

Every sampler is one `lax.scan` over its steps, so a whole trajectory for a batch of frames is a
single XLA program (a `while` loop around one UNet call), compiled once per shape.

Noise: step i draws `normal(fold_in(key, i))` of the latent's shape. `key` is either one PRNG key
for the batch, or one key per frame (shape (B,)), in which case every frame's trajectory depends
only on its own key, whatever the batch it was sampled in (reproducible across batch sizes and
device counts; this needs a vmap-invariant PRNG such as the default threefry, "rbg" keys are not).
Raw uint32 keys (`jax.random.PRNGKey`) are accepted too.

Latents are NHWC (channel last); the UNet is any `unet_apply(x (N,H,W,8), t (N,) float, ctx (N,L,C))
-> eps (N,H,W,4)`, either a pure function or an `nnx.Module` (which `sample` then passes through
`nnx.jit` as an argument, so its weights are inputs of the program, not constants baked into it).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.config import ConfigError
from lego_jax.infer.schedule import NoiseSchedule, denoiser_scalings, x0_and_eps

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]   # (x, sigma scalar) -> denoised x
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]       # (x_t, t scalar) -> eps
UNetApply = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

SAMPLERS = ("euler_ancestral", "ddim")
# cfg.sampler's keys with a fixed set of values (generate's post-processing and file format too)
CHOICES = {"kind": SAMPLERS, "output_norm": ("minmax", "clamp"),
           "postprocess": ("release", "project"), "image_format": ("release", "png"),
           "colour_match": ("none", "median")}


def check_settings(s, where: str = "cfg.sampler") -> None:
  """A sampler section (cfg.sampler, or the demo's shipped_sampler overrides) checked before
  any model loads or file is written: a ConfigError naming the key, not a ValueError from the
  first batch after minutes of loading or training."""
  for key, allowed in CHOICES.items():
    if key in s and s[key] not in allowed:
      raise ConfigError(f"{where}.{key}={s[key]!r}: one of {', '.join(allowed)}")
  if "num_steps" in s and not (isinstance(s["num_steps"], int) and s["num_steps"] >= 1):
    raise ConfigError(f"{where}.num_steps={s['num_steps']!r}: a whole number of steps, 1 or more")
  if "strength" in s:
    st = s["strength"]
    if isinstance(st, bool) or not isinstance(st, (int, float)) or not 0.0 < st <= 1.0:
      raise ConfigError(f"{where}.strength={st!r}: a number in (0, 1] (1: start from pure noise)")


def _typed_key(key: jax.Array) -> jax.Array:
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def step_noise(key: jax.Array, i: jax.Array | int, shape: tuple[int, ...], dtype) -> jax.Array:
  """The standard normal noise of step `i`: normal(fold_in(key, i)); per-frame if `key` is (B,)."""
  key = _typed_key(key)
  if key.ndim == 0:
    return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
  if key.shape != shape[:1]:
    raise ValueError(f"per-frame keys {key.shape} do not match the batch of {shape}")
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:], dtype))(key)


def fold_key(key: jax.Array, data: int) -> jax.Array:
  """fold_in for one key or a batch of per-frame keys."""
  key = _typed_key(key)
  if key.ndim == 0:
    return jax.random.fold_in(key, data)
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def ancestral_step(sigma_from: jax.Array, sigma_to: jax.Array,
                   eta: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array]:
  """k-diffusion get_ancestral_step: the deterministic target sigma_down, the new noise sigma_up.

  sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
  sigma_down = sqrt(sigma_to^2 - sigma_up^2)  (eta = 0: plain Euler, sigma_down = sigma_to).
  """
  sigma_up = jnp.minimum(
      sigma_to, eta * jnp.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
  sigma_down = jnp.sqrt(jnp.maximum(sigma_to ** 2 - sigma_up ** 2, 0.0))
  return sigma_down, sigma_up


def euler_ancestral(denoise_fn: DenoiseFn, x_T: jax.Array, sigmas: jax.Array, key: jax.Array,
                    eta: float | jax.Array = 1.0) -> jax.Array:
  """k-diffusion sample_euler_ancestral.

  Args:
    denoise_fn: (x (B, ...), sigma ()) -> denoised x (B, ...), e.g. the CompVis denoiser.
    x_T: (B, ...) the start, already scaled: noise * sigmas[0].
    sigmas: (n + 1,) decreasing noise levels ending in 0 (`NoiseSchedule.get_sigmas(n)`).
    key: noise of step i is `step_noise(key, i, ...)`.
    eta: ancestral noise fraction (1 = LEGO; 0 = deterministic Euler).
  Returns:
    x_0 (B, ...).
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)

  def step(x, i):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = denoise_fn(x, sigma).astype(x.dtype)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    x = x + (x - denoised) / sigma * (sigma_down - sigma)
    # the last step lands on sigma = 0 and adds nothing (sigma_up = min(0, ...) = 0 there too)
    noise = step_noise(key, i, x.shape, x.dtype)
    x = x + jnp.where(sigma_next > 0, sigma_up, 0.0).astype(x.dtype) * noise
    return x, None

  x, _ = jax.lax.scan(step, x_T, jnp.arange(sigmas.shape[0] - 1))
  return x


def ddim(eps_fn: EpsFn, x_T: jax.Array, timesteps: np.ndarray, alphas_cumprod: np.ndarray,
         key: jax.Array, eta: float | jax.Array = 0.0,
         prediction_type: str = "epsilon") -> jax.Array:
  """CompVis DDIMSampler over the discrete schedule (variance-preserving x_t).

  Args:
    eps_fn: (x_t (B, ...), t ()) -> the model's output (B, ...): eps, or v when
      `prediction_type` is "v_prediction" (x0 and eps then come from `schedule.x0_and_eps`).
    x_T: (B, ...) standard normal start.
    timesteps: ascending DDIM timesteps (`NoiseSchedule.ddim_timesteps(n)`); sampled from the top.
    alphas_cumprod: (T,) the schedule's cumulative alphas.
    key: noise of the j-th step taken is `step_noise(key, j, ...)` (only used when eta > 0).
    eta: 0 = deterministic DDIM; 1 = DDPM-like ancestral noise.
  Returns:
    x_0 (B, ...).

  With a = acp[t], a' = acp[previous DDIM step] (acp[0] after the first):
    x0 = (x - sqrt(1-a) e) / sqrt(a);  s = eta sqrt((1-a')/(1-a) (1 - a/a'))
    x' = sqrt(a') x0 + sqrt(1 - a' - s^2) e + s z
  """
  timesteps = np.asarray(timesteps)
  acp = np.asarray(alphas_cumprod, np.float64)
  a = acp[timesteps]
  a_prev = np.concatenate([acp[:1], acp[timesteps[:-1]]])
  # reversed: the scan walks from the noisiest step down
  ts = jnp.asarray(timesteps[::-1], jnp.float32)
  a = jnp.asarray(a[::-1], jnp.float32)
  a_prev = jnp.asarray(a_prev[::-1], jnp.float32)
  s = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))

  def step(x, j):
    x0, e = x0_and_eps(prediction_type, eps_fn(x, ts[j]).astype(x.dtype), x, a[j])
    x = (jnp.sqrt(a_prev[j]) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev[j] - s[j] ** 2, 0.0)) * e
         + s[j] * step_noise(key, j, x.shape, x.dtype))
    return x, None

  x, _ = jax.lax.scan(step, x_T, jnp.arange(len(timesteps)))
  return x


def dual_guidance_eps(eps_fn: UNetApply, x: jax.Array, t: jax.Array, cond_ctx: jax.Array,
                      uncond_ctx: jax.Array, image_latent: jax.Array,
                      text_scale: float | jax.Array = 7.5,
                      image_scale: float | jax.Array = 1.5) -> jax.Array:
  """InstructPix2Pix / LEGO dual classifier-free guidance in ONE 3-way UNet batch.

  Rows [(T,I), (0,I), (0,0)] get contexts [cond, uncond, uncond] and image latents
  [img, img, 0]; then eps = e00 + s_T (e_TI - e_0I) + s_I (e_0I - e00).

  Args:
    eps_fn: the UNet, (x (3B,H,W,c+c'), t (3B,), ctx (3B,L,C)) -> eps (3B,H,W,c).
    x: (B,H,W,c) the UNet-scale noisy latent (x_sigma * c_in for k-diffusion, x_t for DDIM).
    t: () or (B,) timesteps (float).
    cond_ctx, uncond_ctx: (B,L,C) conditional / unconditional contexts.
    image_latent: (B,H,W,c') the input frame's latent (VAE mode, unscaled).
  Returns:
    guided eps (B,H,W,c) in x's dtype.
  """
  b = x.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
  image_latent = image_latent.astype(x.dtype)
  x3 = jnp.concatenate([x, x, x], axis=0)
  img3 = jnp.concatenate([image_latent, image_latent, jnp.zeros_like(image_latent)], axis=0)
  ctx3 = jnp.concatenate([cond_ctx, uncond_ctx, uncond_ctx.astype(cond_ctx.dtype)], axis=0)
  eps = eps_fn(jnp.concatenate([x3, img3], axis=-1), jnp.concatenate([t, t, t]), ctx3)
  e_ti, e_0i, e_00 = jnp.split(eps.astype(jnp.float32), 3, axis=0)
  guided = e_00 + text_scale * (e_ti - e_0i) + image_scale * (e_0i - e_00)
  return guided.astype(x.dtype)


def conditional_eps(eps_fn: UNetApply, x: jax.Array, t: jax.Array, cond_ctx: jax.Array,
                    image_latent: jax.Array) -> jax.Array:
  """Guidance scales (1, 1): e00 + (e_TI - e_0I) + (e_0I - e00) = e_TI, so only the conditional
  row is run (a third of dual_guidance_eps's UNet batch)."""
  b = x.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
  eps = eps_fn(jnp.concatenate([x, image_latent.astype(x.dtype)], axis=-1), t, cond_ctx)
  return eps.astype(x.dtype)


def kept_steps(num_steps: int, strength: float) -> int:
  """How many of a sampler's `num_steps` an SDEdit start at `strength` runs: the last
  floor(num_steps * strength), as diffusers' img2img pipelines count them, and at least one (so
  that any step count a server user picks samples)."""
  return max(1, min(int(num_steps * strength), num_steps))


def _sample(unet_apply: UNetApply, image_latent: jax.Array, cond_ctx: jax.Array,
            uncond_ctx: jax.Array, key: jax.Array, text_scale, image_scale, eta, *,
            num_steps: int, kind: str, schedule: NoiseSchedule, guided: bool,
            prediction_type: str, strength: float = 1.0, latent_scale: float = 1.0) -> jax.Array:
  image_latent = jnp.asarray(image_latent, jnp.float32)
  shape = image_latent.shape
  init_key, loop_key = fold_key(key, 0), fold_key(key, 1)
  if guided:
    guide = functools.partial(dual_guidance_eps, unet_apply, cond_ctx=cond_ctx,
                              uncond_ctx=uncond_ctx, image_latent=image_latent,
                              text_scale=text_scale, image_scale=image_scale)
  else:
    guide = functools.partial(conditional_eps, unet_apply, cond_ctx=cond_ctx,
                              image_latent=image_latent)
  if kind == "euler_ancestral":
    sigmas = schedule.get_sigmas(num_steps)

    def denoise(x, sigma):
      c_skip, c_out, c_in = denoiser_scalings(sigma, prediction_type)
      return x * c_skip + guide(x * c_in, schedule.sigma_to_t(sigma)) * c_out

    noise = step_noise(init_key, 0, shape, jnp.float32)
    start = 0.0
    if strength < 1.0:   # k-diffusion's x = z + sigma * noise at the first kept sigma
      sigmas = sigmas[num_steps - kept_steps(num_steps, strength):]
      start = image_latent * latent_scale
    return euler_ancestral(denoise, start + noise * sigmas[0], sigmas, loop_key, eta)
  if kind == "ddim":
    x_T = step_noise(init_key, 0, shape, jnp.float32)
    timesteps = schedule.ddim_timesteps(num_steps)
    if strength < 1.0:
      timesteps = timesteps[:kept_steps(len(timesteps), strength)]   # the least noisy ones
      a = float(np.asarray(schedule.alphas_cumprod, np.float64)[timesteps[-1]])
      x_T = np.sqrt(a) * image_latent * latent_scale + np.sqrt(1 - a) * x_T
    return ddim(lambda x, t: guide(x, t), x_T, timesteps,
                schedule.alphas_cumprod, loop_key, eta, prediction_type)
  raise ValueError(f"unknown sampler {kind!r}; one of {SAMPLERS}")


_STATIC = ("num_steps", "kind", "schedule", "guided", "prediction_type", "strength",
           "latent_scale")
_sample_fn = jax.jit(_sample, static_argnames=("unet_apply",) + _STATIC)
_sample_module = nnx.jit(_sample, static_argnames=_STATIC)


def sample(unet_apply: UNetApply, image_latent: jax.Array, cond_ctx: jax.Array,
           uncond_ctx: jax.Array, key: jax.Array, *, num_steps: int = 100,
           kind: str = "euler_ancestral", text_scale: float = 7.5, image_scale: float = 1.5,
           eta: float | None = None, schedule: NoiseSchedule = NoiseSchedule(),
           guided: bool | None = None, prediction_type: str = "epsilon",
           strength: float = 1.0, latent_scale: float = 1.0) -> jax.Array:
  """Generates action-frame latents z_0 for a batch of frames: one compiled program.

  Args:
    unet_apply: the UNet, (x (3B,H,W,2c), t (3B,), ctx (3B,L,C)) -> eps (3B,H,W,c); an nnx.Module
      or a pure function (a function closing over weights would bake them in as constants).
    image_latent: (B,H,W,c) input-frame latents (VAE posterior mode, NOT scaled by 0.18215).
    cond_ctx, uncond_ctx: (B,L,C) contexts (Conditioner.__call__ / .unconditional).
    key: one PRNG key, or (B,) per-frame keys. The start noise is drawn from
      `fold_key(key, 0)` (step 0 of `step_noise`), the sampler's step noise from `fold_key(key, 1)`.
    num_steps: sampler steps (LEGO: 100).
    kind: "euler_ancestral" (LEGO, k-diffusion over the 1000 CompVis sigmas) or "ddim".
    text_scale, image_scale: guidance scales (LEGO: 7.5, 1.5); traced, so changing them does not
      recompile.
    guided: False runs only the conditional row (exactly what scales (1, 1) give, 3x less
      UNet work); None: False when both scales are the Python number 1, else True.
    eta: ancestral noise; default 1.0 for Euler ancestral, 0.0 for DDIM.
    schedule: the training noise schedule (zero_terminal_snr: its top sigma held finite,
      DDIM on trailing timesteps; see lego_jax/infer/schedule.py).
    prediction_type: what the UNet outputs, "epsilon" (LEGO) or "v_prediction".
    strength: 1 (LEGO, InstructPix2Pix) starts from pure noise. Below 1, an SDEdit start (Meng
      et al. 2022, as diffusers' img2img pipelines): the input frame's latent, scaled by
      `latent_scale` (the VAE's scaling factor), noised to the level of the first of the last
      `kept_steps(num_steps, strength)` steps, which are then the only ones run. Static.
    latent_scale: the diffusion latent's scale relative to `image_latent` (only read when
      strength < 1).
  Returns:
    z_0 (B,H,W,c) float32, in the diffusion's latent scale (divide by 0.18215 before decoding).
  """
  if kind not in SAMPLERS:
    raise ValueError(f"unknown sampler {kind!r}; one of {SAMPLERS}")
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength!r}: in (0, 1] (1: start from pure noise)")
  check_prediction(prediction_type, schedule)
  if eta is None:
    eta = 1.0 if kind == "euler_ancestral" else 0.0
  if guided is None:
    guided = not unguided(text_scale, image_scale)
  fn = _sample_module if isinstance(unet_apply, nnx.Module) else _sample_fn
  return fn(unet_apply, image_latent, cond_ctx, uncond_ctx, key, text_scale, image_scale, eta,
            num_steps=num_steps, kind=kind, schedule=schedule, guided=bool(guided),
            prediction_type=prediction_type, strength=float(strength),
            latent_scale=float(latent_scale))


def check_prediction(prediction_type: str, schedule: NoiseSchedule) -> None:
  """Refuses what cannot sample: an unknown prediction type, or an epsilon model on a
  zero-terminal-SNR schedule (its x0 at the last step is noise / 0; Lin et al. 2024 pair the
  schedule with v-prediction)."""
  from lego_jax.infer.schedule import PREDICTION_TYPES

  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type={prediction_type!r}: one of {PREDICTION_TYPES}")
  if schedule.zero_terminal_snr and prediction_type == "epsilon":
    raise ValueError("zero_terminal_snr=True needs prediction_type='v_prediction': an epsilon "
                     "model cannot give x0 where the signal is zero (Lin et al. 2024)")


def unguided(text_scale, image_scale) -> bool:
  """Whether the scales are known (Python numbers) to be (1, 1): no guidance to compute."""
  return all(isinstance(s, (int, float)) and float(s) == 1.0 for s in (text_scale, image_scale))
