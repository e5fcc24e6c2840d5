"""LEGO's latent diffusion model as a config builds it, and the inputs a step or a sampler call
takes: what `lego-jax train-ldm` (lego_jax/train/ldm.py) and generation (lego_jax/infer/) share.

The models: UNet (8 input channels: noisy target latent ++ input latent), conditioner
(proj_img / proj_txt / the token mixer), CLIP text encoder and VAE, in that order (`NAMES`).
The inputs, per example: the frames, the CLIP token ids of the text `ldm_train.text_source`
picks (the VLLM's generated description R, the annotation's description, or the action label),
and the VLLM features H_i / H_t from `lego-jax extract` (zeros when the config uses neither).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flax import nnx

from lego_jax.config import ConfigError
from lego_jax.data import features as features_lib
from lego_jax.data import pipeline
from lego_jax.data.tokenizer import load_clip_tokenizer
from lego_jax.infer import sampler as sampler_lib
from lego_jax.infer.schedule import NoiseSchedule
from lego_jax.models.clip_text import CLIPText, CLIPTextConfig
from lego_jax.models.conditioner import Conditioner, ConditionerConfig
from lego_jax.models.unet import UNet, UNetConfig
from lego_jax.models.vae import VAE, VAEConfig

NAMES = ("unet", "conditioner", "clip_text", "vae")
TEXT_SOURCES = ("generated", "annotation", "action")
# What train-ldm's frozen-encoder cache (train/ldm_cache.py) gives a batch instead of frames.
CACHED_LATENTS = ("input_mean", "target_mean", "target_logvar")


def check(cfg) -> None:
  t = cfg.ldm_train
  if t.text_source not in TEXT_SOURCES:
    raise ValueError(f"ldm_train.text_source={t.text_source!r}: one of {TEXT_SOURCES}")
  if t.get("train_text_source", "") not in ("",) + TEXT_SOURCES:
    raise ValueError(f"ldm_train.train_text_source={t.train_text_source!r}: empty (as "
                     f"text_source) or one of {TEXT_SOURCES}")


def train_text_source(cfg) -> str:
  """The text the training pairs are conditioned on: `train_text_source`, else `text_source`
  (sampling always uses text_source). The embedded default trains LEGO on the annotation's
  description, which states how each training pair was done (its world swaps hands against the
  rules in some pairs: lego_jax/data/synthetic.py), and samples from the VLLM's R."""
  t = cfg.ldm_train
  return t.get("train_text_source", "") or t.text_source


def trained_names(cfg) -> tuple[str, ...]:
  """The modules train-ldm trains: the UNet, and the conditioner with `train_projections` (the
  paper; the release's optimizer covered the UNet only). The others stay frozen."""
  return ("unet", "conditioner") if cfg.ldm_train.train_projections else ("unet",)


def uses_features(cfg) -> bool:
  t = cfg.ldm_train
  return (t.use_image_embedding or t.use_text_embedding or t.text_source == "generated"
          or train_text_source(cfg) == "generated")


def schedule_of(cfg) -> NoiseSchedule:
  t = cfg.ldm_train
  schedule = NoiseSchedule(t.num_timesteps, t.beta_start, t.beta_end,
                           zero_terminal_snr=bool(t.get("zero_terminal_snr", False)))
  try:
    sampler_lib.check_prediction(prediction_type_of(cfg), schedule)
  except ValueError as e:
    raise ConfigError(f"ldm_train: {e}") from None
  return schedule


def prediction_type_of(cfg) -> str:
  """What the UNet is trained to output (ldm_train.prediction_type; the release: epsilon)."""
  return cfg.ldm_train.get("prediction_type", "epsilon")


def build(cfg, seed: int, names: tuple[str, ...] = NAMES) -> dict[str, nnx.Module]:
  """{name: module} of `names` at their random initialisation (trained or pretrained weights
  are loaded after); under `nnx.eval_shape` nothing is allocated. The VAE draws from cfg.seed
  (train-vae's own initialisation)."""
  make = {"unet": lambda: UNet(UNetConfig(**cfg.unet), rngs=nnx.Rngs(seed)),
          "conditioner": lambda: Conditioner(ConditionerConfig(**cfg.conditioner),
                                             rngs=nnx.Rngs(seed + 23)),
          "clip_text": lambda: CLIPText(CLIPTextConfig(**cfg.clip_text), rngs=nnx.Rngs(seed + 7)),
          "vae": lambda: VAE(VAEConfig(**cfg.vae), rngs=nnx.Rngs(cfg.seed))}
  return {n: make[n]() for n in names}


