"""import-features: the release's .npy H_i / H_t files -> the feature records train-ldm reads
(values, order, resumption, and one-line errors on missing, truncated and misshapen files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import release_features as rf
from lego_jax import config as config_lib
from lego_jax.config import ConfigError
from lego_jax.data import features, prepare

REPO = Path(__file__).resolve().parents[2]
DIM, N_IMG = 24, 4
IDS = [("clipA", "0"), ("clipA", "1"), ("clipB", "3"), ("clipC", "0"), ("clipC", "7")]


def _release(root: Path, rng):
  """Annotation, frames and the release's feature trees (image_0 "jpg" -> "npy")."""
  annotation, arrays = {}, {}
  for k, (clip, aid) in enumerate(IDS):
    rel0 = f"{clip}/{aid}/{clip}_{100 + k:06d}.jpg"
    rel1 = f"{clip}/{aid}/{clip}_{130 + k:06d}.jpg"
    for rel in (rel0, rel1):
      (root / "val" / rel).parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (16, 28, 3), dtype=np.uint8)).save(root / "val" / rel)
    annotation.setdefault(clip, {})[aid] = {"image_0": rel0, "image_1": rel1,
                                            "action": "#C C opens the door",
                                            "llava_forecast_finetune": f"description {k}"}
    h_img = rng.normal(size=(N_IMG, DIM)).astype(np.float16)
    h_txt = rng.normal(size=(5 + 40 * k, DIM)).astype(np.float16)  # 5 .. 165 steps: > 77 too
    img_path = root / "img" / rel0.replace("jpg", "npy")
    txt_path = root / "txt" / rel0.replace("jpg", "npy")
    for p in (img_path, txt_path):
      p.parent.mkdir(parents=True, exist_ok=True)
    np.save(img_path, h_img)
    if k == 2:  # a (T, L, D) stack of every position: the last position is the feature
      np.save(txt_path, np.stack([np.zeros_like(h_txt), h_txt], axis=1))
    else:
      np.save(txt_path, h_txt)
    arrays[f"{clip}/{aid}"] = (h_img, h_txt, f"description {k}")
  (root / "ego4d_val.json").write_text(json.dumps(annotation))
  return arrays


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("rel")
  arrays = _release(root, np.random.default_rng(0))
  cfg = config_lib.load("lego_ego4d")
  cfg.data.update(source="lego_json", annotation_test=str(root / "ego4d_val.json"),
                  frames_dir=str(root / "val"), image_size=16, num_shards=1, num_workers=0)
  cfg.conditioner.llm_dim = DIM
  # Frames and records only (no tokenizer): what import-features and the loader read.
  workdir = root / "work"
  prepare.convert_release(cfg.data, workdir)
  return cfg, root, workdir, arrays


def _workdir(prepared, path: Path) -> Path:
  """A fresh workdir sharing the fixture's pair records."""
  path.mkdir()
  os.symlink(prepared[2] / "records", path / "records")
  return path


def _stored(workdir):
  info = features.read_info(workdir / "features", "test")
  src = features.open_source(workdir / "features", "test")
  return info, [features.decode(src[i]) for i in range(len(src))]


