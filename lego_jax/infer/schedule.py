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

Learning-efficiency options (config `ldm_train`; off in the paper's configs, which keep the release's
epsilon-MSE over scaled-linear betas):
  zero_terminal_snr  Lin et al. 2024, Alg. 1: sqrt(acp) shifted and rescaled so acp[T-1] = 0 (the
                     last step is pure noise, as the sampler's start is) and acp[0] is unchanged.
                     The infinite last sigma is held at acp = 2**-24 for the k-diffusion sampler
                     (sigma ~4096, as diffusers' Euler schedulers do); DDIM steps on "trailing"
                     timesteps, which start at T-1.
  prediction_type    "epsilon" (the release) or "v_prediction" (Salimans & Ho 2022):
                     v = sqrt(acp) eps - sqrt(1 - acp) x0 (`velocity`); the denoiser's scalings
                     become c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1) (k-diffusion's
                     CompVisVDenoiser).
  min_snr_gamma      Hang et al. 2023: each example's MSE weighted by min(SNR, gamma) / SNR
                     (epsilon) or / (SNR + 1) (v), SNR = acp / (1 - acp) (`min_snr_weights`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")
# The k-diffusion sampler's floor on acp: zero terminal SNR would make the top sigma infinite.
MIN_ALPHAS_CUMPROD = 2.0 ** -24


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """The discrete schedule; field names follow configs' `ldm_train` section."""
  num_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  zero_terminal_snr: bool = False

  @functools.cached_property
  def betas(self) -> np.ndarray:
    """(T,) float64."""
    betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_timesteps,
                        dtype=np.float64) ** 2
    return rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    """(T,) float32 (as CompVis' registered buffer)."""
    return np.cumprod(1.0 - self.betas).astype(np.float32)

  @functools.cached_property
  def sigmas(self) -> np.ndarray:
    """(T,) float32, increasing: the model's discrete noise levels sigma_0 .. sigma_{T-1}
    (finite: acp floored at MIN_ALPHAS_CUMPROD, which only a zero-terminal-SNR schedule reaches)."""
    acp = np.maximum(self.alphas_cumprod, np.float32(MIN_ALPHAS_CUMPROD))
    return (((1 - acp) / acp) ** 0.5).astype(np.float32)

  @functools.cached_property
  def snr(self) -> np.ndarray:
    """(T,) float32 signal-to-noise ratio acp / (1 - acp) of each timestep (0 at a zero
    terminal SNR's last step)."""
    acp = self.alphas_cumprod.astype(np.float64)
    return (acp / (1.0 - acp)).astype(np.float32)

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
    would step past the last timestep there and is refused here. A zero-terminal-SNR schedule
    steps on diffusers' "trailing" timesteps instead, round(arange(T, 0, -T / n)) - 1 ascending,
    which start at T-1, where the sampler's pure noise is (Lin et al. 2024, Sec. 3.3).
    """
    if not 0 < n <= self.num_timesteps // 2:
      raise ValueError(f"DDIM steps must be in [1, {self.num_timesteps // 2}], got {n}")
    if self.zero_terminal_snr:
      return trailing_timesteps(self.num_timesteps, n)
    return np.arange(0, self.num_timesteps, self.num_timesteps // n) + 1


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024, Algorithm 1: betas whose last cumulative alpha is 0 (zero SNR at T-1), the
  first unchanged, sqrt(acp) linear in between the original's. (T,) -> (T,) float64."""
  sqrt_acp = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_acp[0], sqrt_acp[-1]
  sqrt_acp = (sqrt_acp - last) * first / (first - last)
  acp = sqrt_acp ** 2
  alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
  return 1.0 - alphas


def trailing_timesteps(num_timesteps: int, n: int) -> np.ndarray:
  """diffusers' timestep_spacing="trailing", ascending: n steps ending at T-1."""
  return np.round(np.arange(num_timesteps, 0, -num_timesteps / n)).astype(np.int64)[::-1] - 1


def velocity(alphas_cumprod, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """The v-prediction target (Salimans & Ho 2022): sqrt(acp[t]) noise - sqrt(1 - acp[t]) x0.
  x0, noise (B, ...); t (B,) integer timesteps."""
  return _velocity(alphas_cumprod, x0, noise, t)


def min_snr_weights(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023) of the MSE on the model's own target:
  min(SNR, gamma) / SNR for epsilon (x0-MSE weight min(SNR, gamma), expressed on eps), / (SNR + 1)
  for v. An SNR of 0 (a zero-terminal-SNR schedule's last step) weighs 1 under epsilon, where the
  ratio is undefined (diffusers' training examples do the same). snr (B,) -> (B,) float32."""
  snr = jnp.asarray(snr, jnp.float32)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  raise ValueError(f"prediction_type={prediction_type!r}: one of {PREDICTION_TYPES}")


def model_target(prediction_type: str, alphas_cumprod, x0: jax.Array, noise: jax.Array,
                 t: jax.Array) -> jax.Array:
  """What the UNet is trained to output: the noise (epsilon) or the velocity (v_prediction)."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return velocity(alphas_cumprod, x0, noise, t)
  raise ValueError(f"prediction_type={prediction_type!r}: one of {PREDICTION_TYPES}")


def x0_and_eps(prediction_type: str, model_out: jax.Array, x_t: jax.Array,
               acp: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) from the model's output at a variance-preserving x_t with cumulative alpha acp
  (DDIM's view). Epsilon cannot give x0 at acp = 0; v can."""
  a, s = jnp.sqrt(acp), jnp.sqrt(1.0 - acp)
  if prediction_type == "epsilon":
    return (x_t - s * model_out) / a, model_out
  if prediction_type == "v_prediction":
    return a * x_t - s * model_out, a * model_out + s * x_t
  raise ValueError(f"prediction_type={prediction_type!r}: one of {PREDICTION_TYPES}")


def denoiser_scalings(sigma: jax.Array, prediction_type: str = "epsilon"
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """k-diffusion's denoiser scalings (c_skip, c_out, c_in): denoised = c_skip x + c_out F(c_in x).
  epsilon (CompVisDenoiser): (1, -sigma, 1/sqrt(sigma^2+1)); v_prediction (CompVisVDenoiser):
  (1/(sigma^2+1), -sigma/sqrt(sigma^2+1), 1/sqrt(sigma^2+1))."""
  c_in = jax.lax.rsqrt(sigma ** 2 + 1.0)
  if prediction_type == "epsilon":
    return jnp.ones_like(sigma), -sigma, c_in
  if prediction_type == "v_prediction":
    return c_in ** 2, -sigma * c_in, c_in
  raise ValueError(f"prediction_type={prediction_type!r}: one of {PREDICTION_TYPES}")


# The math as jitted functions of the table: eager callers get one compiled program instead of
# op-by-op dispatch; inside a caller's jit they are inlined.
@jax.jit
def _q_sample(alphas_cumprod, x0, t, noise):
  acp = jnp.asarray(alphas_cumprod)[t]
  acp = acp.reshape(acp.shape + (1,) * (x0.ndim - acp.ndim)).astype(x0.dtype)
  return jnp.sqrt(acp) * x0 + jnp.sqrt(1 - acp) * noise


@jax.jit
def _velocity(alphas_cumprod, x0, noise, t):
  acp = jnp.asarray(alphas_cumprod)[t]
  acp = acp.reshape(acp.shape + (1,) * (x0.ndim - acp.ndim)).astype(x0.dtype)
  return jnp.sqrt(acp) * noise - jnp.sqrt(1 - acp) * x0


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
