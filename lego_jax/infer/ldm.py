"""The trained LDM for generation: loaded from train-ldm's checkpoint, and its sampling program.

Loading reads only what sampling uses: the frozen encoders, the EMA (or current) weights of the
trained modules and the latent scale, restored straight into an abstract target of the models
(`lego_ldm.abstract`). No optimizer state or second weight copy is built, and no pretrained
file (SD-1.5's, the VAE's checkpoint) is read: the LDM checkpoint holds every weight.

The program, per frame: input latent = VAE mode (unscaled); context from the conditioner; the
sampler (Euler ancestral over the 1000 CompVis sigmas, dual guidance in one 3-way batch, or the
conditional row alone when both scales are 1) as ONE jitted program; decode z / the latent scale
the LDM trained with (0.18215 for SD's VAE); with `sampler.colour_match="median"` (not the
release's), each decoded frame's colour is then shifted onto the input frame's (`match_colour`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.data import images as images_lib
from lego_jax.infer import sampler as sampler_lib
from lego_jax.infer.schedule import NoiseSchedule
from lego_jax.models import lego_ldm
from lego_jax.parallel import sharding
from lego_jax.train import checkpoint as ckpt_lib


def load_trained(cfg, workdir: Path, use_ema: bool = True) -> tuple:
  """(unet, conditioner, clip_text, vae) from WORKDIR's latest train-ldm checkpoint: its EMA
  weights (`use_ema`) or its current ones."""
  return load_trained_step(cfg, workdir, use_ema)[1]


def load_trained_step(cfg, workdir: Path, use_ema: bool = True) -> tuple[int, tuple]:
  """(step, models) of `load_trained`: the step of the checkpoint actually read (the newest one
  that restores; a damaged newer one is skipped)."""
  lego_ldm.check(cfg)
  mesh = sharding.make_mesh(cfg.mesh.shape)
  graphdefs, params = lego_ldm.abstract(cfg)
  trained = lego_ldm.trained_names(cfg)
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, sharding.state_shardings(mesh, params))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = {"frozen": {n: v for n, v in placed.items() if n not in trained},
            ("ema" if use_ema else "trained"): {n: placed[n] for n in trained},
            "latent_scale": jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)}
  with ckpt_lib.Checkpointer(Path(workdir) / "checkpoints" / "ldm", reader=True) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
          f"no LDM checkpoint in {ckpt.directory}: run `lego-jax train-ldm` first")
    step, state, _ = ckpt.restore(target, partial=True)
  weights = dict(state["frozen"], **state["ema" if use_ema else "trained"])
  return int(step), lego_ldm.models_from(graphdefs, weights, state["latent_scale"])


def to_uint8(images: np.ndarray, mode: str) -> np.ndarray:
  """Decoded images (B, H, W, 3) -> uint8: per-image min-max (the release) or clamp [-1, 1]."""
  x = np.asarray(images, np.float32)
  if mode == "minmax":
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    x = (x - lo) / np.maximum(hi - lo, 1e-8)
  elif mode == "clamp":
    x = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0
  else:
    raise ValueError(f"sampler.output_norm={mode!r}: minmax or clamp")
  return (x * 255.0).round().astype(np.uint8)


def frames_uint8(frames) -> np.ndarray:
  """Pipeline frames (uint8) as they are; float frames in [-1, 1] clamped to uint8."""
  x = np.asarray(frames)
  return x if x.dtype == np.uint8 else to_uint8(x, "clamp")


def match_colour(frames: jax.Array, inputs: jax.Array) -> jax.Array:
  """Each frame (B, H, W, C) plus the per-channel median over its pixels of (input - frame).

  A sampled frame can drift in colour as a whole (a tint over the table and wall that the action
  does not touch); an edit changes a minority of the pixels, so the median difference from the
  input is that drift and not the edit. Colour correction of img2img results toward the source
  image is common practice in Stable Diffusion front ends; the median is what keeps it off the
  edited pixels. Measured on the tiny demo: docs/experiments/heldout-combinations.md, Run 18."""
  b, c = frames.shape[0], frames.shape[-1]
  offset = jnp.median((inputs - frames).reshape(b, -1, c), axis=1)
  return frames + offset[:, None, None, :].astype(frames.dtype)


@nnx.jit(static_argnames=("num_steps", "kind", "use_image", "use_text", "scaling", "guided",
                         "schedule", "prediction_type", "strength", "colour_match"))
def generate_latents(unet, conditioner, clip_text, vae, input_images, text_ids, empty_ids, h_img,
                     h_txt, key, text_scale, image_scale, *, num_steps: int, kind: str,
                     use_image: bool, use_text: bool, scaling: float, guided: bool = True,
                     schedule: NoiseSchedule = NoiseSchedule(),
                     prediction_type: str = "epsilon", strength: float = 1.0,
                     colour_match: str = "none"):
  """input frames (B,H,W,3) (uint8, or float in [-1,1]) + text ids + VLLM features -> decoded
  frames (B,H,W,3); colour_match "median": `match_colour` toward the input frames."""
  frames = images_lib.frames_to_unit_range(input_images)
  image_latent = vae.mode(frames)
  text = clip_text(text_ids)
  cond = conditioner(text, h_img, h_txt, use_image=use_image, use_text=use_text)
  empty = jnp.broadcast_to(clip_text(empty_ids), text.shape)
  uncond = conditioner.unconditional(empty, h_img.shape[1], use_image=use_image,
                                     use_text=use_text)
  z = sampler_lib.sample(unet, image_latent, cond, uncond, key, num_steps=num_steps, kind=kind,
                         text_scale=text_scale, image_scale=image_scale, guided=guided,
                         schedule=schedule, prediction_type=prediction_type,
                         strength=strength, latent_scale=scaling)
  decoded = vae.decode(z / scaling)
  if colour_match == "median":
    return match_colour(decoded, frames.astype(decoded.dtype))
  if colour_match != "none":
    raise ValueError(f"colour_match={colour_match!r}: none or median")
  return decoded


def run_batch(models, batch: dict, text_ids: np.ndarray, empty_ids: np.ndarray, cfg, key, *,
              text_scale=None, image_scale=None, num_steps: int | None = None):
  """The configured sampler on one batch; `text_scale`, `image_scale`, `num_steps` replace
  cfg.sampler's. Scales given as arrays are traced: new values reuse the compiled program (and
  always run the guided 3-way batch, even at (1, 1))."""
  unet, conditioner, clip_text, vae = models
  s, t = cfg.sampler, cfg.ldm_train
  text_scale = s.text_guidance if text_scale is None else text_scale
  image_scale = s.image_guidance if image_scale is None else image_scale
  return generate_latents(
      unet, conditioner, clip_text, vae, jnp.asarray(batch["input"]), jnp.asarray(text_ids),
      jnp.asarray(empty_ids), jnp.asarray(batch["h_img"]), jnp.asarray(batch["h_txt"]), key,
      text_scale, image_scale, num_steps=int(num_steps or s.num_steps), kind=s.kind,
      use_image=t.use_image_embedding, use_text=t.use_text_embedding,
      scaling=float(vae.config.scaling_factor),
      guided=not sampler_lib.unguided(text_scale, image_scale),
      # the model's training schedule and target (ldm_train.zero_terminal_snr, prediction_type)
      schedule=lego_ldm.schedule_of(cfg), prediction_type=lego_ldm.prediction_type_of(cfg),
      strength=float(s.strength), colour_match=s.get("colour_match", "none"))
