"""`lego-jax import-features`: the release's VLLM features (.npy H_i / H_t) -> feature records.

The release ships the features its LDM trained and sampled on (~500 GB; scripts/
download_vllm_features.sh) as one .npy file per example and stream:
  <image root>/<image_0 with "jpg" replaced by "npy">   H_i, (256, 5120) float16
  <text root>/<image_0 with "jpg" replaced by "npy">    H_t, (T, 5120) float16 (T generated steps;
                                                        (T, L, 5120) files keep the last L row)
with <image root> e.g. vllm_image_feature/llava-llama-2-13b-chat-forecasting-finetune-ckpt450/val
(egogen_dataset.py builds the path exactly so: os.path.join(root, image_0.replace('jpg', 'npy'))).
This command writes them, in the split's record order, as the records `lego-jax extract` writes
(lego_jax/data/features.py), so `train-ldm` and `generate` run on the release's own features:

    lego-jax import-features --config=configs/lego_ego4d.py --workdir=W --split=test \
        --image_features=ROOT/vllm_image_feature/<model>/val \
        --text_features=ROOT/vllm_text_feature/<model>/val

The description of each record is the annotation's llava_forecast_finetune (the text the release
pairs with those features); token ids are not shipped and stay empty. Each example's files are
checked (present, complete, 2-D or 3-D, float16/float32, the config's width, one H_i row count
for the split); the first bad one stops the run with one line naming it. Streaming and resumable:
parts of --import_part_size records are written atomically, a rerun keeps the finished parts and refuses
other settings; info.json is marked complete at the end.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from absl import flags
from tqdm.auto import tqdm

from lego_jax.config import ConfigError
from lego_jax.data import features, pipeline, records
from lego_jax.errors import UserError

_IMAGE = flags.DEFINE_string("image_features", None,
                             "import-features: root of the release's H_i .npy files of the split")
_TEXT = flags.DEFINE_string("text_features", None,
                            "import-features: root of the release's H_t .npy files of the split")
_PART = flags.DEFINE_integer("import_part_size", 64, "import-features: records per written part "
                             "(memory: part_size x ~2.6 MB at full size)")

CONFIG_SECTIONS = ("data", "conditioner")
CLI_FLAGS = ("split",)
STORED_DTYPES = (np.float16, np.float32)


class FeatureFileError(ValueError):
  """A release feature file that is missing, truncated or of the wrong shape or dtype."""


def feature_path(root: Path, image_0: str) -> Path:
  """The release's name of an example's feature file (all "jpg" in the path become "npy")."""
  return Path(root) / image_0.replace("jpg", "npy")


def load_feature(path: Path, kind: str, dim: int) -> np.ndarray:
  """One .npy file -> (rows, dim) array in its stored dtype; FeatureFileError names the file."""
  if not path.is_file():
    raise FeatureFileError(f"{kind} feature file missing: {path}")
  try:
    x = np.load(path, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    raise FeatureFileError(f"{kind} feature file unreadable or truncated: {path} ({e})") from None
  if kind == "H_t" and x.ndim == 3:  # per-step stacks of every position: the last one, as the
    x = x[:, -1, :]                  # release's dataset reads them
  if kind == "H_i" and x.ndim == 3 and x.shape[0] == 1:
    x = x[0]
  if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
    raise FeatureFileError(f"{kind} feature file {path}: shape {x.shape}, expected (rows, {dim}) "
                           "(cfg.conditioner.llm_dim)")
  if x.dtype not in STORED_DTYPES:
    raise FeatureFileError(f"{kind} feature file {path}: dtype {x.dtype}, expected float16 "
                           "(the release) or float32")
  return x


def annotation_examples(annotation_path: str | Path) -> dict[str, tuple[str, str]]:
  """record id "<clip>/<action>" -> (image_0, llava_forecast_finetune) from the annotation."""
  from data_prep.lego_json import read_json

  ann = read_json(annotation_path, "annotation JSON")
  out = {}
  for clip, actions in (ann.items() if isinstance(ann, dict) else ()):
    for aid, f in (actions.items() if isinstance(actions, dict) else ()):
      if isinstance(f, dict) and isinstance(f.get("image_0"), str):
        desc = f.get("llava_forecast_finetune")
        out[f"{clip}/{aid}"] = (f["image_0"], desc if isinstance(desc, str) else "")
  return out


def import_split(cfg, workdir: Path, split: str, image_root: Path, text_root: Path,
                 part_size: int = 64, progress: bool = True) -> dict:
  """Writes WORKDIR/features/<split> from the release's .npy files; returns its info."""
  annotation = cfg.data.get(f"annotation_{split}", "")
  if not annotation:
    raise ConfigError(f"cfg.data.annotation_{split} is empty: the feature files are found by the "
                      "annotation's image_0 paths")
  for what, root in (("--image_features", image_root), ("--text_features", text_root)):
    if not Path(root).is_dir():
      raise FileNotFoundError(f"{what} directory not found: {root}")
  examples = annotation_examples(annotation)
  src = records.open_split(pipeline.records_dir_of(cfg.data, workdir), split, records.PAIRS)
  n = len(src)
  dim = int(cfg.conditioner.llm_dim)
  num_parts = math.ceil(n / part_size)
  out_dir = Path(workdir) / "features"
  settings = {"model": "release .npy features", "image_features": str(Path(image_root).resolve()),
              "text_features": str(Path(text_root).resolve()), "annotation":
              str(Path(annotation).resolve()), "part_size": int(part_size)}
  info = {"split": split, "complete": False, "num_parts": num_parts, "num_records": n,
          "part_size": int(part_size), "dtype": None, "dim": dim, "n_img": None,
          "settings": settings}
  try:
    previous = features.read_info(out_dir, split)
  except FileNotFoundError:
    previous = None
  if previous is not None:
    if previous.get("settings") != settings or previous.get("num_records") != n:
      raise ConfigError(f"{features.split_dir(out_dir, split)} holds features written from other "
                        "inputs or settings; delete that directory to import again")
    if previous.get("complete") and features.is_complete(out_dir, split):
      return dict(previous, kept=True)
    info = previous
  done = features.done_parts(out_dir, split)
  finished = sum(min(part_size, n - k * part_size) for k in done if k < num_parts)
  with tqdm(total=n, initial=finished, desc=f"import-features {split}", unit="ex",
            disable=not progress) as bar:
    for k in range(num_parts):
      if k in done:
        continue
      blobs = []
      for i in range(k * part_size, min(n, (k + 1) * part_size)):
        rid = records.to_python(src[i])["id"]
        if rid not in examples:
          raise FeatureFileError(f"{split} record {i} ({rid}) is not in {annotation}")
        image_0, description = examples[rid]
        h_img = load_feature(feature_path(image_root, image_0), "H_i", dim)
        h_txt = load_feature(feature_path(text_root, image_0), "H_t", dim)
        dtype = "float16" if h_img.dtype == np.float16 and h_txt.dtype == np.float16 else "float32"
        if info["n_img"] is None:  # the split's first example fixes the row count and dtype
          info.update(n_img=int(h_img.shape[0]), dtype=dtype)
          features.write_info(out_dir, split, info)
        if h_img.shape[0] != info["n_img"]:
          raise FeatureFileError(f"H_i feature file {feature_path(image_root, image_0)}: "
                                 f"{h_img.shape[0]} rows, the split's others have {info['n_img']}")
        blobs.append(features.encode(i, rid, description, [], h_img, h_txt, info["dtype"]))
        bar.update(1)
      features.write_part(out_dir, split, k, blobs)
  total = sum(features.part_path(out_dir, split, k).stat().st_size for k in range(num_parts))
  info = dict(info, complete=True, total_bytes=total, bytes_per_example=total / n if n else 0.0)
  features.write_info(out_dir, split, info)
  return info


def main(cfg, workdir: Path) -> int:
  split = flags.FLAGS.split
  if not split or not _IMAGE.value or not _TEXT.value:
    raise UserError("pass --split=SPLIT --image_features=DIR --text_features=DIR (the release's "
                    "vllm_image_feature/<model>/<split> and vllm_text_feature/<model>/<split>)")
  if _PART.value < 1:
    raise UserError(f"--import_part_size={_PART.value} must be at least 1")
  try:
    info = import_split(cfg, Path(workdir), split, Path(_IMAGE.value), Path(_TEXT.value),
                        _PART.value)
  except FeatureFileError as e:
    print(f"lego-jax import-features: error: {e}", file=sys.stderr)
    return 1
  print(f"import-features: {info['num_records']} {split} records ({info['dtype']}, H_i "
        f"{info['n_img']}x{info['dim']}) -> {features.split_dir(Path(workdir) / 'features', split)}")
  return 0
