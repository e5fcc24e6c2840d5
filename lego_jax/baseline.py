"""The demo's action-label-only baseline (InstructPix2Pix on the action label, the paper's
comparison): its config, derived from configs/ablations/ip2p_action.py, and its run directory.

Used by the demo, `lego-jax serve` and the shipped-checkpoint export, so it lives below all three.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lego_jax import config as config_lib
from lego_jax.data import pipeline

BASELINE_DIR = "baseline_action_label"


def baseline_config(cfg, workdir: Path):
  """The action-label-only LDM on the demo's own records, tokenizer and VAE: the switches
  configs/ablations/ip2p_action.py changes on its base config, applied to the demo's config (so
  the demo's baseline is that file's, with the demo's sizes and overrides)."""
  base = config_lib.CONFIG_DIR / "lego_ego4d.py"
  ablation = config_lib.CONFIG_DIR / "ablations" / "ip2p_action.py"
  b = cfg.copy_and_resolve_references()
  for path, value in config_lib.differences(config_lib.load(base),
                                            config_lib.load(ablation)).items():
    if path != ("name",):
      section = b
      for key in path[:-1]:
        section = section[key]
      section[path[-1]] = value
  b.name = f"{cfg.name}/ip2p_action"
  b.data.records_dir = str(pipeline.records_dir_of(cfg.data, workdir).absolute())
  if not b.data.tokenizer_dir:
    b.data.tokenizer_dir = str((Path(workdir) / "tokenizer").absolute())
  return b


def link_vae(workdir: Path, baseline_dir: Path) -> None:
  """The baseline decodes with the SAME trained VAE: its checkpoint directory, linked."""
  link = baseline_dir / "checkpoints" / "vae"
  link.parent.mkdir(parents=True, exist_ok=True)
  if not link.is_symlink():
    if link.exists():
      shutil.rmtree(link)
    link.symlink_to(os.path.relpath(Path(workdir) / "checkpoints" / "vae", link.parent),
                    target_is_directory=True)
