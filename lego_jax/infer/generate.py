"""`lego-jax generate`: action frames from input frames, the whole LEGO pipeline joined.

Batch mode (a records split, with the features `lego-jax extract` wrote):
    lego-jax generate --split=test [--config.sampler.num_steps=100]
writes WORKDIR/generated/<run>/{generated,reference,inputs}/<id>.png (matching names, what
`lego-jax evaluate` pairs) plus a PNG grid, generated.json (id, action, description).
Single-frame mode:
    lego-jax generate --image=FRAME --action="cut the carrot" [--out=DIR]
runs the trained VLLM for the description and H_i / H_t first.

Generation per frame: input latent = VAE mode (unscaled); context from the conditioner; the
sampler (Euler ancestral over the 1000 CompVis sigmas, dual guidance in one 3-way batch, or the
conditional row alone when both scales are 1) as ONE jitted program; decode z / the latent scale
the LDM trained with (0.18215 for SD's VAE); per-image min-max normalisation (the release) or
clamping; resize back to the input's size (bicubic).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from PIL import Image
from tqdm.auto import tqdm

from lego_jax.data import images as images_lib
from lego_jax.infer import sampler as sampler_lib

_RUN = flags.DEFINE_string("run_name", None, "generate: name of this generation run")
_LIMIT = flags.DEFINE_integer("limit", 0, "generate: at most this many examples (0: all)")
_BATCH = flags.DEFINE_integer("gen_batch_size", 16, "generate: frames per sampler call")


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


@nnx.jit(static_argnames=("num_steps", "kind", "use_image", "use_text", "scaling", "guided"))
def generate_latents(unet, conditioner, clip_text, vae, input_images, text_ids, empty_ids, h_img,
                     h_txt, key, text_scale, image_scale, *, num_steps: int, kind: str,
                     use_image: bool, use_text: bool, scaling: float, guided: bool = True):
  """input frames (B,H,W,3) (uint8, or float in [-1,1]) + text ids + VLLM features -> decoded
  frames (B,H,W,3)."""
  image_latent = vae.mode(images_lib.frames_to_unit_range(input_images))
  text = clip_text(text_ids)
  cond = conditioner(text, h_img, h_txt, use_image=use_image, use_text=use_text)
  empty = jnp.broadcast_to(clip_text(empty_ids), text.shape)
  uncond = conditioner.unconditional(empty, h_img.shape[1], use_image=use_image,
                                     use_text=use_text)
  z = sampler_lib.sample(unet, image_latent, cond, uncond, key, num_steps=num_steps, kind=kind,
                         text_scale=text_scale, image_scale=image_scale, guided=guided)
  return vae.decode(z / scaling)


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
      guided=not sampler_lib.unguided(text_scale, image_scale))


def safe_name(id_: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", id_)


def grid_png(rows: list[list[np.ndarray]], path: Path) -> None:
  """rows of same-size uint8 images -> one PNG."""
  strips = [np.concatenate(r, axis=1) for r in rows]
  Image.fromarray(np.concatenate(strips, axis=0)).save(path)


def generate_split(cfg, workdir: Path, split: str, out: Path, models=None, limit: int = 0,
                   batch_size: int = 16) -> dict:
  """Generates every example of `split`; writes generated/reference/inputs PNGs + generated.json."""
  from lego_jax.data import pipeline
  from lego_jax.train import ldm

  models = models or ldm.load_trained(cfg, workdir, use_ema=cfg.sampler.use_ema)
  text_ids = ldm.TextIds(cfg, workdir)
  empty = text_ids.empty()
  loader = ldm.loader_for(cfg, workdir, split, batch_size, train=False)
  dirs = {k: out / k for k in ("generated", "reference", "inputs")}
  for d in dirs.values():
    d.mkdir(parents=True, exist_ok=True)
  key = jax.random.key(cfg.sampler.seed)
  entries, grid_rows = [], []
  bar = tqdm(desc=f"generate {split}", unit="frame", total=limit or None)
  for batch in loader:
    arrays = ldm.batch_arrays(cfg, batch, text_ids)
    b = len(arrays["input"])
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(batch["index"]))
    decoded = run_batch(models, arrays, arrays["text_ids"], empty, cfg, keys)
    gen = to_uint8(np.asarray(decoded), cfg.sampler.output_norm)
    ref = frames_uint8(batch["target"])
    inp = frames_uint8(batch["input"])
    for i in range(b):
      name = safe_name(str(batch["id"][i])) + ".png"
      size = (int(batch["width"][i]), int(batch["height"][i]))
      for d, img in ((dirs["generated"], gen[i]), (dirs["reference"], ref[i]), (dirs["inputs"], inp[i])):
        pil = Image.fromarray(img)
        if pil.size != size:  # back to the input's size and aspect ratio
          pil = pil.resize(size, Image.BICUBIC)
        pil.save(d / name)
      entries.append({"id": str(batch["id"][i]), "file": name, "action": str(batch["action"][i]),
                      "description": text_ids.texts(batch)[i], "index": int(batch["index"][i])})
      if len(grid_rows) < 8:
        grid_rows.append([inp[i], gen[i], ref[i]])
    bar.update(b)
    if limit and len(entries) >= limit:
      break
  bar.close()
  (out / "generated.json").write_text(json.dumps(entries, indent=2))
  if grid_rows:
    grid_png(grid_rows, out / "grid.png")
  return {"num": len(entries), "out": str(out)}


def training_sample_callback(cfg, workdir: Path, graphdefs, num: int = 4):
  """A train-ldm callback: every `sample_every` steps, EMA samples of `num` val frames as a PNG
  (input | sample | target rows) under WORKDIR/samples/ and in TensorBoard."""
  from lego_jax.data import pipeline
  from lego_jax.train import ldm
  from lego_jax.train.common import MetricWriter

  split = "val"
  text_ids = ldm.TextIds(cfg, workdir)
  loader = ldm.loader_for(cfg, workdir, split, num, train=False)
  batch = next(iter(loader))
  arrays = ldm.batch_arrays(cfg, batch, text_ids)
  empty = text_ids.empty()
  out_dir = Path(workdir) / "samples"
  out_dir.mkdir(parents=True, exist_ok=True)
  writer = MetricWriter(Path(workdir) / "logs" / "ldm_samples")

  def callback(step, state):
    models = ldm.models_from(graphdefs, dict(state["frozen"], **state["ema"]),
                             state["latent_scale"])
    decoded = run_batch(models, arrays, arrays["text_ids"], empty, cfg, jax.random.key(cfg.sampler.seed))
    gen = to_uint8(np.asarray(decoded), cfg.sampler.output_norm)
    inp, ref = frames_uint8(arrays["input"]), frames_uint8(arrays["target"])
    rows = [[inp[i], gen[i], ref[i]] for i in range(len(gen))]
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    Image.fromarray(grid).save(out_dir / f"step_{step:07d}.png")
    writer.image(step, "samples/input|ema_sample|target", grid)

  return callback


def main(cfg, workdir: Path) -> int:
  from lego_jax.cli import UserError

  FLAGS = flags.FLAGS
  if FLAGS.image or FLAGS.action:
    from lego_jax.infer import single

    return single.generate_one(cfg, workdir, FLAGS.image, FLAGS.action, flags.FLAGS.out)
  split = FLAGS.split or "test"
  run = _RUN.value or f"{cfg.name.replace('/', '_')}_{split}"
  out = Path(flags.FLAGS.out) if flags.FLAGS.out else Path(workdir) / "generated" / run
  result = generate_split(cfg, workdir, split, out, limit=_LIMIT.value, batch_size=_BATCH.value)
  if result["num"] == 0:
    raise UserError(f"split {split!r} has no examples")
  print(f"generate: {result['num']} frames -> {out} (grid: {out / 'grid.png'})")
  return 0
