"""LEGO on EPIC-KITCHENS-100: the Ego4D settings with Epic's data and metric choices."""

import pathlib

import ml_collections

from lego_jax import config


def get_config() -> ml_collections.ConfigDict:
  cfg = config.load(pathlib.Path(__file__).with_name("lego_ego4d.py"))
  cfg.name = "lego_epickitchens"
  cfg.data.dataset = "epickitchens"   # labels used verbatim (no narration normalisation)
  cfg.eval.egovlp_frames = 16         # EgoVLP clip length on Epic (epic_mir_plus.pth)
  return cfg
