"""`lego-jax demo` end to end at the smallest scale, plus the report's drawing helpers.

The demo runs as a user runs it: `python -m lego_jax demo` in a subprocess, on one CPU device
(the 8 fake devices the other tests use are taken out of XLA_FLAGS). Whether LEGO beats its
baselines needs the full-scale demo; here every stage must run and every score must be a number.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lego_jax.eval import report
from procs import SMALL_LDM, SMALL_VLLM

ROOT = Path(__file__).resolve().parent.parent
SMOKE = [
    "--config.demo.scale=0.01",            # 4 VAE, 6 VLLM, 3 + 3 LDM steps
    "--config.demo.num_test=8",
    "--config.data.synthetic.num_train=32",
    "--config.data.synthetic.num_val=8",
    "--config.data.synthetic.num_test=8",
    "--config.data.num_workers=0",
    "--config.sampler.num_steps=2",
    "--config.vllm_generate.max_new_tokens=8",
    "--config.checkpoint.async_save=false",
    # The smallest LLaMA, CLIP and UNet the other command tests train (compiling the tiny config's
    # models took most of this test's 3.5 minutes); the frozen encoders stay cached, the tiny
    # default's path (SMALL_LDM puts them in the step for the tests that cover that path).
    *SMALL_VLLM, *[f for f in SMALL_LDM if not f.startswith("--config.ldm_train.cache_frozen")],
]
SCORES = ("frame_psnr", "region_psnr", "outside_psnr", "placement", "hand_iou", "hand_hit", "hand_error")
STAGES = ("prepare-data", "train-vae", "train-vllm", "extract", "train-ldm (LEGO)",
          "train-ldm (action label only)", "generate (LEGO)", "generate (action label only)",
          "VAE round trip of the ground truth", "evaluate", "report")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", ""))
  # Compile time dominates this run: LLVM's optimisations of the CPU code only cost time here.
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  proc = subprocess.run([sys.executable, "-m", "lego_jax", "demo", f"--workdir={workdir}", *SMOKE],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return workdir, proc


def test_demo_writes_every_score_for_the_model_and_both_baselines(demo_run):
  workdir, _ = demo_run
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["num_test"] == 8
  assert metrics["steps"] == {"vae": 4, "vllm": 6, "ldm": 3, "sampler": 2}
  for method in ("lego", "action_label", "copy_input"):
    row = metrics["methods"][method]
    for key in SCORES:
      assert isinstance(row[key], float) and math.isfinite(row[key]), (method, key, row[key])
    assert row["placement_count"] == 8 and row["region_psnr_count"] == 8
  copy = metrics["methods"]["copy_input"]
  # Copying the input adds no hand anywhere: no overlap, no hit, the worst centroid error.
  assert copy["placement"] == 0.0 and copy["hand_hit"] == 0.0
  assert copy["hand_error"] == pytest.approx(math.sqrt(2))
  for base in ("copy_input", "action_label"):
    diffs = metrics["lego_vs_baselines"][f"lego_minus_{base}"]
    for key in SCORES:
      assert diffs[key] == pytest.approx(metrics["methods"]["lego"][key]
                                         - metrics["methods"][base][key])
  # No LPIPS weights in the test environment: skipped, and the reason names what is missing.
  assert "weights_dir" in metrics["skipped"]["region_lpips"]
  assert "weights_dir" in metrics["skipped"]["frame_lpips"]
  assert set(metrics["timings"]) == set(STAGES)
  assert set(metrics["descriptions"]) == {"train", "val", "test"}
  assert metrics["vae_check"]["val_psnr_db"] > 0
  # The ceiling: the ground truth through the trained VAE, scored like the methods, with
  # standard errors beside every mean.
  ceiling = metrics["methods"]["vae_roundtrip"]
  for key in ("frame_psnr", "region_psnr", "outside_psnr"):
    assert isinstance(ceiling[key], float) and math.isfinite(ceiling[key]), key
  for method in ("lego", "action_label", "vae_roundtrip"):
    se = metrics["methods"][method]["outside_psnr_se"]
    assert isinstance(se, float) and 0 <= se < 20


def test_demo_report_and_images(demo_run):
  workdir, proc = demo_run
  page = (workdir / "report.html").read_text()
  sources = re.findall(r"src=['\"]([^'\"]+)['\"]", page)
  # 8 examples x 4 frames + 3 loss curves, every one a file beside the page.
  assert len(sources) == 8 * 4 + 3
  for src in sources:
    assert not src.startswith(("/", "http")) and (workdir / src).is_file(), src
  for png in ("report/loss_vae.png", "report/loss_vllm.png", "report/loss_ldm.png",
              "report/examples.png"):
    assert Image.open(workdir / png).size[0] > 100
  # 4 columns of 64-px frames at 4x, nearest: every frame pixel a 4x4 block.
  grid = np.asarray(Image.open(workdir / "report/examples.png").convert("RGB"))
  assert grid.shape[1] == 4 * 4 * 64
  cell = grid[22:22 + 256, 256:512]
  assert (cell[::4, ::4] == cell[3::4, 3::4]).all()
  assert len(list((workdir / "generated" / "vae_roundtrip").rglob("*.png"))) == 8
  for run in ("lego", "action_label"):
    for kind in ("generated", "reference", "inputs"):
      assert len(list((workdir / "generated" / run / kind).rglob("*.png"))) == 8
  assert (workdir / "baseline_action_label" / "checkpoints" / "ldm").is_dir()
  assert "LEGO vs copy the input frame" in page and "Skipped" in page
  for stage in STAGES:
    assert f"== demo: {stage} ==" in proc.stdout
  assert "held-out test frames: 8" in proc.stdout
  assert "it/s" in proc.stderr or "s/it" in proc.stderr  # the stages' progress bars


def test_export_writes_a_demo_runs_models_as_shipped_files(demo_run, tmp_path):
  """The shipped recipe's last step (`python -m lego_jax.assets.shipped`) on the demo's run: the
  files verify, say the steps their checkpoints reached, and load back to the EMA weights."""
  from lego_jax import config
  from lego_jax.assets import shipped
  from lego_jax.infer import ldm as ldm_infer
  from lego_jax.weights.state import flat_params

  workdir, _ = demo_run
  overrides = [f.removeprefix("--config.") for f in SMOKE]
  out = tmp_path / "files"
  proc = subprocess.run([sys.executable, "-m", "lego_jax.assets.shipped", "configs/tiny.py",
                         str(workdir), str(out), *overrides],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert set(shipped.verify(out)) == {shipped.VLLM, shipped.TOKENIZER, *shipped.LDMS.values()}
  for which, run in (("lego", workdir), ("action_label", workdir / "baseline_action_label")):
    meta = shipped.metadata(which, out)
    newest = max(int(d.name) for d in (run / "checkpoints" / "ldm").iterdir() if d.name.isdigit())
    assert meta["trained_steps"] == newest == 3, (which, meta)
  cfg = config.load("configs/tiny.py", overrides)
  got = flat_params(shipped.load_ldm(shipped.config_for(cfg, "lego", out))[0])
  want = flat_params(ldm_infer.load_trained(cfg, workdir)[0])
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], np.asarray(want[k]).astype(np.float16).astype(np.float32), k)
  # --ldms-only (LDMs fine-tuned beside shipped VLLM and tokenizer): the same LDM files, and
  # the VLLM and tokenizer it finds in OUT kept; without them, a one-line error.
  export = lambda dest: subprocess.run(
      [sys.executable, "-m", "lego_jax.assets.shipped", "configs/tiny.py", str(workdir),
       str(dest), "--ldms-only", *overrides], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  bare = export(tmp_path / "bare")
  assert bare.returncode == 1 and "vllm.safetensors is not there" in bare.stderr, bare.stderr[-2000:]
  assert "Traceback" not in bare.stderr
  only = tmp_path / "only"
  only.mkdir()
  for n in (shipped.VLLM, shipped.TOKENIZER):
    (only / n).write_bytes((out / n).read_bytes())
  proc = export(only)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  sums = shipped.verify(only)
  assert {n: sums[n] for n in (shipped.VLLM, shipped.TOKENIZER)} == {
      n: shipped.verify(out)[n] for n in (shipped.VLLM, shipped.TOKENIZER)}
  from safetensors import safe_open
  from safetensors.numpy import load_file

  for which, name in shipped.LDMS.items():  # content, not bytes: safetensors writes its
    a, b = load_file(str(out / name)), load_file(str(only / name))  # metadata keys unordered
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), which
    with safe_open(str(out / name), "numpy") as f, safe_open(str(only / name), "numpy") as g:
      assert f.metadata() == g.metadata(), which


def test_nice_ticks_are_round_and_cover_the_range():
  assert report.nice_ticks(0, 800) == [0, 200, 400, 600, 800]
  assert report.nice_ticks(0.13, 0.96) == pytest.approx([0.2, 0.4, 0.6, 0.8])
  assert report.nice_ticks(3, 3) == [3]


def test_line_plot_draws_each_series_in_its_colour(tmp_path):
  path = report.line_plot({"a": ([0, 10, 20], [1.0, 0.5, 0.2]), "b": ([0, 20], [0.8, float("nan")])},
                          tmp_path / "p.png", title="t", xlabel="step", ylabel="loss", log_y=True)
  pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
  colours = {tuple(p) for p in pixels}
  assert report.PALETTE[0] in colours and report.PALETTE[1] in colours


def test_outcome_respects_the_metric_direction():
  assert report.outcome(+1.0, higher_better=True) == "wins"
  assert report.outcome(+1.0, higher_better=False) == "loses"
  assert report.outcome(-0.2, higher_better=False) == "wins"
  assert report.outcome(0.0, higher_better=True) == "ties"


CHROMIUM = "/usr/bin/chromium"  # Debian's chromium, as tests/serve/test_serve.py drives it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_missing() -> str | None:
  import importlib.util

  if importlib.util.find_spec("playwright") is None:
    return "playwright is not installed (launch/test.sh installs it)"
  if not os.access(CHROMIUM, os.X_OK):
    return f"{CHROMIUM} is missing (launch/test.sh installs Debian's chromium when run as root)"
  return None


def test_report_renders_in_headless_chromium(demo_run):
  """report.html as a person sees it: every image loads, the frames are 4x their size drawn
  nearest, the VLLM's description sits under each LEGO frame; the screenshot is kept in the
  workdir (report/report_chromium.png)."""
  missing = _browser_missing()
  if missing:
    pytest.skip(missing)
  import tempfile

  from playwright.sync_api import sync_playwright

  workdir, _ = demo_run
  shot = workdir / "report" / "report_chromium.png"
  with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
    context = p.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 900})
    try:
      page = context.new_page()
      page.goto((workdir / "report.html").as_uri(), wait_until="load")
      images = page.eval_on_selector_all("img", """els => els.map(e => ({
          src: e.getAttribute('src'), complete: e.complete, w: e.naturalWidth,
          h: e.naturalHeight, cw: e.clientWidth, ch: e.clientHeight, frame: e.className === 'frame',
          rendering: getComputedStyle(e).imageRendering}))""")
      rows = page.eval_on_selector_all("table.examples tr.example", """rows => rows.map(r =>
          Array.from(r.querySelectorAll('td')).map(td => {
            const c = td.querySelector('.caption'); return c ? c.innerText : null; }))""")
      page.screenshot(path=str(shot), full_page=True)
    finally:
      context.close()
  assert len(images) == 8 * 4 + 3  # 8 examples x 4 frames, 3 loss curves
  for im in images:
    assert im["complete"] and im["w"] > 0 and im["h"] > 0, im  # loaded and decoded
  frames = [im for im in images if im["frame"]]
  assert len(frames) == 8 * 4
  for im in frames:
    assert (im["w"], im["h"]) == (64, 64), im
    assert (im["cw"], im["ch"]) == (4 * im["w"], 4 * im["h"]) and im["rendering"] == "pixelated"
  # Columns: input, LEGO, action label only, ground truth (+ the action cell, no caption).
  generated = json.loads((workdir / "generated" / "lego" / "generated.json").read_text())
  assert len(rows) == 8
  for cells, entry in zip(rows, generated):
    assert cells[1] == f"the VLLM: {entry['description']}".strip(), (cells, entry)
    assert cells[0] is None and cells[2] is None and cells[3].startswith("ground truth: ")
  with Image.open(shot) as im:
    assert im.width >= 1100 and im.height > 2000  # the whole page


def test_report_marks_seen_and_held_out_examples(tmp_path):
  Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
  data = {"columns": ["input", "LEGO", "ground truth"], "rows": [
      {"images": ["a.png"] * 3, "action": f"act {k}", "id": f"ex{k}", "description": f"d{k}",
       "reference_description": f"r{k}", "split": split}
      for k, split in enumerate(["seen", "held-out", None])]}
  page = report._examples_table(data, tmp_path)
  assert page.count("<div class='split seen'>seen combination</div>") == 1
  assert page.count("<div class='split held-out'>held-out combination</div>") == 1
  assert page.count("class='split") == 2  # no mark where the data holds nothing out
  assert page.count('style="width:128px;height:128px"') == 9  # 4x a 32-px frame
  assert "<div class='caption'>the VLLM: d1</div>" in page
  assert "<div class='caption'>ground truth: r2</div>" in page


def test_shipped_sampler_settings_name_sampler_keys():
  from lego_jax import config as config_lib
  from lego_jax import demo

  cfg = config_lib.load("configs/tiny.py")
  cfg.demo = dict(scale=1.0, shipped_sampler={"kind": "ddim", "image_guidance": 2.0})
  assert demo.settings(cfg)["shipped_sampler"] == {"kind": "ddim", "image_guidance": 2.0}
  cfg.demo = dict(shipped_sampler={"image_guidence": 2.0})
  with pytest.raises(config_lib.ConfigError, match="image_guidence not a cfg.sampler key"):
    demo.settings(cfg)
  cfg.demo = dict(shipped_sampler={"kind": "euler"})   # refused before any training
  with pytest.raises(config_lib.ConfigError, match="shipped_sampler.kind='euler': one of"):
    demo.settings(cfg)
  cfg.demo = dict(scale=1.0)   # none given: the shipped files sample as the config does
  assert demo.settings(cfg)["shipped_sampler"] == {}
