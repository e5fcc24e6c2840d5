"""Whole-model checkpoints people hold, in and out: SD-1.5 / LEGO LDM single files, and export.

A CompVis single file (`.ckpt` Lightning pickle with "state_dict", or `.safetensors`) holds the
UNet (`model.diffusion_model.*`), the VAE (`first_stage_model.*`), the CLIP text encoder
(`cond_stage_model.transformer.text_model.*`), for LEGO also `projection_img.*`,
`projection_txt.*`, `self_attn_mix.*`, and LitEma's copy of the UNet (`model_ema.*`). Each part is
read by its model's own key map; the file is read once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import yaml
from flax import nnx

from lego_jax.models.clip_text import (CLIPText, CLIPTextConfig, clip_text_to_torch,
                                       load_clip_text)
from lego_jax.models.conditioner import (Conditioner, ConditionerConfig, conditioner_state_dict,
                                         load_conditioner)
from lego_jax.models.unet import UNet, load_unet, unet_config_from_compvis, unet_to_torch
from lego_jax.models.vae import VAE, load_vae, vae_config_from_compvis, vae_to_torch
from lego_jax.weights import io as weights_io
from lego_jax.weights.pretrained import PretrainedConfigError

WHERE_TO_GET = {
    "sd15": ("the Stable Diffusion 1.5 single file v1-5-pruned-emaonly.ckpt or .safetensors "
             "(runwayml/stable-diffusion-v1-5, downloaded by hand from the Hugging Face hub)"),
    "lego": ("the LEGO release's diffusion checkpoint (links in the BolinLai/LEGO README, "
             "'Model weights' section)"),
}


def load_ldm_single_file(source: str | os.PathLike | Mapping[str, np.ndarray], *, unet, vae=None,
                         clip_text=None, conditioner=None, use_ema: bool = True,
                         widen_from_sd: bool = False) -> dict[str, np.ndarray]:
  """Fills the given models from one CompVis-layout file; returns the state dict it read.

  Args:
    source: the file (or an already read state dict).
    unet, vae, clip_text, conditioner: models to fill (None: that part is not read).
    use_ema: take the UNet from LitEma's `model_ema.*` copy when the file has one (SD-1.5's
      "emaonly" file has none: its plain weights ARE the EMA weights).
    widen_from_sd: SD-1.5 -> LEGO: the 4-channel conv_in is widened to the model's 8 channels
      with the new channels zero-initialised.
  """
  sd = source if isinstance(source, Mapping) else weights_io.read_state_dict(source)
  has_ema = any(k.startswith("model_ema.") and k not in ("model_ema.num_updates", "model_ema.decay")
                for k in sd)
  load_unet(unet, sd, layout="compvis", ema=use_ema and has_ema,
            widen_input_channels=widen_from_sd)
  if vae is not None:
    load_vae(vae, sd, layout="compvis")
  if clip_text is not None:
    load_clip_text(clip_text, sd, layout="compvis")
  if conditioner is not None:
    load_conditioner(conditioner, {k: v for k, v in sd.items()
                                   if k.startswith(("projection_img.", "projection_txt.",
                                                    "self_attn_mix."))})
  return sd


def export_ldm_single_file(path: str | os.PathLike, *, unet, vae, clip_text,
                           conditioner=None, ema_unet=None) -> Path:
  """Writes the models under CompVis names as one safetensors file the PyTorch release reads
  (with `model_ema.*` from `ema_unet` when given)."""
  out = {}
  out.update(unet_to_torch(unet, "compvis"))
  out.update(vae_to_torch(vae, "compvis"))
  out.update(clip_text_to_torch(clip_text, "compvis"))
  if conditioner is not None:
    out.update(conditioner_state_dict(conditioner))
  if ema_unet is not None:
    for k, v in unet_to_torch(ema_unet, "compvis").items():
      # LitEma's names: the "model." name with its dots removed, under "model_ema.".
      out["model_ema." + k[len("model."):].replace(".", "")] = v
  return weights_io.write_safetensors(out, path, metadata={"format": "pt", "source": "lego_jax"})


def ldm_configs_from_yaml(path: str | os.PathLike, overrides: Mapping[str, Mapping] | None = None
                          ) -> dict:
  """{"unet": UNetConfig, "vae": VAEConfig, "clip_text": CLIPTextConfig} from the CompVis yaml of
  a single file (model.params.unet_config / first_stage_config / scale_factor). The text encoder
  is ldm's FrozenCLIPEmbedder, CLIP ViT-L/14's text tower (CLIPTextConfig's defaults).
  `overrides` = {section: {field: value}}; those of fields the yaml states must agree."""
  overrides = overrides or {}
  try:
    params = yaml.safe_load(Path(path).read_text())["model"]["params"]
    unet, first = params["unet_config"]["params"], params["first_stage_config"]["params"]
  except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
    raise PretrainedConfigError(f"{path}: not a CompVis LDM yaml (model.params.unet_config, "
                                f"first_stage_config): {e}") from None
  cond = (params.get("cond_stage_config") or {}).get("target", "")
  if cond and not cond.endswith("FrozenCLIPEmbedder"):
    raise PretrainedConfigError(f"{path}: cond_stage_config {cond} is not supported (this "
                                "model implements ldm's FrozenCLIPEmbedder, CLIP ViT-L/14)")
  return {
      "unet": unet_config_from_compvis(unet, str(path), **overrides.get("unet", {})),
      "vae": vae_config_from_compvis(first, params.get("scale_factor", 1.0), str(path),
                                     **overrides.get("vae", {})),
      "clip_text": CLIPTextConfig(**overrides.get("clip_text", {})),
  }


def ldm_parts_from_yaml(path: str | os.PathLike, kind: str,
                        overrides: Mapping[str, Mapping] | None = None) -> dict:
  """Abstract models (no random init) for an sd15 / lego single file, sized by its yaml. SD-1.5's
  UNet is built with LEGO's 8 input channels (the file's 4 are widened on loading); LEGO's
  conditioner takes the `conditioner` overrides over ConditionerConfig's release sizes."""
  configs = ldm_configs_from_yaml(path, overrides)
  if kind == "sd15":
    configs["unet"] = dataclasses.replace(configs["unet"], in_channels=max(
        configs["unet"].in_channels, 8))
  make = {"unet": lambda: UNet(configs["unet"], rngs=nnx.Rngs(0)),
          "vae": lambda: VAE(configs["vae"], rngs=nnx.Rngs(0)),
          "clip_text": lambda: CLIPText(configs["clip_text"], rngs=nnx.Rngs(0))}
  if kind == "lego":
    cond = ConditionerConfig(**{"context_dim": configs["unet"].context_dim,
                                **dict((overrides or {}).get("conditioner", {}))})
    make["conditioner"] = lambda: Conditioner(cond, rngs=nnx.Rngs(0))
  return {name: nnx.eval_shape(m) for name, m in make.items()}
