"""`lego-jax evaluate` end to end on tiny image sets with small random metric networks saved under
the documented file names, the FID cache, the skip reasons, and the results table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lego_jax.eval import evaluate as ev
from lego_jax.eval import images as im
from lego_jax.eval import table

REPO = Path(__file__).resolve().parents[2]


def _img(path, arr):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  """4 pairs in clip/action folders; pair 3's generated frame has another size."""
  root = tmp_path_factory.mktemp("sets")
  rng = np.random.default_rng(0)
  for i in range(4):
    key = f"clip{i // 2}/act{i}/frame_{i:04d}"
    ref = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    gen = np.clip(ref.astype(int) + rng.integers(-40, 40, ref.shape), 0, 255).astype(np.uint8)
    if i == 3:
      gen = np.asarray(Image.fromarray(gen).resize((50, 38)))
    _img(root / "ref" / f"{key}.jpg", ref)
    _img(root / "gen" / f"{key}.png", gen)
    _img(root / "inp" / f"{key}.jpg", rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
  return root


def _torch_named(model, rules, rng):
  """Random weights for `model` under the PyTorch names of `rules` (our key map, inverted)."""
  from lego_jax.weights.mapping import jax_to_torch
  from lego_jax.weights.state import param_shapes

  params = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in param_shapes(model).items()}
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in jax_to_torch(params, rules).items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """LPIPS alex (+ heads), a small CLIP snapshot and a small EgoVLP checkpoint; no VGG,
  SqueezeNet or Inception, so those are skipped with their reasons."""
  from lego_jax.eval import egovlp, lpips

  rng = np.random.default_rng(0)
  d = tmp_path_factory.mktemp("weights")
  sd = _torch_named(lpips.abstract_lpips("alex"), lpips.lpips_rules("alex"), rng)
  torch.save({k: v for k, v in sd.items() if k.startswith("features.")},
             d / "alexnet-owt-7be5be79.pth")
  torch.save({k: v.abs() for k, v in sd.items() if k.startswith("lin")}, d / "lpips_alex.pth")
  torch.manual_seed(1)
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=16))
  clip.save_pretrained(d / "clip-vit-large-patch14")
  # 64-wide tokens: the head count inferred from the file (64 per head) is 1.
  cfg = egovlp.EgoVLPConfig(embed_dim=64, depth=1, num_heads=1, patch_size=8, image_size=32,
                            projection_dim=16, num_frames=4)
  sd = _torch_named(egovlp.abstract_egovlp(cfg), egovlp.VIDEO_RULES, rng)
  torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
             d / "egovlp.pth")
  return d


def test_evaluate_writes_metrics_csv_and_skip_reasons(sets, weights, tmp_path):
  res = ev.run_evaluation(str(sets / "gen"), str(sets / "ref"), tmp_path, inputs=str(sets / "inp"),
                          name="tiny", weights_dir=str(weights), batch=2,
                          fid_cache=str(tmp_path / "cache"), progress=False)
  m = res["metrics"]
  assert res["num_pairs"] == 4
  assert set(res["skipped"]) == {"lpips_vgg", "lpips_squeeze", "fid"}
  assert "vgg16-397923af.pth" in res["skipped"]["lpips_vgg"]
  assert "pt_inception-2015-12-05-6726825d.pth" in res["skipped"]["fid"]
  for k in ("psnr", "lpips_alex", "lpips_alex_release_range", "lpips", "clip", "egovlp",
            "egovlp_plus"):
    assert np.isfinite(m[k]), k
  assert m["lpips"] == m["lpips_alex"]
  assert 5 < m["psnr"] < 40 and -1 <= m["clip"] <= 1 and -1 <= m["egovlp_plus"] <= 1
  assert any("clip1/act3/frame_0003: generated 50x38, reference 52x40" in n for n in res["notes"])

  saved = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
  assert saved["metrics"] == pytest.approx(m)
  rows = list(csv.DictReader(open(tmp_path / "tiny" / "per_image.csv")))
  assert [r["key"] for r in rows] == ["clip0/act0/frame_0000", "clip0/act1/frame_0001",
                                      "clip1/act2/frame_0002", "clip1/act3/frame_0003"]
  np.testing.assert_allclose(np.mean([float(r["psnr"]) for r in rows]), m["psnr"], rtol=1e-5)

  # PSNR of pair 3 is computed after resizing the generated image to the reference size.
  gen = im.to_unit(im.read_rgb(sets / "gen/clip1/act3/frame_0003.png"))
  ref = im.to_unit(im.read_rgb(sets / "ref/clip1/act3/frame_0003.jpg"))
  g = np.asarray(im.resize(gen, ref.shape[:2]))
  np.testing.assert_allclose(float(rows[3]["psnr"]), 10 * np.log10(1 / np.mean((g - ref) ** 2)),
                             rtol=1e-4)


class _FakeInception:
  """Cheap stand-in features so the FID bookkeeping (cache, stats) is tested without the net."""
  calls = 0


