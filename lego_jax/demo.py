"""`lego-jax demo`: the whole LEGO pipeline on the embedded default, with the evidence.

    lego-jax demo [--workdir=DIR] [--config.demo.scale=0.1] [--config.section.key=value ...]

One process runs every stage through its own module (the same code as the separate commands):
prepare-data (synthetic scenes -> ArrayRecord, tokenizer) -> train-vae -> train-vllm -> extract
(descriptions R, H_i, H_t) -> train-ldm (LEGO: text R + H_i + H_t) -> train-ldm again as the
action-label-only baseline (configs/ablations/ip2p_action.py semantics: text_source="action", no
VLLM embeddings; in WORKDIR/baseline_action_label) -> generate both on the held-out test split ->
score both, the "copy the input frame" baseline and the ground truth passed through the trained
VAE (what any generated frame can reach at best) -> WORKDIR/report.html, WORKDIR/metrics.json,
WORKDIR/report/*.png (example grid, loss curves).

Scores (lego_jax/eval/action_region.py): whole-frame PSNR (where copying the input is strong),
PSNR inside the action mask, the placement of the hand and the acted-on object (IoU, centroid
hits), and LPIPS (whole frame and action region) when its weights are in cfg.eval.weights_dir,
else listed as skipped with the reason.

Every stage resumes from what a previous run left in WORKDIR (checkpoints, records, features), so
an interrupted demo continues where it stopped. `cfg.demo.scale` multiplies every training stage's
step count (0.05: a smoke run of the same code path in a few minutes); `cfg.demo.num_test` limits
the held-out frames generated (0: the whole test split).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lego_jax.baseline import BASELINE_DIR, baseline_config, link_vae  # noqa: F401  (demo.* names used by tests)
from lego_jax.config import ConfigError
from lego_jax.data import pipeline, records
from lego_jax.data import prepare as prepare_stage
from lego_jax.errors import UserError
from lego_jax.eval import action_region
from lego_jax.eval import evaluate as evaluate_stage
from lego_jax.eval import report as report_lib
from lego_jax.eval.lpips import build_lpips, lpips_distance
from lego_jax.eval.weight_files import MissingWeightsError
from lego_jax.infer import extract as extract_stage
from lego_jax.infer import generate as generate_stage
from lego_jax.infer import sampler as sampler_lib
from lego_jax.train import ldm as ldm_stage
from lego_jax.train import vae as vae_stage
from lego_jax.train import vllm as vllm_stage
from lego_jax.train.common import read_metrics
from lego_jax.weights.io import WeightFileError
from lego_jax.weights.mapping import KeyMappingError

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "vae", "vae_train", "clip_vision", "llama", "llava", "vllm_train",
                   "vllm_generate", "unet", "clip_text", "conditioner", "ldm_train", "sampler",
                   "eval", "demo", "mesh", "checkpoint")


DEFAULTS = {"scale": 1.0, "num_test": 0, "grid_rows": 8, "shipped": True, "shipped_sampler": {}}
# method -> how the report names it
METHODS = {
    "lego": "LEGO (VLLM description + H_i + H_t)",
    "action_label": "action label only (InstructPix2Pix fine-tuned)",
    "copy_input": "copy the input frame",
    "vae_roundtrip": "ground truth through the VAE (the ceiling)",
}
# metric -> (label, higher is better, unit)
HEADLINE = {
    "region_psnr": ("PSNR in the action region", True, "dB"),
    "outside_psnr": ("PSNR outside the action region (scene kept)", True, "dB"),
    "placement": ("placement IoU (new hand + object pixels)", True, ""),
    "hand_iou": ("hand IoU", True, ""),
    "hand_hit": ("hand centroid within 1/8 frame", True, ""),
    "hand_error": ("hand centroid error (frame widths)", False, ""),
    "object_iou": ("moved-object IoU", True, ""),
    "region_lpips": ("LPIPS in the action region", False, ""),
    "frame_psnr": ("PSNR, whole frame", True, "dB"),
    "frame_lpips": ("LPIPS, whole frame", False, ""),
}


def settings(cfg) -> dict:
  """cfg.demo with defaults for the keys a config leaves out."""
  out = dict(DEFAULTS)
  if "demo" in cfg:
    unknown = sorted(set(cfg.demo.keys()) - set(DEFAULTS))
    if unknown:
      raise ConfigError(f"unknown config key(s) cfg.demo.{', cfg.demo.'.join(unknown)} "
                        f"(known: {', '.join(sorted(DEFAULTS))})")
    out.update({k: cfg.demo[k] for k in cfg.demo.keys()})
  if not out["scale"] > 0:
    raise ConfigError(f"cfg.demo.scale={out['scale']} must be positive")
  over = dict(out["shipped_sampler"] or {})
  bad = sorted(set(over) - set(cfg.sampler.keys()))
  if bad:
    raise ConfigError(f"cfg.demo.shipped_sampler: {', '.join(bad)} not a cfg.sampler key "
                      f"(known: {', '.join(sorted(cfg.sampler.keys()))})")
  # checked here, not when the first frame is sampled ten minutes of training later
  sampler_lib.check_settings(cfg.sampler)
  sampler_lib.check_settings(over, "cfg.demo.shipped_sampler")
  out["shipped_sampler"] = over
  return out


def scaled_config(cfg, scale: float):
  """A copy of cfg whose training stages run `scale` times their steps (at least 1), logging
  often enough for a loss curve, checkpointing at least at the end, without the LDM's
  training-time samples (the demo generates its own)."""
  cfg = cfg.copy_and_resolve_references()
  for name in ("vae_train", "vllm_train", "ldm_train"):
    t = cfg[name]
    if t.num_steps > 0:  # vllm_train may count epochs instead (num_steps -1)
      t.num_steps = max(1, int(round(t.num_steps * scale)))
      t.log_every = max(1, min(t.log_every, t.num_steps // 20))
      t.ckpt_every = min(t.ckpt_every, t.num_steps)
  cfg.ldm_train.sample_every = 0
  return cfg


class Stages:
  """Runs named stages, prints a header for each, records wall and CPU seconds."""

  def __init__(self):
    self.timings: dict[str, dict[str, float]] = {}
    self.start = time.perf_counter()

  @staticmethod
  def _cpu() -> float:
    # This process (all its threads) plus reaped children (Grain's worker processes).
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime

  def run(self, name: str, fn: Callable, *args, **kwargs):
    print(f"\n== demo: {name} ==", flush=True)
    wall, cpu = time.perf_counter(), self._cpu()
    result = fn(*args, **kwargs)
    self.timings[name] = {"wall_s": round(time.perf_counter() - wall, 1),
                          "cpu_s": round(self._cpu() - cpu, 1)}
    print(f"== {name}: {self.timings[name]['wall_s']:.0f} s wall, "
          f"{self.timings[name]['cpu_s']:.0f} s CPU ==", flush=True)
    return result

  def total(self) -> dict[str, float]:
    return {"wall_s": round(time.perf_counter() - self.start, 1),
            "cpu_s": round(sum(t["cpu_s"] for t in self.timings.values()), 1)}


def _stage_main(module, cfg, workdir: Path) -> None:
  code = module.main(cfg, workdir)
  if code:
    raise RuntimeError(f"{module.__name__} ended with status {code}")


def _extract(cfg, workdir: Path) -> dict:
  _stage_main(extract_stage, cfg, workdir)
  out = {}
  for split in records.split_names(pipeline.records_dir_of(cfg.data, workdir), records.PAIRS):
    p = Path(workdir) / extract_stage.FEATURES_DIR / split / "accuracy.json"
    if p.exists():
      out[split] = json.loads(p.read_text())
  return out


def _generate(cfg, workdir: Path, out: Path, limit: int, models=None) -> dict:
  shutil.rmtree(out, ignore_errors=True)  # no frames of an earlier, longer run left to score
  return generate_stage.generate_split(cfg, workdir, "test", out, models=models, limit=limit,
                                       batch_size=min(16, limit) if limit else 16)


def vae_roundtrip(cfg, workdir: Path, reference_dir: Path, out: Path, files: list[str],
                  batch_size: int = 16, model=None) -> Path:
  """The ground-truth frames encoded (posterior mode) and decoded by the trained VAE (or
  `model`), as PNGs in `out`: every generated frame is decoded by that VAE, so these score the
  ceiling."""
  model = model or vae_stage.load_trained(cfg, workdir)
  roundtrip = jax.jit(lambda m, x: m(x))
  out.mkdir(parents=True, exist_ok=True)
  for i in range(0, len(files), batch_size):
    names = files[i:i + batch_size]
    x = np.stack([_read_png(reference_dir / f) for f in names]).astype(np.float32) / 127.5 - 1
    y = np.asarray(roundtrip(model, x))
    frames = np.clip((y + 1) * 127.5, 0, 255).round().astype(np.uint8)
    for f, frame in zip(names, frames):
      (out / f).parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(frame).save(out / f)
  return out


# ---------------------------------------------------------------------------------- scoring

def _read_png(path: Path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def load_examples(cfg, workdir: Path, generated_json: Path) -> list[dict]:
  """The scored examples, in generation order: id, file, action, description, mask (H, W) bool
  at the PNGs' size, meta (the synthetic scene's), and the ground-truth description."""
  src = records.open_split(pipeline.records_dir_of(cfg.data, workdir), "test", records.PAIRS)
  out = []
  for entry in json.loads(generated_json.read_text()):
    r = records.to_python(src[entry["index"]])
    if r["id"] != entry["id"]:
      raise RuntimeError(f"test record {entry['index']} is {r['id']}, generated.json says "
                         f"{entry['id']}")
    if not r["mask_png"]:
      raise UserError("the demo's action-region scores need the synthetic scenes' action masks; "
                      f"test record {r['id']} has none (use cfg.data.source='synthetic')")
    with Image.open(io.BytesIO(r["mask_png"])) as m:
      mask = m.convert("L")
    out.append(dict(entry, mask_image=mask, meta=records.read_meta(r),
                    reference_description=r["description"]))
  return out


def region_lpips_fn(cfg) -> tuple[Callable | None, str | None]:
  """(LPIPS over [0, 1] crops, None) when its weights are there, else (None, why not)."""
  try:
    model = build_lpips(cfg.eval.lpips_net, cfg.eval.weights_dir)
  except (MissingWeightsError, WeightFileError, KeyMappingError) as e:
    return None, str(e)
  return (lambda a, b: np.asarray(lpips_distance(model, jnp.asarray(a), jnp.asarray(b)))), None


def score(cfg, workdir: Path, runs: dict[str, Path], examples: list[dict]) -> dict:
  """Whole-frame scores through `lego-jax evaluate`'s code and the action-region scores, for
  every method; -> {"methods": {method: {metric: value}}, "skipped": {...}, "per_example": ...}."""
  eval_dir = Path(workdir) / "eval"
  lpips_fn, lpips_skip = region_lpips_fn(cfg)
  reference_dir = runs["lego"] / "reference"
  dirs = {"lego": runs["lego"] / "generated", "action_label": runs["action_label"] / "generated",
          "copy_input": runs["lego"] / "inputs"}
  if "vae_roundtrip" in runs:
    dirs["vae_roundtrip"] = runs["vae_roundtrip"]
  refs = [_read_png(reference_dir / e["file"]) for e in examples]
  inputs = [_read_png(runs["lego"] / "inputs" / e["file"]) for e in examples]
  masks = []
  for e, r in zip(examples, refs):
    m = e["mask_image"]
    if m.size != (r.shape[1], r.shape[0]):
      m = m.resize((r.shape[1], r.shape[0]), Image.Resampling.NEAREST)
    masks.append(np.asarray(m) > 127)
  methods, skipped, per_example = {}, {}, {}
  for method, gen_dir in dirs.items():
    frame = evaluate_stage.run_evaluation(
        str(gen_dir), str(reference_dir), eval_dir, name=method, metrics=("psnr", "lpips"),
        weights_dir=cfg.eval.weights_dir, dataset=cfg.data.dataset, lpips_net=cfg.eval.lpips_net,
        progress=False)
    gens = [_read_png(gen_dir / e["file"]) for e in examples]
    summary, per = action_region.score_set(gens, refs, inputs, masks,
                                           [e["meta"] for e in examples], lpips_fn=lpips_fn)
    row = {"frame_psnr": frame["metrics"]["psnr"], **summary}
    if "lpips" in frame["metrics"]:
      row["frame_lpips"] = frame["metrics"]["lpips"]
    else:
      skipped["frame_lpips"] = frame["skipped"].get("lpips", "not computed")
    methods[method] = row
    per_example[method] = per
  if lpips_skip:
    skipped["region_lpips"] = lpips_skip
  evaluate_stage.write_results_table(eval_dir, with_paper=False)
  return {"methods": methods, "skipped": skipped, "per_example": per_example,
          "by_combination": combination_split(examples, per_example)}


_DESTINATION = re.compile(  # a pick-up's, or (synthetic push) a push's
    r"(?:put it down|until it stands) (on the left side|in the middle|on the right side)")


def stated_facts(examples: list[dict]) -> dict[str, float]:
  """How often the VLLM's description states the ground-truth description's hand and (for a
  pick-up that puts the object down elsewhere) destination: under the combination rules only the
  descriptions carry them, so this is what LEGO's VLLM brings to a held-out combination."""
  out: dict[str, float] = {}
  for fact, read in (("hand", extract_stage.named_hand),
                     ("destination", lambda t: (m := _DESTINATION.search(t)) and m.group(1))):
    hits = [read(e["description"]) == read(e["reference_description"])
            for e in examples if read(e["reference_description"])]
    out[fact] = float(np.mean(hits)) if hits else float("nan")
    out[f"{fact}_count"] = len(hits)
  return out