def test_release_npy_become_the_feature_records_train_ldm_reads(prepared, tmp_path):
  cfg, root, _, arrays = prepared
  workdir = _workdir(prepared, tmp_path / "w")
  info = rf.import_split(cfg, workdir, "test", root / "img", root / "txt", part_size=2,
                         progress=False)
  assert info["complete"] and info["num_parts"] == 3 and info["num_records"] == 5
  assert (info["dtype"], info["n_img"], info["dim"]) == ("float16", N_IMG, DIM)
  _, stored = _stored(workdir)
  assert [r["id"] for r in stored] == [f"{c}/{a}" for c, a in IDS]  # the split's record order
  for i, r in enumerate(stored):
    h_img, h_txt, desc = arrays[r["id"]]
    assert r["index"] == i and r["description"] == desc and r["tokens"] == []
    np.testing.assert_array_equal(r["h_img"], h_img)
    np.testing.assert_array_equal(r["h_txt"], h_txt)  # every step kept; padded/cut at read time
  # The train-ldm / generate loader: H_t zero-padded or truncated to 77 rows, as the release.
  from lego_jax.train import ldm

  cfg = cfg.copy_and_resolve_references()
  cfg.ldm_train.text_source = "annotation"
  batch = next(iter(ldm.loader_for(cfg, workdir, "test", 5, train=False)))
  for i, (c, a) in enumerate(IDS):
    h_img, h_txt, _ = arrays[f"{c}/{a}"]
    np.testing.assert_array_equal(batch["h_img"][i], h_img.astype(np.float32))
    want = np.zeros((77, DIM), np.float32)
    want[:min(77, len(h_txt))] = h_txt[:77]
    np.testing.assert_array_equal(batch["h_txt"][i], want)

  # Resumable: a lost part is rewritten, the others kept as they are; other inputs are refused.
  part0, part2 = features.part_path(workdir / "features", "test", 0), \
      features.part_path(workdir / "features", "test", 2)
  before = part0.stat().st_mtime_ns
  part2.unlink()
  features.write_info(workdir / "features", "test", dict(info, complete=False))
  again = rf.import_split(cfg, workdir, "test", root / "img", root / "txt", part_size=2,
                          progress=False)
  assert again["complete"] and part0.stat().st_mtime_ns == before
  assert [r["id"] for r in _stored(workdir)[1]] == [r["id"] for r in stored]
  with pytest.raises(ConfigError, match="other inputs or settings"):
    rf.import_split(cfg, workdir, "test", root / "img", root / "txt", part_size=3, progress=False)


def test_bad_feature_files_are_named(prepared, tmp_path):
  cfg, root, _, _ = prepared
  rel = "clipA/1/clipA_000101.npy"
  for case in ("missing", "truncated", "width", "dtype"):
    bad = tmp_path / case
    for tree in ("img", "txt"):
      for p in (root / tree).rglob("*.npy"):
        dst = bad / tree / p.relative_to(root / tree)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    target = bad / "txt" / rel
    if case == "missing":
      target.unlink()
    elif case == "truncated":
      target.write_bytes(target.read_bytes()[:-100])
    elif case == "width":
      np.save(target, np.zeros((3, DIM + 1), np.float16))
    else:
      np.save(target, np.zeros((3, DIM), np.int32))
    workdir = _workdir(prepared, tmp_path / f"w_{case}")
    message = {"missing": "H_t feature file missing: ", "truncated": "unreadable or truncated: ",
               "width": r"shape \(3, 25\), expected \(rows, 24\)", "dtype": "dtype int32"}[case]
    with pytest.raises(rf.FeatureFileError, match=message) as e:
      rf.import_split(cfg, workdir, "test", bad / "img", bad / "txt", part_size=2,
                      progress=False)
    assert rel in str(e.value) and "\n" not in str(e.value)
    # the bad example's part is not written (nothing half-written); the split stays incomplete
    assert features.done_parts(workdir / "features", "test") == set()
    assert not features.is_complete(workdir / "features", "test")


def test_cli_missing_file_is_one_line_exit_1(prepared, tmp_path):
  """A missing feature file is a data error: exit 1, one line naming it, nothing half-written."""
  _, root, _, _ = prepared
  txt = tmp_path / "txt"
  for p in (root / "txt").rglob("*.npy"):
    if p.name != "clipB_000102.npy":
      (txt / p.relative_to(root / "txt")).parent.mkdir(parents=True, exist_ok=True)
      (txt / p.relative_to(root / "txt")).write_bytes(p.read_bytes())
  workdir = _workdir(prepared, tmp_path / "w")
  proc = subprocess.run(
      [sys.executable, "-m", "lego_jax", "import-features", f"--workdir={workdir}",
       f"--config={REPO / 'configs/lego_ego4d.py'}", "--config.data.source=lego_json",
       f"--config.data.annotation_test={root / 'ego4d_val.json'}", "--split=test",
       "--config.conditioner.llm_dim=24", f"--image_features={root / 'img'}",
       f"--text_features={txt}", "--import_part_size=2"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "lego-jax import-features: error: H_t feature file missing: "
      f"{txt / 'clipB/3/clipB_000102.npy'}")
  assert features.done_parts(workdir / "features", "test") == {0}  # the part before it is kept
  # A missing directory is a usage error (exit 2 through the CLI), named before anything runs.
  cfg = prepared[0]
  with pytest.raises(FileNotFoundError, match="--text_features directory not found: .*nowhere"):
    rf.import_split(cfg, _workdir(prepared, tmp_path / "w2"), "test", root / "img",
                    tmp_path / "nowhere", progress=False)
