"""Ablation (paper Table 3): InstructPix2Pix fine-tuned on action labels only (the paper's strongest baseline).

The same trainer as LEGO; only the conditioning switches differ (the full model, "+ both", is the
base config itself). The base is chosen after a colon, default lego_ego4d:
  --config=configs/ablations/ip2p_action.py            # on top of configs/lego_ego4d.py
  --config=configs/ablations/ip2p_action.py:tiny       # on top of the embedded default
"""

import pathlib

from lego_jax import config


def get_config(base: str = "lego_ego4d"):
  cfg = config.load(pathlib.Path(__file__).resolve().parent.parent / f"{base or 'lego_ego4d'}.py")
  cfg.name = f"{cfg.name}/ip2p_action"
  cfg.ldm_train.text_source = "action"
  cfg.ldm_train.train_text_source = "action"  # the label in training too, whatever the base says
  cfg.ldm_train.use_image_embedding = False
  cfg.ldm_train.use_text_embedding = False
  return cfg