def combination_split(examples: list[dict], per_example: dict[str, dict]) -> dict:
  """The region scores again on the test frames whose verb-kind combination the LDM's training
  pairs showed ("seen") and on those they held out ("held_out"; cfg.data.synthetic.holdout),
  with LEGO minus the label-only LDM as paired per-example differences with standard errors.
  {} when the test records carry no such mark (the plain synthetic world, a real release)."""
  flags = [e["meta"].get("combination_seen") for e in examples]
  if not flags or any(f is None for f in flags):
    return {}
  out = {}
  for group, want in (("seen", True), ("held_out", False)):
    select = [f == want for f in flags]
    chosen = [e for e, c in zip(examples, select) if c]
    out[group] = {
        "num_test": int(sum(select)),
        "vllm_states": stated_facts(chosen),
        "combinations": sorted({e["meta"]["combination"]
                                for e, chosen in zip(examples, select) if chosen}),
        "methods": {m: action_region.summarize(per, select) for m, per in per_example.items()},
        "lego_minus_action_label": action_region.paired_differences(
            per_example["lego"], per_example["action_label"], select),
    }
  return out


def comparisons(methods: dict[str, dict]) -> dict[str, dict[str, float]]:
  """LEGO minus each baseline, per headline metric both have (positive = LEGO higher)."""
  out = {}
  for base in ("copy_input", "action_label"):
    diffs = {}
    for k in HEADLINE:
      a, b = methods["lego"].get(k), methods[base].get(k)
      if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
        diffs[k] = a - b
    out[f"lego_minus_{base}"] = diffs
  return out


