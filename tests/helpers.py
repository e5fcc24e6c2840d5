"""What several test files share: how far an output is from the reference's, relative to the
reference, in float64 (so the comparison itself adds no float32 rounding); small synthetic
records written by the real prepare-data code."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rel_l2(out, ref) -> float:
  """||out - ref|| / ||ref|| over all elements."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def rel_max(out, ref) -> float:
  """max |out - ref| / max |ref|: the worst element against the reference's scale."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


def synthetic_records(root: Path, num_train: int, num_val: int, num_test: int,
                      config: str = "tiny") -> Path:
  """Synthetic records and tokenizer under `root` (root/records, root/tokenizer), written once by
  the real prepare-data code at these sizes, in the plain world (no combination rules, nothing
  held out) and without VLLM-only instruction frames, whatever `config`'s synthetic world asks:
  the commands run on them stay small, and their records stay the bytes the subprocess tests'
  tolerances were measured on (test_multihost's 1e-6 on the LDM's weights: on the held-out
  world's records one UNet weight of 2x4 vs 1x8 devices came out 1.26e-6 apart). -> root."""
  from lego_jax import config as config_lib
  from lego_jax.data import prepare

  cfg = config_lib.load(config)
  cfg.data.synthetic.update(num_train=num_train, num_val=num_val, num_test=num_test,
                            num_instruction=0, combination_rules=False, holdout=(),
                            hand_swap=0.0)
  prepare.prepare(cfg, root)
  return root
