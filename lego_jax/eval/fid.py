"""Fréchet Inception Distance from pool3 activations, computed as pytorch-fid does.

Statistics in float64 (mean, `np.cov(rowvar=False)`); the matrix square root by
`scipy.linalg.sqrtm`, retried with eps on the diagonals when it is not finite, and a complex
result accepted only when its diagonal's imaginary part is below 1e-3. Reference-set statistics
are cached per set: the key hashes every file's path, size and mtime plus the weight file's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import linalg

STATS_VERSION = "pytorch-fid-pool3-v1"  # bump when the feature computation changes


def activation_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) activations -> mean (D,) and covariance (D, D), float64. Needs N >= 2."""
  acts = np.asarray(acts, np.float64)
  if acts.ndim != 2 or acts.shape[0] < 2:
    raise ValueError(f"FID needs at least 2 images per set, got {acts.shape[0]}")
  return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))."""
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1 = np.atleast_2d(sigma1).astype(np.float64)
  sigma2 = np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"FID statistics differ in shape: {mu1.shape} vs {mu2.shape}")
  diff = mu1 - mu2
  # No `disp=`: SciPy 1.18 removes it; without it sqrtm returns the same matrix alone (warning,
  # not printing, when the product is near singular).
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular product; adding %s to the covariance diagonals", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def set_key(files: Iterable[str | os.PathLike], weights: str | os.PathLike | None = None) -> str:
  """A hash naming one reference set as seen now: paths, sizes and mtimes (and the weights)."""
  h = hashlib.sha256(STATS_VERSION.encode())
  entries = [Path(f) for f in files]
  if weights is not None:
    entries.append(Path(weights))
  for p in sorted(entries, key=str):
    st = p.stat()
    h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:32]


class StatsCache:
  """`<dir>/fid_<key>.npz` holding mu, sigma and the image count."""

  def __init__(self, directory: str | os.PathLike):
    self.dir = Path(directory)

  def path(self, key: str) -> Path:
    return self.dir / f"fid_{key}.npz"

  def load(self, key: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    p = self.path(key)
    if not p.exists():
      return None
    try:
      with np.load(p) as f:
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64), int(f["n"])
    except Exception as e:  # a truncated or foreign file: recompute rather than fail
      logging.warning("FID cache %s unreadable (%s); recomputing", p, e)
      return None

  def save(self, key: str, mu: np.ndarray, sigma: np.ndarray, n: int) -> Path:
    self.dir.mkdir(parents=True, exist_ok=True)
    p = self.path(key)
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(n))
    os.replace(tmp, p)
    return p


def default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "lego_jax" / "fid"