def test_fid_reference_statistics_are_cached(sets, tmp_path, monkeypatch):
  from lego_jax.eval import fid, inception

  def fake_pool3(model, x):
    _FakeInception.calls += x.shape[0]
    x = np.asarray(x)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, :4, :4].reshape(len(x), -1)], -1)

  monkeypatch.setattr(inception, "pool3_features", fake_pool3)
  wfile = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  wfile.write_bytes(b"w")
  nets = ev.Networks(lpips={}, inception=object(), inception_weights=wfile)
  pairs = im.match_sets(sets / "gen", sets / "ref")
  _, first, info1 = ev.score_pairs(pairs, nets, ["fid"], 4, batch=2, fid_cache=tmp_path / "c",
                                   progress=False)
  n_first = _FakeInception.calls
  _, second, info2 = ev.score_pairs(pairs, nets, ["fid"], 4, batch=2, fid_cache=tmp_path / "c",
                                    progress=False)
  assert not info1["cache_hit"] and info2["cache_hit"]
  # Batches of 2, padded: generated 2 + (1+1 padded) + (1+1 padded) = 6 rows, references 4;
  # the second run reads the references' statistics from the cache.
  assert n_first == 10 and _FakeInception.calls - n_first == 6
  assert second["fid"] == pytest.approx(first["fid"], rel=1e-12)
  gen = np.stack([fake_pool3(None, im.to_unit(im.read_rgb(p.generated))[None])[0] for p in pairs])
  ref = np.stack([fake_pool3(None, im.to_unit(im.read_rgb(p.reference))[None])[0] for p in pairs])
  want = fid.frechet_distance(*fid.activation_statistics(gen), *fid.activation_statistics(ref))
  assert first["fid"] == pytest.approx(want, rel=1e-6)


def test_results_table_has_paper_rows_and_runs(tmp_path):
  for name, v in (("ckpt_a", 0.6), ("ckpt_b", 0.7)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text(json.dumps({
        "name": name, "num_pairs": 10,
        "metrics": {"egovlp": v, "clip": v + 0.1, "fid": 30.0 - 10 * v, "psnr": 12.0,
                    "lpips": 0.4}, "skipped": {"egovlp_plus": "no --inputs"},
        # ckpt_b's LPIPS as the release computes it; ckpt_a's on [-1, 1] inputs (marked)
        "settings": {"lpips_release_range": name == "ckpt_b"}}))
  md, html_path, text = ev.write_results_table(tmp_path, "", "ego4d", True)
  lines = md.read_text().splitlines()
  assert "| method | EgoVLP ↑ | EgoVLP+ ↑ | CLIP ↑ | FID ↓ | PSNR ↑ | LPIPS ↓ |" in lines
  # best per column in bold, paper rows included
  assert "| LEGO [paper] | 65.65 | **80.44** | **80.61** | 23.83 | **12.29** | **36.43** |" in lines
  assert "| ckpt_b | **70.00** | – | 80.00 | **23.00** | 12.00 | 40.00 |" in lines
  assert "| ckpt_a | 60.00 | – | 70.00 | 24.00 | 12.00 | 40.00† |" in lines
  assert any(l.startswith("- ckpt_a: 10 pairs; skipped: egovlp_plus; † LPIPS on [-1, 1] inputs")
             for l in lines)
  assert not any(l.startswith("- ckpt_b") and "†" in l for l in lines)
  frag = html_path.read_text()
  assert frag.startswith('<div class="lego-results">') and "<b>23.00</b>" in frag
  assert frag.count("<tr") == 1 + 4 + 2
  assert table.paper_rows("epickitchens") == []
  assert table.parse_runs("a=x/y, z") == [("a", "x/y"), (None, "z")]


def test_cli_mismatch_lists_culprits_and_table_only_mode(sets, tmp_path):
  (tmp_path / "gen").mkdir()
  for p in sorted((sets / "gen").rglob("*.png"))[:3]:
    dst = tmp_path / "gen" / p.relative_to(sets / "gen")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(p.read_bytes())
  (tmp_path / "gen" / "stray.png").write_bytes((sets / "gen/clip0/act0/frame_0000.png").read_bytes())
  cmd = [sys.executable, "-m", "lego_jax", "evaluate", f"--workdir={tmp_path / 'w'}",
         f"--generated={tmp_path / 'gen'}", f"--reference={sets / 'ref'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 2
  assert "references with no generated image (1):" in out.stderr
  assert "  clip1/act3/frame_0003" in out.stderr
  assert "generated images with no reference (1):" in out.stderr and "  stray" in out.stderr
  assert "Traceback" not in out.stderr

  run = tmp_path / "runs" / "mine"
  run.mkdir(parents=True)
  (run / "metrics.json").write_text(json.dumps({"name": "mine", "metrics": {"psnr": 13.5}}))
  cmd = [sys.executable, "-m", "lego_jax", "evaluate", f"--workdir={tmp_path / 'w'}",
         f"--runs=ours={run}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "| ours | – | – | – | – | **13.50** | – |" in out.stdout
  assert (tmp_path / "w" / "eval" / "results.html").exists()