def abstract(cfg) -> tuple[dict, dict]:
  """({name: graphdef}, {name: params as ShapeDtypeStructs}) of `NAMES`: shapes only."""
  modules = nnx.eval_shape(lambda: build(cfg, cfg.seed))
  split = {n: nnx.split(modules[n]) for n in NAMES}
  return {n: s[0] for n, s in split.items()}, {n: s[1] for n, s in split.items()}


def models_from(graphdefs, params: dict, latent_scale) -> tuple:
  """(unet, conditioner, clip_text, vae) from split params; the VAE carries the latent scale
  the LDM was trained with (as diffusers' vae.config.scaling_factor)."""
  unet, conditioner, clip_text, vae = (nnx.merge(graphdefs[n], params[n]) for n in NAMES)
  vae.config = dataclasses.replace(vae.config, scaling_factor=float(latent_scale))
  return unet, conditioner, clip_text, vae


class TextIds:
  """Host side: the chosen text of each example -> (B, 77) CLIP token ids."""

  def __init__(self, cfg, workdir: Path, train: bool = False):
    self.tokenize = load_clip_tokenizer(cfg, workdir)
    self.source = train_text_source(cfg) if train else cfg.ldm_train.text_source
    self.text_len = cfg.conditioner.text_len

  def texts(self, batch: dict) -> list[str]:
    key = {"generated": "generated", "annotation": "description", "action": "action"}[self.source]
    return [str(s) for s in batch[key]]

  def __call__(self, batch: dict) -> np.ndarray:
    return self.tokenize(self.texts(batch))

  def empty(self) -> np.ndarray:
    return self.tokenize([""])


def feature_extras(cfg, workdir: Path, split: str) -> tuple[dict, list]:
  """The VLLM feature records zipped with the split's pairs, and their decoding operation."""
  extras, ops = {}, []
  if uses_features(cfg):
    extras["features"] = features_lib.open_source(Path(workdir) / "features", split)
    ops.append(features_lib.DecodeFeatures(cfg.conditioner.text_len))
  return extras, ops


def loader_for(cfg, workdir: Path, split: str, batch_size: int, train: bool,
               shard_options=None, cache: tuple | None = None):
  """The split's pairs with their features: shuffled, repeated and augmented for training
  (`train`), else in record order once. `cache`: (source, decoding operation) of train-ldm's
  frozen-encoder cache, whose latents and text states then replace the frames."""
  extras, ops = feature_extras(cfg, workdir, split)
  views = ("ldm",)
  if cache is not None:
    extras["cache"] = cache[0]
    ops.append(cache[1])
    views = ()
  make = pipeline.train_pairs if train else pipeline.eval_pairs
  return make(cfg, workdir, batch_size, split=split, views=views, extra_sources=extras,
              extra_operations=ops, shard_options=shard_options)


def batch_arrays(cfg, batch: dict, text_ids: TextIds) -> dict:
  """The numeric arrays one step or sampler call needs (features zero-filled when the config
  uses none)."""
  if "input_mean" in batch:  # ldm_train.cache_frozen: the frozen encoders' outputs
    out = {k: batch[k] for k in CACHED_LATENTS + ("text",)}
  else:
    out = {"input": batch["input"], "target": batch["target"], "text_ids": text_ids(batch)}
  b = len(out["text" if "text" in out else "text_ids"])
  n_img = cfg.data.get("num_image_tokens", None)
  if "h_img" in batch:
    out["h_img"], out["h_txt"] = batch["h_img"], batch["h_txt"]
  else:
    dim = cfg.conditioner.llm_dim
    n = (cfg.clip_vision.image_size // cfg.clip_vision.patch_size) ** 2 if n_img is None else n_img
    out["h_img"] = np.zeros((b, n, dim), np.float32)
    out["h_txt"] = np.zeros((b, cfg.conditioner.text_len, dim), np.float32)
  return out
