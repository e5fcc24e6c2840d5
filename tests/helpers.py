"""Numbers the parity tests share: how far an output is from the reference's, relative to the
reference, in float64 (so the comparison itself adds no float32 rounding)."""

from __future__ import annotations

import numpy as np


def rel_l2(out, ref) -> float:
  """||out - ref|| / ||ref|| over all elements."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def rel_max(out, ref) -> float:
  """max |out - ref| / max |ref|: the worst element against the reference's scale."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).max() / np.abs(ref).max())