def _finite_or_none(obj):
  """JSON without NaN/inf (not valid JSON): such values become null."""
  if isinstance(obj, dict):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def _write_json(path: Path, data) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(_finite_or_none(data), indent=2, sort_keys=True))
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------- the run

def run(cfg, workdir: str | os.PathLike) -> dict:
  """Every stage, the scores, metrics.json and report.html; returns the metrics dict."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  demo = settings(cfg)
  cfg = scaled_config(cfg, float(demo["scale"]))
  baseline_dir = workdir / BASELINE_DIR
  stages = Stages()
  print(f"lego-jax demo: workdir {workdir}, scale {demo['scale']} (steps: VAE "
        f"{cfg.vae_train.num_steps}, VLLM {cfg.vllm_train.num_steps}, LDM "
        f"{cfg.ldm_train.num_steps} x 2), sampler {cfg.sampler.num_steps} steps", flush=True)

  stages.run("prepare-data", _stage_main, prepare_stage, cfg, workdir)
  stages.run("train-vae", _stage_main, vae_stage, cfg, workdir)
  stages.run("train-vllm", _stage_main, vllm_stage, cfg, workdir)
  accuracy = stages.run("extract", _extract, cfg, workdir)
  stages.run("train-ldm (LEGO)", _stage_main, ldm_stage, cfg, workdir)
  base_cfg = baseline_config(cfg, workdir)
  link_vae(workdir, baseline_dir)
  stages.run("train-ldm (action label only)", _stage_main, ldm_stage, base_cfg, baseline_dir)
  runs = {"lego": workdir / "generated" / "lego",
          "action_label": workdir / "generated" / "action_label"}
  limit = int(demo["num_test"])
  stages.run("generate (LEGO)", _generate, cfg, workdir, runs["lego"], limit)
  stages.run("generate (action label only)", _generate, base_cfg, baseline_dir,
             runs["action_label"], limit)
  examples = load_examples(cfg, workdir, runs["lego"] / "generated.json")
  runs["vae_roundtrip"] = stages.run(
      "VAE round trip of the ground truth", vae_roundtrip, cfg, workdir,
      runs["lego"] / "reference", workdir / "generated" / "vae_roundtrip",
      [e["file"] for e in examples])
  scores = stages.run("evaluate", score, cfg, workdir, runs, examples)

  metrics = {
      "num_test": len(examples),
      "methods": scores["methods"],
      "lego_vs_baselines": comparisons(scores["methods"]),
      "skipped": scores["skipped"],
      "descriptions": accuracy,
      "vae_check": _read_json(workdir / "vae_check.json"),
      "final_losses": final_losses(workdir, baseline_dir),
      "steps": {"vae": cfg.vae_train.num_steps, "vllm": cfg.vllm_train.num_steps,
                "ldm": cfg.ldm_train.num_steps, "sampler": cfg.sampler.num_steps},
      "sampler": {k: cfg.sampler[k] for k in SAMPLER_SHOWN},
      "scale": float(demo["scale"]),
      "encoders": encoders_note(cfg),
      "timings": stages.timings,
  }
  if scores["by_combination"]:
    metrics["by_combination"] = scores["by_combination"]
  if demo["shipped"]:
    metrics["shipped"] = shipped_rows(cfg, workdir, limit, stages, int(demo["grid_rows"]),
                                      demo["shipped_sampler"])
  plots = stages.run("report", write_plots, workdir, baseline_dir, runs, examples,
                     int(demo["grid_rows"]))
  metrics["timings"] = stages.timings
  metrics["total"] = stages.total()
  metrics["plots"] = plots
  _write_json(workdir / "per_example.json",
              {"ids": [e["id"] for e in examples], **scores["per_example"]})
  _write_json(workdir / "metrics.json", metrics)
  report_lib.write_html(workdir / "report.html", report_data(
      cfg, workdir, runs, examples, metrics, plots, int(demo["grid_rows"])))
  print_summary(metrics, workdir)
  return metrics


SHIPPED_DIR = "shipped"
# the sampler settings metrics.json records for each block
SAMPLER_SHOWN = ("kind", "num_steps", "text_guidance", "image_guidance", "strength",
                 "colour_match")


def shipped_rows(cfg, workdir: Path, limit: int, stages: Stages, grid_rows: int,
                 sampler: dict | None = None) -> dict:
  """The shipped checkpoints (lego_jax/assets/tiny/: the same models trained longer) on the
  demo's held-out frames, scored as the from-scratch run: their VLLM's descriptions and features
  (extract), both LDMs' generations, their VAE's round trip, in WORKDIR/shipped. `sampler`:
  cfg.sampler keys both shipped LDMs sample with instead (cfg.demo.shipped_sampler: settings
  chosen for the shipped files, which sample differently from the briefly trained models).
  {"skipped": why} when there are none or they were trained on other data settings."""
  from lego_jax.assets import shipped

  if not shipped.available():
    return {"skipped": f"no shipped checkpoints in {shipped.DIR}"}
  why = shipped.data_mismatch(cfg)
  if why:
    print(f"demo: shipped checkpoints not scored: {why}")
    return {"skipped": why}
  files = stages.run("shipped checkpoints: sha256", shipped.verify)
  sdir = Path(workdir) / SHIPPED_DIR
  records_dir = str(pipeline.records_dir_of(cfg.data, workdir).absolute())
  cfgs = {}
  for which in shipped.LDMS:
    c = shipped.config_for(cfg, which)
    c.data.records_dir = records_dir   # the demo's own held-out frames
    c.sampler.update(sampler or {})
    cfgs[which] = c if which == "lego" else baseline_config(c, sdir)
  accuracy = stages.run("extract (shipped VLLM)", _extract, cfgs["lego"], sdir)
  runs, vae = {}, None
  for which, c in cfgs.items():
    models = shipped.load_ldm(c)
    vae = models[3]
    runs[which] = sdir / "generated" / which
    stages.run(f"generate (shipped, {METHODS[which].split(' (')[0]})", _generate, c, sdir,
               runs[which], limit, models)
  examples = load_examples(cfgs["lego"], sdir, runs["lego"] / "generated.json")
  runs["vae_roundtrip"] = stages.run(
      "VAE round trip (shipped VAE)", vae_roundtrip, cfgs["lego"], sdir,
      runs["lego"] / "reference", sdir / "generated" / "vae_roundtrip",
      [e["file"] for e in examples], model=vae)
  scores = stages.run("evaluate (shipped)", score, cfgs["lego"], sdir, runs, examples)
  grid = Path(workdir) / "report" / "examples_shipped.png"
  grid.parent.mkdir(parents=True, exist_ok=True)
  shown = examples[:grid_rows]
  report_lib.example_grid_png(
      [[runs["lego"] / "inputs" / e["file"], runs["lego"] / "generated" / e["file"],
        runs["action_label"] / "generated" / e["file"], runs["lego"] / "reference" / e["file"]]
       for e in shown],
      [f"{e['action']}  |  LEGO's VLLM: {e['description']}" for e in shown],
      ["input", "LEGO (shipped)", "label only (shipped)", "ground truth"], grid, upscale=4)
  _write_json(sdir / "per_example.json",
              {"ids": [e["id"] for e in examples], **scores["per_example"]})
  meta = shipped.metadata("lego")
  out = {"num_test": len(examples), "methods": scores["methods"],
         "lego_vs_baselines": comparisons(scores["methods"]), "descriptions": accuracy,
         "files": files, "trained": {w: shipped.metadata(w)["ldm_train"] for w in shipped.LDMS},
         "grid": str(grid.relative_to(workdir)),
         "sampler": {k: cfgs["lego"].sampler[k] for k in SAMPLER_SHOWN},
         "note": (f"The same models trained longer (LDMs "
                  f"{meta.get('trained_steps', meta['ldm_train'].get('num_steps'))} "
                  f"steps; lego_jax/assets/tiny/README.md says how), loaded from "
                  f"{shipped.DIR.name}/ after their sha256 checks, generating on the same "
                  "held-out frames with " + (
                      "the same sampler settings" if not sampler else "the sampler settings "
                      "of cfg.demo.shipped_sampler (" + ", ".join(
                          f"{k}={v}" for k, v in sorted(sampler.items())) + ")")
                  + ", scored the same way.")}
  if scores["by_combination"]:
    out["by_combination"] = scores["by_combination"]
  return out


def _read_json(path: Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def encoders_note(cfg) -> str:
  """What the report says about the CLIP encoders (no pretrained weights exist offline)."""
  vision = ("loaded from cfg.vllm_train.vision_checkpoint" if cfg.vllm_train.vision_checkpoint
            else "randomly initialised")
  frozen = cfg.vllm_train.frozen
  tower_frozen = bool(frozen) and "vision" in frozen
  if tower_frozen:
    vision += (f" and frozen (vllm_train.frozen={frozen!r}): the VLLM's projector and LLaMA "
               "learn to read its random patch features")
  else:
    vision += (f", then trained briefly with the projector and LLaMA in train-vllm "
               f"(vllm_train.frozen={frozen!r}: nothing frozen)")
  return (f"CLIP vision tower (VLLM): {vision}. CLIP text encoder (LDM): randomly initialised "
          "and frozen, kept as it is: the LDM learns from its random text features (distinct "
          "texts give distinct features). The VAE is trained from scratch by train-vae.")


def final_losses(workdir: Path, baseline_dir: Path) -> dict[str, float]:
  out = {}
  for name, logdir in loss_logs(workdir, baseline_dir).items():
    rows = [r for r in read_metrics(logdir) if "loss" in r]
    if rows:
      out[name] = rows[-1]["loss"]
  return out


def loss_logs(workdir: Path, baseline_dir: Path) -> dict[str, Path]:
  return {"vae": workdir / "logs" / "vae", "vllm": workdir / "logs" / "vllm",
          "ldm": workdir / "logs" / "ldm", "ldm_action_label": baseline_dir / "logs" / "ldm"}


def write_plots(workdir: Path, baseline_dir: Path, runs: dict[str, Path], examples: list[dict],
                grid_rows: int) -> dict[str, str]:
  """Loss-curve PNGs (from each stage's logs/<stage>/metrics.jsonl) and the example grid PNG
  under WORKDIR/report; returns their paths relative to WORKDIR."""
  report_dir = workdir / "report"
  report_dir.mkdir(parents=True, exist_ok=True)
  logs = {k: read_metrics(p) for k, p in loss_logs(workdir, baseline_dir).items()}

  def series(rows):
    rows = [r for r in rows if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]

  plots = {}
  for name, title, curves in (
      ("vae", "train-vae: L1 + L2 + KL loss", {"VAE": logs["vae"]}),
      ("vllm", "train-vllm: answer-token cross-entropy", {"VLLM": logs["vllm"]}),
      ("ldm", "train-ldm: MSE of the UNet target (epsilon or v)", {"LEGO": logs["ldm"],
                                          "action label only": logs["ldm_action_label"]})):
    data = {label: series(rows) for label, rows in curves.items() if rows}
    if data:
      path = report_dir / f"loss_{name}.png"
      report_lib.line_plot(data, path, title=title, xlabel="step", ylabel="loss", log_y=True)
      plots[name] = str(path.relative_to(workdir))
  grid = report_dir / "examples.png"
  shown = examples[:grid_rows]
  report_lib.example_grid_png(
      [[runs["lego"] / "inputs" / e["file"], runs["lego"] / "generated" / e["file"],
        runs["action_label"] / "generated" / e["file"], runs["lego"] / "reference" / e["file"]]
       for e in shown],
      [{True: "seen  |  ", False: "held-out  |  "}.get(e["meta"].get("combination_seen"), "")
       + f"{e['action']}  |  LEGO's VLLM: {e['description']}" for e in shown],
      ["input", "LEGO", "label only", "ground truth"], grid, upscale=4)
  plots["examples"] = str(grid.relative_to(workdir))
  return plots


def report_data(cfg, workdir: Path, runs: dict[str, Path], examples: list[dict], metrics: dict,
                plots: dict, grid_rows: int) -> dict:
  rel = lambda p: os.path.relpath(p, workdir)
  rows = []
  for e in examples[:grid_rows]:
    rows.append({
        "images": [rel(runs["lego"] / "inputs" / e["file"]),
                   rel(runs["lego"] / "generated" / e["file"]),
                   rel(runs["action_label"] / "generated" / e["file"]),
                   rel(runs["lego"] / "reference" / e["file"])],
        "action": e["action"], "description": e["description"],
        "reference_description": e["reference_description"],
        "id": e["id"],
        "split": {True: "seen", False: "held-out"}.get(e["meta"].get("combination_seen"))})
  return {
      "title": "lego-jax demo: LEGO on the embedded synthetic scenes",
      "config_name": cfg.name, "methods": METHODS, "headline": HEADLINE, "metrics": metrics,
      "columns": ["input", "LEGO", "action label only", "ground truth"], "rows": rows,
      "plots": plots,
      "sizes": {"image": cfg.data.image_size, "unet": list(cfg.unet.block_out_channels),
                "llama": f"{cfg.llama.num_layers} layers x {cfg.llama.hidden_size}",
                "vae": list(cfg.vae.block_out_channels),
                "train_examples": cfg.data.synthetic.num_train
                if "synthetic" in cfg.data else None},
  }


def print_summary(metrics: dict, workdir: Path) -> None:
  m = metrics["methods"]
  keys = [k for k in ("region_psnr", "outside_psnr", "placement", "hand_hit", "frame_psnr", "region_lpips",
                      "frame_lpips") if all(k in m[x] for x in m)]
  print(f"\nheld-out test frames: {metrics['num_test']}")
  print(f"{'method':<14}" + "".join(f"{k:>14}" for k in keys))
  for name, row in m.items():
    print(f"{name:<14}" + "".join(f"{row[k]:>14.3f}" for k in keys))
  for base, diffs in metrics["lego_vs_baselines"].items():
    print(f"{base}: " + ", ".join(f"{k} {v:+.3f}" for k, v in diffs.items() if k in keys))
  shipped = metrics.get("shipped") or {}
  if shipped.get("methods"):
    print("shipped checkpoints (lego_jax/assets/tiny), the same frames:")
    for name, row in shipped["methods"].items():
      print(f"{name:<14}" + "".join(f"{row.get(k, float('nan')):>14.3f}" for k in keys))
  for block, split in (("", metrics.get("by_combination", {})),
                       ("shipped, ", shipped.get("by_combination", {}))):
    for group, g in split.items():
      d = g["lego_minus_action_label"]
      print(f"{block}{group} combinations ({g['num_test']} frames), LEGO - label only: "
            + ", ".join(f"{k} {d[k]:+.3f} ± {d[k + '_se']:.3f}"
                        for k in ("region_psnr", "placement", "hand_hit")
                        if k in d and math.isfinite(d[k]) and math.isfinite(d[k + "_se"])))
  for k, why in metrics["skipped"].items():
    print(f"skipped {k}: {why.splitlines()[0][:160]}")
  t = metrics["total"]
  print(f"total {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU; report: "
        f"{workdir / 'report.html'}", flush=True)


def main(cfg, workdir: Path) -> int:
  run(cfg, workdir)
  return 0
