"""`lego-jax evaluate`: score generated action frames against the ground truth.

    lego-jax evaluate --generated=DIR --reference=DIR [--inputs=DIR] [--name=run]
                      [--runs=name1=dir1,name2=dir2] [--config.eval.weights_dir=W]
                      [--edit_file=annotations.json [--llava_key=llava_forecast_finetune]]

Images pair by relative path (suffix ignored): `lego-jax generate`'s generated/ pairs with its own
reference/ and inputs/ and with the release's ground-truth folders as they are (val_gt_for_metric/
for --reference; for --inputs the release's val/, whose <clip>/<action>/ folders hold the input
beside the action frame: a pair without an input of its own path takes the folder's first file in
name order, as the release's EgoVLP+ does). Writes, under WORKDIR/eval/:
  <name>/metrics.json    set-level metrics (PSNR, LPIPS x3, FID, CLIP, EgoVLP, EgoVLP+), skips
  <name>/per_image.csv   one row per pair
  results.md/.html       the paper-style table: every run under WORKDIR/eval, the --runs, and the
                         paper's Ego4D rows for comparison; LPIPS there is cfg.eval.lpips_net's
                         on [0, 1] inputs as the release computed it (lpips_release_range=True,
                         the paper configs), a [-1, 1] value is marked †
Metrics whose weights are missing are skipped with the reason (PSNR needs none). With --runs
only (no --generated), just the table is written.

BLIP-B / BLIP-L (lego_jax/eval/blip.py): the generated frame's BLIP caption vs the pair's enriched
description (from the LEGO annotation JSON --edit_file, key --llava_key), cosine of their EgoVLP
text embeddings; captions are written to <name>/captions_blip_b.json / captions_blip_l.json.

As the release: a generated image of another size than its reference is resized to it (bilinear)
before PSNR/LPIPS; CLIP, FID and EgoVLP see each image at its own size; EgoVLP+ resizes the
frame to its input frame's size.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from lego_jax.config import ConfigError
from lego_jax.errors import UserError
from lego_jax.eval import fid as fid_lib
from lego_jax.eval import images as im
from lego_jax.eval import inception as inception_lib
from lego_jax.eval import table as table_lib
from lego_jax.eval.blip import build_blip_score, description_for
from lego_jax.eval.clip_score import build_clip, clip_embeddings
from lego_jax.eval.egovlp import build_egovlp, cosine, egovlp_embed, egovlp_plus_embed
from lego_jax.eval.lpips import NETS, build_lpips, lpips_distance
from lego_jax.eval.psnr import psnr
from lego_jax.eval.weight_files import MissingWeightsError, find_weights
from lego_jax.weights.io import WeightFileError
from lego_jax.weights.mapping import KeyMappingError

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "eval")


def _flag(kind: str, name: str, default, help_text: str):
  """Defines --name unless another module of the same process already did (tests import several
  command modules into one process); returns a getter of its value."""
  if name not in flags.FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text)
  return lambda: flags.FLAGS[name].value


_GENERATED = _flag("string", "generated", None, "directory of generated frames")
_REFERENCE = _flag("string", "reference", None, "directory of ground-truth action frames")
_INPUTS = _flag("string", "inputs", None, "directory of the input frames (for EgoVLP+)")
_NAME = _flag("string", "name", None, "run name (table row); default: the generated dir name")
_RUNS = _flag("string", "runs", "", "more table rows: name=DIR,... (DIR holds metrics.json)")
_ALLOW_MISSING = _flag("bool", "allow_missing", False,
                       "score the complete pairs when the sets do not match")
_EVAL_BATCH = _flag("integer", "eval_batch_size", 16, "images per network call")
_FID_CACHE = _flag("string", "fid_cache_dir", "",
                   "reference FID statistics cache (default ~/.cache/lego_jax/fid)")
_PAPER_ROWS = _flag("bool", "paper_rows", True, "add the paper's Ego4D rows to the table")
_EDIT_FILE = _flag("string", "edit_file", None,
                   "LEGO annotation JSON holding each pair's enriched description (BLIP scores)")
_LLAVA_KEY = _flag("string", "llava_key", "llava_forecast_finetune",
                   "the annotation field with the enriched description (BLIP scores)")


# The image metrics run by default from Python; the BLIP caption scores also need --edit_file.
DEFAULT_METRICS = ("psnr", "lpips", "fid", "clip", "egovlp", "egovlp_plus")
METRICS = DEFAULT_METRICS + ("blip_b", "blip_l")


@dataclasses.dataclass
class Networks:
  lpips: dict                       # net name -> LPIPS model
  inception: object | None = None
  inception_weights: Path | None = None
  clip: object | None = None
  egovlp: object | None = None
  blip: object | None = None        # lego_jax.eval.blip.BlipScore


def build_networks(metrics: Sequence[str], weights_dir: str, dataset: str, egovlp_frames: int,
                   have_inputs: bool, num_pairs: int, descriptions: dict | None = None,
                   no_description: str = "") -> tuple[Networks, dict[str, str]]:
  """Every requested network that can be built; the others land in `skipped` with the reason."""
  expected = (MissingWeightsError, WeightFileError, KeyMappingError)
  nets, skipped = Networks(lpips={}), {}
  if "lpips" in metrics:
    for net in NETS:
      try:
        nets.lpips[net] = build_lpips(net, weights_dir)
      except expected as e:
        skipped[f"lpips_{net}"] = str(e)
  if "fid" in metrics:
    if num_pairs < 2:
      skipped["fid"] = f"FID needs at least 2 images per set, got {num_pairs}"
    else:
      try:
        nets.inception = inception_lib.build_inception(weights_dir)
        nets.inception_weights = find_weights(weights_dir, "fid")
      except expected as e:
        skipped["fid"] = str(e)
  if "clip" in metrics:
    try:
      nets.clip = build_clip(weights_dir)
    except expected as e:
      skipped["clip"] = str(e)
  wants_ego = [m for m in ("egovlp", "egovlp_plus") if m in metrics]
  if "egovlp_plus" in wants_ego and not have_inputs:
    skipped["egovlp_plus"] = "EgoVLP+ needs the input frames: pass --inputs=DIR"
    wants_ego.remove("egovlp_plus")
  if wants_ego:
    try:
      nets.egovlp = build_egovlp(weights_dir, dataset, egovlp_frames)
    except expected as e:
      for m in wants_ego:
        skipped[m] = str(e)
  wants_blip = [m for m in ("blip_b", "blip_l") if m in metrics]
  if wants_blip and (descriptions is None or no_description):
    reason = no_description or ("the BLIP scores compare captions with the enriched descriptions: "
                                "pass --edit_file=<LEGO annotation JSON>")
    skipped.update({m: reason for m in wants_blip})
  elif wants_blip:
    nets.blip, reasons = build_blip_score(weights_dir, dataset, wants_blip, descriptions)
    skipped.update(reasons)
  return nets, skipped


def _by_shape(arrays: Sequence[np.ndarray], fn: Callable, batch: int, *more) -> np.ndarray:
  """fn over same-shaped stacks of `arrays` (and aligned `more` lists), results in input order.

  Stacks are padded to a multiple of `batch` (repeating the last item) so each shape compiles once.
  """
  groups: dict[tuple, list[int]] = {}
  for i, a in enumerate(arrays):
    groups.setdefault(a.shape, []).append(i)
  out = [None] * len(arrays)
  for idx in groups.values():
    for s in range(0, len(idx), batch):
      part = idx[s:s + batch]
      pad = part + [part[-1]] * (batch - len(part))
      stacks = [np.stack([seq[i] for i in pad]) for seq in (arrays,) + more]
      res = np.asarray(fn(*stacks))
      for j, i in enumerate(part):
        out[i] = res[j]
  return np.stack(out)


def check_images(pairs: Sequence[im.Pair], limit: int = 20) -> list[str]:
  """Opens every file's header (cheap): unreadable ones raise one error listing them all; pairs
  whose sizes differ are returned as note lines."""
  bad, resized = [], []
  for p in pairs:
    sizes = {}
    for role, path in (("generated", p.generated), ("reference", p.reference), ("input", p.input)):
      if path is None:
        continue
      try:
        with Image.open(path) as f:
          sizes[role] = f.size
      except Exception as e:
        bad.append(f"{path}: {type(e).__name__}: {e}")
    if "generated" in sizes and "reference" in sizes and sizes["generated"] != sizes["reference"]:
      (gw, gh), (rw, rh) = sizes["generated"], sizes["reference"]
      resized.append(f"{p.key}: generated {gw}x{gh}, reference {rw}x{rh}")
  if bad:
    raise im.ImageSetError("\n".join(im.culprit_listing("unreadable images", bad, limit)))
  return im.culprit_listing("pairs of different sizes (generated resized to the reference for "
                            "PSNR/LPIPS)", resized, limit)


def _score_chunk(chunk, nets: Networks, metrics, egovlp_frames: int, batch: int, put,
                 gen_acts: list, ref_acts: list, need_ref_acts: bool) -> None:
  """Every per-image metric for one chunk of pairs; pool3 activations appended to the lists."""
  gens = [im.to_unit(im.read_rgb(p.generated)) for p in chunk]
  refs = [im.to_unit(im.read_rgb(p.reference)) for p in chunk]
  # The release resizes the generated image to the reference's size before pixel metrics.
  gen_at_ref = [g if g.shape == r.shape else np.asarray(im.resize(jnp.asarray(g), r.shape[:2]))
                for g, r in zip(gens, refs)]
  if "psnr" in metrics:
    put("psnr", _by_shape(refs, lambda r, g: psnr(g, r), batch, gen_at_ref))
  for net, model in nets.lpips.items():
    for release in (False, True):
      vals = _by_shape(refs, lambda r, g: lpips_distance(model, g, r, release_range=release),
                       batch, gen_at_ref)
      put(f"lpips_{net}" + ("_release_range" if release else ""), vals)
  if nets.clip is not None:
    eg = _by_shape(gens, lambda x: clip_embeddings(nets.clip, x), batch)
    er = _by_shape(refs, lambda x: clip_embeddings(nets.clip, x), batch)
    put("clip", np.sum(eg * er, axis=-1))
  if nets.inception is not None:
    pool3 = lambda x: inception_lib.pool3_features(nets.inception, x)  # noqa: E731
    gen_acts.append(_by_shape(gens, pool3, batch))
    if need_ref_acts:
      ref_acts.append(_by_shape(refs, pool3, batch))
  if nets.egovlp is not None:
    if "egovlp" in metrics:
      eg = _by_shape(gens, lambda x: egovlp_embed(nets.egovlp, x, egovlp_frames), batch)
      er = _by_shape(refs, lambda x: egovlp_embed(nets.egovlp, x, egovlp_frames), batch)
      put("egovlp", cosine(eg, er))
    if "egovlp_plus" in metrics and chunk[0].input is not None:
      inps = [im.to_unit(im.read_rgb(p.input)) for p in chunk]
      fit = lambda xs: [x if x.shape == i.shape else  # noqa: E731
                        np.asarray(im.resize(jnp.asarray(x), i.shape[:2]))
                        for x, i in zip(xs, inps)]
      emb = lambda i, x: egovlp_plus_embed(nets.egovlp, i, x, egovlp_frames)  # noqa: E731
      put("egovlp_plus", cosine(_by_shape(inps, emb, batch, fit(gens)),
                                _by_shape(inps, emb, batch, fit(refs))))
  if nets.blip is not None:
    scores = nets.blip.score([p.key for p in chunk], [p.generated for p in chunk], pad_to=batch)
    for name, values in scores.items():
      put(name, values)


def score_pairs(pairs: Sequence[im.Pair], nets: Networks, metrics: Sequence[str],
                egovlp_frames: int, batch: int = 16, fid_cache: str | os.PathLike | None = None,
                progress: bool = True) -> tuple[dict[str, list[float]], dict[str, float], dict]:
  """Runs every built network over the pairs.

  Returns (per-image columns, set-level values (FID), FID details).
  """
  per: dict[str, list[float]] = {}
  gen_acts, ref_acts = [], []
  fid_info: dict = {}
  ref_stats = cache = key = None
  if nets.inception is not None:
    cache = fid_lib.StatsCache(fid_cache or fid_lib.default_cache_dir())
    key = fid_lib.set_key([p.reference for p in pairs], nets.inception_weights)
    ref_stats = cache.load(key)
    fid_info = {"reference_stats": str(cache.path(key)), "cache_hit": ref_stats is not None}

  def put(name, values):
    per.setdefault(name, []).extend(float(v) for v in np.asarray(values))

  chunks = range(0, len(pairs), batch)
  if progress:
    chunks = tqdm(chunks, desc="evaluate", unit="batch", file=sys.stderr)
  # Full fp32 matmuls/convs: GPUs otherwise default to TF32-like precision, which moves FID and
  # LPIPS away from the PyTorch numbers they are compared with.
  with jax.default_matmul_precision("highest"):
    for start in chunks:
      _score_chunk(pairs[start:start + batch], nets, metrics, egovlp_frames, batch, put,
                   gen_acts, ref_acts, need_ref_acts=ref_stats is None)
  set_level = {}
  if nets.inception is not None:
    mu_g, sigma_g = fid_lib.activation_statistics(np.concatenate(gen_acts))
    if ref_stats is None:
      mu_r, sigma_r = fid_lib.activation_statistics(np.concatenate(ref_acts))
      cache.save(key, mu_r, sigma_r, len(pairs))
    else:
      mu_r, sigma_r, _ = ref_stats
    set_level["fid"] = fid_lib.frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
  return per, set_level, fid_info


def run_evaluation(generated: str, reference: str, out_dir: str | os.PathLike, *,
                   inputs: str | None = None, name: str | None = None,
                   metrics: Sequence[str] = DEFAULT_METRICS,
                   weights_dir: str = "", dataset: str = "ego4d", lpips_net: str = "alex",
                   lpips_release_range: bool = False, egovlp_frames: int = 4,
                   allow_missing: bool = False, batch: int = 16, fid_cache: str | None = None,
                   progress: bool = True, edit_file: str | None = None,
                   llava_key: str = "llava_forecast_finetune") -> dict:
  """Scores one generated set; writes `<out_dir>/<name>/metrics.json` and `per_image.csv`."""
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise ConfigError(f"unknown metrics {unknown} in cfg.eval.metrics; known: {list(METRICS)}")
  pairs = im.match_sets(generated, reference, inputs, allow_missing=allow_missing)
  notes = check_images(pairs)
  for line in notes:
    print(line, file=sys.stderr)
  descriptions, no_description = _descriptions(pairs, edit_file, llava_key)
  nets, skipped = build_networks(metrics, weights_dir, dataset, egovlp_frames,
                                 have_inputs=inputs is not None, num_pairs=len(pairs),
                                 descriptions=descriptions, no_description=no_description)
  for metric, reason in skipped.items():
    print(f"skipped {metric}: {reason}", file=sys.stderr)
  per, set_level, fid_info = score_pairs(pairs, nets, metrics, egovlp_frames, batch, fid_cache,
                                         progress)
  summary = {k: float(np.mean(v)) for k, v in per.items()}
  summary.update(set_level)
  headline = f"lpips_{lpips_net}" + ("_release_range" if lpips_release_range else "")
  if headline in summary:
    summary["lpips"] = summary[headline]
  elif "lpips" in metrics:
    skipped["lpips"] = skipped.get(f"lpips_{lpips_net}", f"{headline} not computed")
  name = name or Path(generated).resolve().name
  result = {
      "name": name, "generated": str(generated), "reference": str(reference),
      "inputs": str(inputs) if inputs else None, "num_pairs": len(pairs), "dataset": dataset,
      "metrics": summary, "skipped": skipped, "notes": notes, "fid": fid_info,
      "settings": {"lpips_net": lpips_net, "lpips_release_range": lpips_release_range,
                   "egovlp_frames": egovlp_frames, "weights_dir": weights_dir,
                   "metrics": list(metrics), "edit_file": edit_file, "llava_key": llava_key},
  }
  run_dir = Path(out_dir) / name
  run_dir.mkdir(parents=True, exist_ok=True)
  _write_json(run_dir / "metrics.json", result)
  columns = sorted(per)
  with open(run_dir / "per_image.csv.tmp", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["key", "generated", "reference"] + columns)
    for i, p in enumerate(pairs):
      w.writerow([p.key, str(p.generated), str(p.reference)] + [_fmt(per[c][i]) for c in columns])
  os.replace(run_dir / "per_image.csv.tmp", run_dir / "per_image.csv")
  if nets.blip is not None:
    for metric, captions in nets.blip.captions.items():
      _write_json(run_dir / f"captions_{metric}.json", captions)
  return result


def _descriptions(pairs: Sequence[im.Pair], edit_file: str | None,
                  llava_key: str) -> tuple[dict | None, str]:
  """pair key -> enriched description from the annotation JSON, or the reason there are none."""
  if not edit_file:
    return None, ""
  try:
    edits = json.loads(Path(edit_file).read_text())
  except (OSError, json.JSONDecodeError) as e:
    return None, f"--edit_file {edit_file}: unreadable ({e})"
  found = {p.key: description_for(edits, p.key, llava_key) for p in pairs}
  missing = [k for k, v in found.items() if not isinstance(v, str)]
  if missing:
    return None, (f"{len(missing)} pairs have no '{llava_key}' in {edit_file} (looked up as "
                  f"edits[clip_id][action_id] of clip_id/action_id/frame), e.g. {missing[:3]}")
  return found, ""


def _fmt(x: float) -> str:
  return "inf" if math.isinf(x) else f"{x:.6f}"


def _write_json(path: Path, data: dict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
  os.replace(tmp, path)


def write_results_table(eval_dir: str | os.PathLike, runs: str = "", dataset: str = "ego4d",
                        with_paper: bool = True) -> tuple[Path, Path, str]:
  """results.md / results.html in `eval_dir`: paper rows, every run under eval_dir, --runs."""
  rows = table_lib.paper_rows(dataset) if with_paper else []
  rows += table_lib.collect_runs([eval_dir])
  for run_name, path in table_lib.parse_runs(runs):
    rows.append(table_lib.read_run(path, run_name))
  title = f"{dataset}: generated vs ground-truth action frames"
  md, ht = table_lib.write_tables(rows, eval_dir, title)
  return md, ht, table_lib.markdown(rows, title)


def main(cfg, workdir) -> int:
  eval_dir = Path(workdir) / "eval"
  gen, ref = _GENERATED(), _REFERENCE()
  if not gen and not _RUNS():
    raise UserError("pass --generated=DIR --reference=DIR (or --runs=name=DIR,... for a table)")
  if gen and not ref:
    raise UserError("--reference=DIR is required with --generated")
  dataset = cfg.data.dataset
  if gen:
    e = cfg.eval
    try:
      result = run_evaluation(
          gen, ref, eval_dir, inputs=_INPUTS(), name=_NAME(), metrics=tuple(e.metrics),
          weights_dir=e.weights_dir, dataset=dataset, lpips_net=e.lpips_net,
          lpips_release_range=e.lpips_release_range, egovlp_frames=e.egovlp_frames,
          allow_missing=_ALLOW_MISSING(), batch=_EVAL_BATCH(),
          fid_cache=_FID_CACHE() or None, edit_file=_EDIT_FILE(), llava_key=_LLAVA_KEY())
    except im.ImageSetError as err:
      raise UserError(str(err)) from None
    print(f"metrics: {eval_dir / result['name'] / 'metrics.json'}")
  try:
    md, ht, text = write_results_table(eval_dir, _RUNS(), dataset, _PAPER_ROWS())
  except (FileNotFoundError, json.JSONDecodeError) as err:
    raise UserError(f"--runs: {err}") from None
  print(text)
  print(f"table: {md} and {ht}")
  return 0
