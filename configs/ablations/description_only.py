"""Ablation (paper Table 3): enriched description only (no VLLM embeddings).

The same trainer as LEGO; only the conditioning switches differ (the full model, "+ both", is the
base config itself). The base is chosen after a colon, default lego_ego4d:
  --config=configs/ablations/description_only.py            # on top of configs/lego_ego4d.py
  --config=configs/ablations/description_only.py:tiny       # on top of the embedded default
"""

import pathlib

from lego_jax import config


def get_config(base: str = "lego_ego4d"):
  cfg = config.load(pathlib.Path(__file__).resolve().parent.parent / f"{base or 'lego_ego4d'}.py")
  cfg.name = f"{cfg.name}/description_only"
  cfg.ldm_train.text_source = "generated"
  cfg.ldm_train.use_image_embedding = False
  cfg.ldm_train.use_text_embedding = False
  return cfg
