"""The SD / LDM noise schedule and k-diffusion's view of it as continuous noise levels.

Discrete DDPM side (CompVis LatentDiffusion, what the UNet was trained on):
  betas = linspace(sqrt(beta_start), sqrt(beta_end), T)**2          ("scaled linear", T = 1000)
  alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])
  x_t = sqrt(acp[t]) x_0 + sqrt(1 - acp[t]) eps                      (`q_sample`)

k-diffusion side (`CompVisDenoiser`, what LEGO's Euler-ancestral sampler runs on):
  x_sigma = x_t / sqrt(acp[t]) = x_0 + sigma eps,  sigma_t = sqrt((1 - acp[t]) / acp[t])
  denoised(x, sigma) = x + c_out * eps(x * c_in, t(sigma)), c_in = 1/sqrt(sigma^2+1), c_out = -sigma
  t(sigma) interpolates linearly in log-sigma between neighbouring discrete timesteps.

CompVis builds betas/alphas_cumprod in float64 and stores them as float32 buffers, and k-diffusion
derives its sigmas from those float32 values; the same order is followed here so the sampler sees
the sigmas the release saw.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """The discrete schedule; field names follow configs' `ldm_train` section."""
  num_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012

  @functools.cached_property
  def betas(self) -> np.ndarray:
    """(T,) float64."""
    return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_timesteps,
                       dtype=np.float64) ** 2

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    """(T,) float32 (as CompVis' registered buffer)."""
    return np.cumprod(1.0 - self.betas).astype(np.float32)

  @functools.cached_property
  def sigmas(self) -> np.ndarray:
    """(T,) float32, increasing: the model's discrete noise levels sigma_0 .. sigma_{T-1}."""
    acp = self.alphas_cumprod
    return (((1 - acp) / acp) ** 0.5).astype(np.float32)

  @functools.cached_property
  def log_sigmas(self) -> np.ndarray:
    return np.log(self.sigmas)

  @property
  def sigma_min(self) -> float:
    return float(self.sigmas[0])

  @property
  def sigma_max(self) -> float:
    return float(self.sigmas[-1])

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward diffusion. x0, noise (B, ...); t (B,) integer timesteps -> x_t (B, ...)."""
    return _q_sample(self.alphas_cumprod, x0, t, noise)

  def sigma_to_t(self, sigma: jax.Array) -> jax.Array:
    """Continuous timestep of a noise level (k-diffusion DiscreteSchedule, quantize=False).

    Between the two discrete sigmas that bracket it, t moves linearly in log-sigma; outside the
    table it is clamped to [0, T-1]. sigma (...) -> t (...) float32.
    """
    return _sigma_to_t(self.log_sigmas, sigma)

  def t_to_sigma(self, t: jax.Array) -> jax.Array:
    """Inverse of `sigma_to_t`: log-linear interpolation of the table. t (...) -> sigma (...)."""
    return _t_to_sigma(self.log_sigmas, t)

  def get_sigmas(self, n: int) -> jax.Array:
    """k-diffusion DiscreteSchedule.get_sigmas(n): (n + 1,) from sigma_max down to 0.

    t = linspace(T-1, 0, n) mapped through `t_to_sigma`, then a final 0 (the clean sample).
    """
    return _get_sigmas(self.log_sigmas, n)

  def ddim_timesteps(self, n: int) -> np.ndarray:
    """CompVis DDIM "uniform" discretisation, ascending: range(0, T, T // n) + 1.

    When T // n does not divide T there are slightly more than n steps, as in CompVis; n > T / 2
    would step past the last timestep there and is refused here.
    """
    if not 0 < n <= self.num_timesteps // 2:
      raise ValueError(f"DDIM steps must be in [1, {self.num_timesteps // 2}], got {n}")
    return np.arange(0, self.num_timesteps, self.num_timesteps // n) + 1


def denoiser_scalings(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """CompVis (eps-prediction) denoiser scalings: (c_out, c_in) = (-sigma, 1/sqrt(sigma^2 + 1))."""
  return -sigma, jax.lax.rsqrt(sigma ** 2 + 1.0)


# The math as jitted functions of the table: eager callers get one compiled program instead of
# op-by-op dispatch; inside a caller's jit they are inlined.
@jax.jit
def _q_sample(alphas_cumprod, x0, t, noise):
  acp = jnp.asarray(alphas_cumprod)[t]
  acp = acp.reshape(acp.shape + (1,) * (x0.ndim - acp.ndim)).astype(x0.dtype)
  return jnp.sqrt(acp) * x0 + jnp.sqrt(1 - acp) * noise


@jax.jit
def _sigma_to_t(log_sigmas, sigma):
  log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))
  n = log_sigmas.shape[0]
  # index of the last table entry <= log_sigma, kept so that low + 1 exists
  low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side="right", method="compare_all") - 1,
                 0, n - 2)
  lo, hi = log_sigmas[low], log_sigmas[low + 1]
  w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
  return (1 - w) * low + w * (low + 1)


@jax.jit
def _t_to_sigma(log_sigmas, t):
  t = jnp.asarray(t, jnp.float32)
  low = jnp.floor(t).astype(jnp.int32)
  high = jnp.ceil(t).astype(jnp.int32)
  w = t - low
  return jnp.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


@functools.partial(jax.jit, static_argnums=1)
def _get_sigmas(log_sigmas, n):
  t = jnp.linspace(log_sigmas.shape[0] - 1, 0, n, dtype=jnp.float32)
  return jnp.concatenate([_t_to_sigma(log_sigmas, t), jnp.zeros((1,), jnp.float32)])
