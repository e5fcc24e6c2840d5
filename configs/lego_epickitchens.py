"""LEGO on EPIC-KITCHENS-100: the Ego4D settings with Epic's data and metric choices."""

import importlib.util
import pathlib

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(
      "lego_ego4d", pathlib.Path(__file__).with_name("lego_ego4d.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  cfg = base.get_config()
  cfg.name = "lego_epickitchens"
  cfg.data.dataset = "epickitchens"   # labels used verbatim (no narration normalisation)
  cfg.eval.egovlp_frames = 16         # EgoVLP clip length on Epic (epic_mir_plus.pth)
  return cfg
