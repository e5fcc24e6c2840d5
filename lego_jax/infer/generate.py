"""`lego-jax generate`: action frames from input frames, the whole LEGO pipeline joined.

Batch mode (a records split, with the features `lego-jax extract` wrote):
    lego-jax generate --split=test [--config.sampler.num_steps=100]
writes WORKDIR/generated/<run>/{generated,reference,inputs}/<clip>/<action>/<frame> (the release's
layout: <frame> is the action frame's (image_1's) file name, so `lego-jax evaluate` pairs the
generated set with the release's own ground-truth folders as they are) plus a PNG grid and
generated.json (id, file, action, description, the annotation's image_0 / image_1).
  generated/  the action frame at the release's size: height cfg.data.image_size (256), width
              round(W / H * height) with H, W the clip's metadata size (the record's height/width)
  reference/  the ORIGINAL ground-truth action frame (the record's bytes, not the 256x256 squash)
  inputs/     the ORIGINAL input frame, under the action frame's name (what EgoVLP+ reads)
sampler.image_format "release" saves each file under image_1's own name and suffix (the release's
`Image.save(<frame>.jpg)`: JPEG at PIL's default quality 75; reference and input files are then
the records' bytes, copied); "png" saves lossless PNGs (reference / input: their decoded pixels).
Single-frame mode:
    lego-jax generate --image=FRAME --action="cut the carrot" [--out=DIR]
runs the trained VLLM for the description and H_i / H_t first.

Generation per frame: the LDM's one jitted program (lego_jax/infer/ldm.py: VAE mode of the input,
conditioner, sampler, decode); per-image min-max normalisation (the release) or clamping; resize to the output size (bicubic). sampler.postprocess "release" (the release's
order: bicubic resize of the float image as torch's F.interpolate, then min-max, then x255 and
truncation to uint8) or "project" (min-max, rounding, then PIL bicubic on the uint8 image).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path, PurePosixPath

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image
from tqdm.auto import tqdm

from lego_jax.data import images as images_lib
from lego_jax.data import pipeline, records, synthetic
from lego_jax.errors import UserError
from lego_jax.eval import images as eval_images
from lego_jax.infer import ldm as ldm_infer
from lego_jax.infer import sampler as sampler_lib
from lego_jax.infer import single
from lego_jax.infer.ldm import frames_uint8, run_batch, to_uint8
from lego_jax.models import lego_ldm

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "vae", "vae_train", "unet", "clip_text", "conditioner", "ldm_train",
                   "sampler", "mesh", "name")
CLI_FLAGS = ("image", "action", "split", "out")


_RUN = flags.DEFINE_string("run_name", None, "generate: name of this generation run")
_LIMIT = flags.DEFINE_integer("limit", 0, "generate: at most this many examples (0: all)")
_BATCH = flags.DEFINE_integer("gen_batch_size", 16, "generate: frames per sampler call")


def release_postprocess(decoded: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
  """One decoded image (H, W, 3) -> uint8 (h, w, 3) in the release's order (metrics/inference.py):
  torch's bicubic F.interpolate (align_corners=False, no antialias) of the float image to `size`
  (h, w), then per-image min-max (or clamp to [-1, 1]), x255, truncated by astype(uint8)."""
  x = np.asarray(decoded, np.float32)
  if x.shape[:2] != tuple(size):
    mh = eval_images.interp_matrix(x.shape[0], size[0], "bicubic")
    mw = eval_images.interp_matrix(x.shape[1], size[1], "bicubic")
    x = np.einsum("oh,hwc->owc", mh, x)
    x = np.einsum("pw,owc->opc", mw, x).astype(np.float32)
  if mode == "minmax":
    x = (x - x.min()) / np.float32(max(float(x.max() - x.min()), 1e-8)) * np.float32(255.0)
  elif mode == "clamp":
    x = (np.clip(x, -1.0, 1.0) + np.float32(1.0)) / np.float32(2.0) * np.float32(255.0)
  else:
    raise ValueError(f"sampler.output_norm={mode!r}: minmax or clamp")
  return np.clip(x, 0, 255).astype(np.uint8)


def output_size(height: int, width: int, out_height: int) -> tuple[int, int]:
  """The release's output size (h, w): h = the generation resolution, w = round(W / H * h), W/H
  from the clip's metadata (Python's round, as the release)."""
  return out_height, max(1, round(width / height * out_height))


def safe_name(id_: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", id_)


def safe_relpath(rel: str) -> str:
  """A relative path from an annotation with each part made file-system safe (no "..", no
  absolute paths: generated files stay under the output directory)."""
  parts = [safe_name(p) for p in PurePosixPath(rel.replace("\\", "/")).parts if p not in ("/", "")]
  parts = [p if p not in (".", "..") else "_" for p in parts]
  return "/".join(parts) or "_"


def annotation_frames(cfg, workdir: Path, split: str) -> dict[str, tuple[str, str]]:
  """record id "<clip>/<action>" -> (image_0, image_1) relative paths, from the split's
  annotation JSON (cfg.data.annotation_<split>, or the synthetic data's under WORKDIR/raw);
  {} when there is none (the files are then named after the record id)."""
  d = cfg.data
  path = None
  if d.source == "synthetic":
    # prepare-data wrote the raw files beside the records (a run may read another's records)
    for root in (Path(workdir), pipeline.records_dir_of(d, workdir).parent):
      path = synthetic.release_files(root / "raw", [split]).annotations[split]
      if path.is_file():
        break
  elif d.get(f"annotation_{split}", ""):
    path = Path(d[f"annotation_{split}"])
  if path is None or not path.is_file():
    print(f"generate: no annotation JSON for split {split!r} (cfg.data.annotation_{split}): "
          "files are named <clip>/<action>/action_frame, not after the release's frames")
    return {}
  try:
    ann = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return {}
  out = {}
  for clip, actions in (ann.items() if isinstance(ann, dict) else ()):
    for aid, f in (actions.items() if isinstance(actions, dict) else ()):
      if isinstance(f, dict) and isinstance(f.get("image_0"), str) and \
          isinstance(f.get("image_1"), str):
        out[f"{clip}/{aid}"] = (f["image_0"], f["image_1"])
  return out


def output_relpath(record_id: str, frames: tuple[str, str] | None) -> str:
  """The release's relative path of a generated frame: image_1's last three parts
  (<clip>/<action>/<frame>), or <id>/<frame>.jpg without an annotation."""
  if frames is not None:
    return safe_relpath("/".join(PurePosixPath(frames[1]).parts[-3:]))
  return safe_relpath(record_id) + "/action_frame.jpg"


def _atomic_write(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _encoded(img: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  # PIL's defaults, as the release's im.save(path): JPEG quality 75, 4:2:0.
  Image.fromarray(img).save(buf, format=fmt)
  return buf.getvalue()


def write_example(dirs: dict[str, Path], rel: str, gen: np.ndarray, record: dict,
                  image_format: str) -> dict[str, str]:
  """Writes one example's generated, reference and input files (atomically); -> their relative
  paths. The reference and input are the records' ORIGINAL frames: copied byte for byte ("release"
  with a .jpg name), or their decoded pixels as PNG ("png")."""
  if image_format == "release":
    suffix = PurePosixPath(rel).suffix.lower()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(suffix)
    if fmt is None:  # another or no suffix: a .jpg, as the release's frames are
      rel, fmt = str(PurePosixPath(rel).with_suffix(".jpg")), "JPEG"
    _atomic_write(dirs["generated"] / rel, _encoded(gen, fmt))
    for d, key in (("reference", "target_jpeg"), ("inputs", "input_jpeg")):
      data = record[key]
      if fmt != "JPEG":  # the records hold JPEG bytes; a .png name gets the decoded pixels
        data = _encoded(images_lib.decode_rgb(data), fmt)
      _atomic_write(dirs[d] / rel, data)
  elif image_format == "png":
    rel = str(PurePosixPath(rel).with_suffix(".png"))
    _atomic_write(dirs["generated"] / rel, _encoded(gen, "PNG"))
    for d, key in (("reference", "target_jpeg"), ("inputs", "input_jpeg")):
      _atomic_write(dirs[d] / rel, _encoded(images_lib.decode_rgb(record[key]), "PNG"))
  else:
    raise ValueError(f"sampler.image_format={image_format!r}: release or png")
  return {"file": rel}


def grid_png(rows: list[list[np.ndarray]], path: Path) -> None:
  """rows of same-size uint8 images -> one PNG."""
  strips = [np.concatenate(r, axis=1) for r in rows]
  Image.fromarray(np.concatenate(strips, axis=0)).save(path)


def generate_split(cfg, workdir: Path, split: str, out: Path, models=None, limit: int = 0,
                   batch_size: int = 16) -> dict:
  """Generates every example of `split` (the first `limit` of them when limit > 0); writes generated/reference/inputs files in the release's
  <clip>/<action>/<frame> layout and sizes, plus generated.json (module doc)."""
  s = cfg.sampler
  sampler_lib.check_settings(s)
  postprocess, image_format = s.get("postprocess", "release"), s.get("image_format", "release")
  models = models or ldm_infer.load_trained(cfg, workdir, use_ema=s.use_ema)
  text_ids = lego_ldm.TextIds(cfg, workdir)
  empty = text_ids.empty()
  loader = lego_ldm.loader_for(cfg, workdir, split, batch_size, train=False)
  source = records.open_split(pipeline.records_dir_of(cfg.data, workdir), split, records.PAIRS)
  frames = annotation_frames(cfg, workdir, split)
  dirs = {k: out / k for k in ("generated", "reference", "inputs")}
  for d in dirs.values():
    d.mkdir(parents=True, exist_ok=True)
  key = jax.random.key(s.seed)
  entries, grid_rows, used = [], [], set()
  bar = tqdm(desc=f"generate {split}", unit="frame", total=limit or None)
  # closed on a `limit` break or an error too: the workers have the rest of the split queued
  with iter(loader) as batches:
    for batch in batches:
      arrays = lego_ldm.batch_arrays(cfg, batch, text_ids)
      b = len(arrays["input"])
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(batch["index"]))
      decoded = np.asarray(run_batch(models, arrays, arrays["text_ids"], empty, cfg, keys))
      inp = frames_uint8(batch["input"])
      texts = text_ids.texts(batch)
      # The last batch may reach past `limit`: only its first frames up to it are written.
      n = min(b, limit - len(entries)) if limit else b
      for i in range(n):
        rid, index = str(batch["id"][i]), int(batch["index"][i])
        size = output_size(int(batch["height"][i]), int(batch["width"][i]), decoded.shape[1])
        if postprocess == "release":
          gen = release_postprocess(decoded[i], size, s.output_norm)
        else:
          pil = Image.fromarray(to_uint8(decoded[i:i + 1], s.output_norm)[0])
          gen = np.asarray(pil if pil.size == size[::-1] else pil.resize(size[::-1], Image.BICUBIC))
        rel = output_relpath(rid, frames.get(rid))
        if rel in used:  # two records naming one action frame: keep both, the second renamed
          rel = str(PurePosixPath(rel).with_stem(f"{PurePosixPath(rel).stem}_{index}"))
        used.add(rel)
        record = records.to_python(source[index])
        written = write_example(dirs, rel, gen, record, image_format)
        src = frames.get(rid, ("", ""))
        entries.append({"id": rid, **written, "action": str(batch["action"][i]),
                        "description": texts[i], "index": index, "image_0": src[0],
                        "image_1": src[1], "size": [size[0], size[1]]})
        if len(grid_rows) < 8:
          sq = np.asarray(Image.fromarray(gen).resize(inp[i].shape[1::-1], Image.BICUBIC))
          ref = np.asarray(Image.fromarray(images_lib.decode_rgb(record["target_jpeg"])).resize(
              inp[i].shape[1::-1], Image.BICUBIC))
          grid_rows.append([inp[i], sq, ref])
      bar.update(n)
      if limit and len(entries) >= limit:
        break
  bar.close()
  _atomic_write(out / "generated.json", json.dumps(entries, indent=2).encode())
  if grid_rows:
    grid_png(grid_rows, out / "grid.png")
  return {"num": len(entries), "out": str(out)}


def main(cfg, workdir: Path) -> int:
  FLAGS = flags.FLAGS
  sampler_lib.check_settings(cfg.sampler)   # before the models load (both paths below)
  if FLAGS.image or FLAGS.action:
    return single.generate_one(cfg, workdir, FLAGS.image, FLAGS.action, flags.FLAGS.out)
  if _LIMIT.value < 0:
    raise UserError(f"--limit={_LIMIT.value}: give how many frames to generate (0: all)")
  split = FLAGS.split or "test"
  run = _RUN.value or f"{cfg.name.replace('/', '_')}_{split}"
  out = Path(flags.FLAGS.out) if flags.FLAGS.out else Path(workdir) / "generated" / run
  result = generate_split(cfg, workdir, split, out, limit=_LIMIT.value, batch_size=_BATCH.value)
  if result["num"] == 0:
    raise UserError(f"split {split!r} has no examples")
  print(f"generate: {result['num']} frames -> {out} (grid: {out / 'grid.png'})")
  return 0
