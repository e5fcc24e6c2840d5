"""The comparison path end to end: a fixture laid out as the release's evaluation folders
(annotation + metadata JSON, `val/` with input and action frames at their stored size,
`val_gt_for_metric/` with the ground truth) goes through `generate` (small random LDM) and
`evaluate`, and every number equals a re-computation written here from the release's metric
definitions (metrics/all_metrics_in_one.py: torchmetrics PSNR on [0, 1], LPIPS fed [0, 1] images,
pytorch-fid at 299, ClipSimilarity) on the same files, with PyTorch references of the networks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from scipy import linalg

# PyTorch references of the metric networks, written independently of lego_jax (same folder).
from test_fid import TorchFIDInception
from test_lpips import TorchNet, torch_lpips

from lego_jax.data import prepare as prepare_lib
from lego_jax.eval import evaluate as ev
from lego_jax.infer import generate

REPO = Path(__file__).resolve().parents[2]
CLIPS = {"clipA": {"0": (100, 130), "1": (400, 431)}, "clipB": {"0": (7, 40), "2": (900, 952)}}
H, W = 1080, 1920                      # the clips' metadata size (the original videos)
RES = 32                               # generation resolution (the release's 256)
STORED = (RES, round(W / H * RES))     # frames as the release stores them: short side = RES


def _scene(rng, h, w):
  y, x = np.mgrid[:h, :w]
  base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
  return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _tiny_clip_tokenizer(path: Path) -> int:
  words = ["cut</w>", "the</w>", "carrot</w>", "open</w>", "door</w>"]
  letters = sorted(set("cuthearopdn"))
  vocab = {ch: i for i, ch in enumerate(letters + [c + "</w>" for c in letters] + words)}
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  path.mkdir(parents=True)
  (path / "vocab.json").write_text(json.dumps(vocab))
  (path / "merges.txt").write_text("#version: 0.2\n")
  transformers.CLIPTokenizer(vocab=str(path / "vocab.json"),
                             merges=str(path / "merges.txt")).save_pretrained(path)
  return len(vocab)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """The release's folders: val/<clip>/<action>/ (input and action frame), val_gt_for_metric/,
  ego4d_val.json, ego4d_metadata.json."""
  root = tmp_path_factory.mktemp("release")
  rng = np.random.default_rng(0)
  annotation, metadata = {}, {}
  for clip, actions in CLIPS.items():
    metadata[clip] = {"height": H, "width": W, "fps": 30}
    for aid, (f0, f1) in actions.items():
      rel0, rel1 = f"{clip}/{aid}/{clip}_{f0:06d}.jpg", f"{clip}/{aid}/{clip}_{f1:06d}.jpg"
      for rel in (rel0, rel1):
        (root / "val" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_scene(rng, *STORED)).save(root / "val" / rel, quality=90)
      (root / "val_gt_for_metric" / rel1).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(root / "val" / rel1, root / "val_gt_for_metric" / rel1)
      annotation.setdefault(clip, {})[aid] = {
          "image_0": rel0, "image_1": rel1, "action": "#C C cuts the carrot",
          "llava_forecast_finetune": "the person cuts the carrot"}
  (root / "ego4d_val.json").write_text(json.dumps(annotation))
  (root / "ego4d_metadata.json").write_text(json.dumps(metadata))
  return root


def _cfg(release: Path, workdir: Path):
  from lego_jax import config as config_lib

  cfg = config_lib.load("lego_ego4d")  # the paper config, made small below
  vocab = _tiny_clip_tokenizer(workdir / "clip_tok")
  cfg.data.update(source="lego_json", annotation_test=str(release / "ego4d_val.json"),
                  frames_dir=str(release / "val"), metadata=str(release / "ego4d_metadata.json"),
                  image_size=RES, num_shards=1, num_workers=0,
                  clip_tokenizer_dir=str(workdir / "clip_tok"),
                  records_dir=str(workdir / "records"))
  cfg.unet.update(block_out_channels=(16, 32), attention_levels=(False, True), num_heads=2,
                  context_dim=16, norm_groups=8)
  cfg.clip_text.update(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2)
  cfg.conditioner.update(llm_dim=24, context_dim=16, num_heads=2, ffn_dim=32, num_layers=1)
  cfg.vae.update(block_out_channels=(8,), layers_per_block=1, norm_groups=4)
  # The label as CLIP text, no VLLM streams: no feature records needed.
  cfg.ldm_train.update(text_source="action", use_image_embedding=False, use_text_embedding=False)
  cfg.sampler.num_steps = 2
  return cfg


def _random(make):
  """A model with random numpy weights (JAX's own initialisers run op by op: ~40 s of CPU here):
  norm scales 1, biases 0, the rest N(0, 0.05)."""
  from flax import nnx

  from lego_jax.weights.state import load_params, param_shapes

  model = nnx.eval_shape(make)
  rng = np.random.default_rng(0)
  return load_params(model, {
      k: (np.ones(s) if k.endswith("scale") else np.zeros(s) if k.endswith("bias")
          else rng.normal(0, 0.05, s)).astype(np.float32)
      for k, s in param_shapes(model).items()})


@pytest.fixture(scope="module")
def models(release, tmp_path_factory):
  from lego_jax.models import lego_ldm

  workdir = tmp_path_factory.mktemp("work")
  cfg = _cfg(release, workdir)
  prepare_lib.convert_release(cfg.data, workdir)
  return cfg, workdir, tuple(_random(lambda name=name: lego_ldm.build(cfg, 0)[name])
                             for name in lego_ldm.NAMES)


@pytest.fixture(scope="module")
def generated(models):
  cfg, workdir, nets = models
  out = workdir / "generated" / "run"
  res = generate.generate_split(cfg, workdir, "test", out, models=nets, batch_size=4)
  assert res["num"] == 4
  return cfg, out


def test_generate_writes_the_release_layout_size_and_original_frames(release, generated):
  cfg, out = generated
  entries = json.loads((out / "generated.json").read_text())
  want = sorted(str(p.relative_to(release / "val_gt_for_metric"))
                for p in (release / "val_gt_for_metric").rglob("*.jpg"))
  assert sorted(e["file"] for e in entries) == want        # clip/action/<image_1's name>
  for e in entries:
    with Image.open(out / "generated" / e["file"]) as im:
      # h = the generation resolution, w = round(W / H * h) from the metadata; saved as the
      # release's im.save(<frame>.jpg) saves: JPEG.
      assert (im.height, im.width, im.format) == (RES, round(W / H * RES), "JPEG")
      assert np.asarray(im).std() > 10  # min-max stretched, not a blank frame
    # the ORIGINAL frames, byte for byte: the action frame and (under its name) the input
    assert (out / "reference" / e["file"]).read_bytes() == \
        (release / "val_gt_for_metric" / e["file"]).read_bytes()
    assert (out / "inputs" / e["file"]).read_bytes() == \
        (release / "val" / e["image_0"]).read_bytes()


def test_limit_writes_that_many_frames_not_the_whole_batch(models, generated, tmp_path):
  cfg, workdir, nets = models
  _, full = generated
  out = tmp_path / "limited"
  # One batch of 4 (the compiled program of the full run), of which the first 3 are written.
  assert generate.generate_split(cfg, workdir, "test", out, models=nets, limit=3,
                                 batch_size=4)["num"] == 3
  entries = json.loads((out / "generated.json").read_text())
  assert entries == json.loads((full / "generated.json").read_text())[:3]
  for d in ("generated", "reference", "inputs"):
    assert sorted(str(p.relative_to(out / d)) for p in (out / d).rglob("*.*")) == \
        sorted(e["file"] for e in entries)
    for e in entries:
      assert (out / d / e["file"]).read_bytes() == (full / d / e["file"]).read_bytes()


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
  """LPIPS alex, pytorch-fid's Inception and a small CLIP, random, as PyTorch modules and as
  files under the names `evaluate` looks for."""
  d = tmp_path_factory.mktemp("mw")
  torch.manual_seed(0)
  alex = TorchNet("alex").eval()
  heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
           for k, c in enumerate((64, 192, 384, 256, 256))}
  torch.save(alex.state_dict(), d / "alexnet-owt-7be5be79.pth")
  torch.save(heads, d / "lpips_alex.pth")
  inception = TorchFIDInception().eval()
  with torch.no_grad():  # He-scaled weights, non-trivial BN statistics: activations O(1)
    for m in inception.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0, (2.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])) ** 0.5)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 2.0)
  torch.save(inception.state_dict(), d / "pt_inception-2015-12-05-6726825d.pth")
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8,
                         hidden_act="quick_gelu"),
      projection_dim=16)).eval()
  clip.save_pretrained(d / "clip-vit-large-patch14")
  return d, alex, heads, inception, clip


def _release_metrics(gen_dir: Path, gt_dir: Path, alex, heads, inception, clip) -> dict:
  """all_metrics_in_one.py's definitions, over the gt folder's clip/action/frame files."""
  mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[None, :, None, None]
  std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[None, :, None, None]
  psnr, lpips, clip_sim, acts = [], [], [], {"gt": [], "gen": []}
  for gt_path in sorted(gt_dir.rglob("*.jpg")):
    rel = gt_path.relative_to(gt_dir)
    # transforms.ToTensor(): uint8 -> [0, 1], CHW
    gt, gen = (torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0)
               .permute(2, 0, 1)[None] for p in (gt_path, gen_dir / rel))
    with torch.no_grad():
      psnr.append(float(10 * torch.log10(1.0 / torch.mean((gt - gen) ** 2))))  # data_range 1
      lpips.append(float(torch_lpips(alex.features, heads, "alex", gt, gen)[0]))  # [0, 1] fed
      emb = []
      for x in (gt, gen):  # ClipSimilarity: bicubic to the tower's size, CLIP mean/std
        x = F.interpolate(x, size=clip.config.vision_config.image_size, mode="bicubic",
                          align_corners=False)
        e = clip.visual_projection(clip.vision_model(pixel_values=(x - mean) / std).pooler_output)
        emb.append(e / e.norm(dim=1, keepdim=True))
      clip_sim.append(float(F.cosine_similarity(*emb)[0]))
      for k, x in (("gt", gt), ("gen", gen)):  # pytorch-fid: bilinear 299, 2x - 1, pool3
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        acts[k].append(inception(2 * x - 1)[0].double().numpy())
  stats = [(np.mean(a, 0), np.cov(np.stack(a), rowvar=False)) for a in (acts["gt"], acts["gen"])]
  (mu1, s1), (mu2, s2) = stats
  covmean = linalg.sqrtm(s1.dot(s2))  # pytorch-fid's calculate_frechet_distance
  fid = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
  return {"psnr": np.mean(psnr), "lpips": np.mean(lpips), "clip": np.mean(clip_sim), "fid": fid}


def test_evaluate_on_the_release_folders_equals_the_release_definitions(release, generated,
                                                                       metric_weights, tmp_path):
  _, out = generated
  d, alex, heads, inception, clip = metric_weights
  kw = dict(metrics=("psnr", "lpips", "fid", "clip"), weights_dir=str(d), batch=4,
            fid_cache=str(tmp_path / "fid"), progress=False, lpips_release_range=True)
  # The project's output against the release's own folders as they are (inputs: val/, where
  # the input frame is the first file of each clip/action folder).
  res = ev.run_evaluation(str(out / "generated"), str(release / "val_gt_for_metric"),
                          tmp_path / "eval", inputs=str(release / "val"), name="vs_release", **kw)
  assert res["num_pairs"] == 4 and res["notes"] == []
  assert set(res["skipped"]) == {"lpips_vgg", "lpips_squeeze"}
  want = _release_metrics(out / "generated", release / "val_gt_for_metric", alex, heads,
                          inception, clip)
  m = res["metrics"]
  assert m["lpips"] == m["lpips_alex_release_range"]
  np.testing.assert_allclose(m["psnr"], want["psnr"], rtol=1e-5)
  np.testing.assert_allclose(m["lpips"], want["lpips"], rtol=1e-4)
  np.testing.assert_allclose(m["clip"], want["clip"], atol=1e-5)
  np.testing.assert_allclose(m["fid"], want["fid"], rtol=2e-3)
  assert abs(m["lpips_alex"] - m["lpips"]) > 1e-3  # the other range is another number
  # Against generate's own reference/ and inputs/ (the same original bytes): the same numbers.
  own = ev.run_evaluation(str(out / "generated"), str(out / "reference"), tmp_path / "eval",
                          inputs=str(out / "inputs"), name="own",
                          **dict(kw, metrics=("psnr", "lpips", "clip")))
  for k in ("psnr", "lpips", "clip"):
    np.testing.assert_allclose(own["metrics"][k], m[k], rtol=1e-6)
  # BLIP-B/L find each pair's enriched description in the annotation by clip/action/frame.
  from lego_jax.eval import images as im

  found, why = ev._descriptions(im.match_sets(out / "generated", out / "reference"),
                                str(release / "ego4d_val.json"), "llava_forecast_finetune")
  assert why == "" and set(found.values()) == {"the person cuts the carrot"} and len(found) == 4
  # The table prints the release's LPIPS, unmarked.
  md, _, _ = ev.write_results_table(tmp_path / "eval", with_paper=False)
  row = next(l for l in md.read_text().splitlines() if l.startswith("| vs_release |"))
  assert f"{100 * m['lpips']:.2f}" in row and "†" not in row


def test_release_postprocess_order_matches_torch():
  """bicubic F.interpolate of the float image, then min-max, x255, truncation (inference.py)."""
  rng = np.random.default_rng(3)
  x = rng.normal(0, 0.7, (16, 16, 3)).astype(np.float32)
  got = generate.release_postprocess(x, (16, 28), "minmax")
  t = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(16, 28), mode="bicubic",
                    align_corners=False)[0]
  t = ((t - t.min()) / (t.max() - t.min()) * 255).permute(1, 2, 0).numpy()
  want = t.astype(np.uint8)
  assert got.shape == (16, 28, 3) and got.dtype == np.uint8
  # float rounding may move a value across an integer boundary: at most 1 level, rarely
  assert np.abs(got.astype(int) - want).max() <= 1 and np.mean(got != want) < 1e-3
  assert generate.output_size(1080, 1920, 256) == (256, 455)
  assert generate.output_size(256, 456, 256) == (256, 456)
