"""The shipped checkpoints of the embedded default (lego_jax/assets/tiny/): the sha256 check, the
LDM file's round trip through the release layout in float16 with its metadata, and, when the files
are there, their hashes, their size within the budget, and that they load through the project's
own loaders and generate frames that keep the input's scene (a random or mis-loaded LDM does not)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from lego_jax import config, demo
from lego_jax.assets import shipped
from lego_jax.data import synthetic
from lego_jax.data.tokenizer import load_clip_tokenizer
from lego_jax.errors import UserError
from lego_jax.infer import generate
from lego_jax.infer.ldm import match_colour
from lego_jax.train import vllm

BUDGET_BYTES = 40 * 1024 * 1024
needs_files = pytest.mark.skipif(not shipped.available(),
                                 reason=f"no shipped checkpoints in {shipped.DIR}")


def test_verify_names_a_missing_or_changed_file(tmp_path):
  for name, data in (("a.safetensors", b"weights"), ("tokenizer.model", b"pieces")):
    (tmp_path / name).write_bytes(data)
  (tmp_path / shipped.SUMS).write_text("".join(
      f"{shipped.sha256(tmp_path / n)}  {n}\n" for n in ("a.safetensors", "tokenizer.model")))
  assert set(shipped.verify(tmp_path)) == {"a.safetensors", "tokenizer.model"}
  (tmp_path / "tokenizer.model").write_bytes(b"pieceS")
  with pytest.raises(UserError, match="tokenizer.model has sha256"):
    shipped.verify(tmp_path)
  (tmp_path / "a.safetensors").unlink()
  with pytest.raises(UserError, match="a.safetensors is missing"):
    shipped.verify(tmp_path)


def test_ldm_file_round_trip_keeps_weights_scale_and_options(tmp_path):
  """write_ldm -> config_for -> load_ldm on the tiny config's models: every weight back at
  float16 precision, the latent scale and the learning options with it."""
  from flax import nnx

  from lego_jax.models import lego_ldm
  from lego_jax.weights.state import flat_params, load_params, param_shapes

  cfg = config.load("configs/tiny.py", ["ldm_train.prediction_type=v_prediction",
                                        "ldm_train.min_snr_gamma=5.0"])
  # Built abstractly and filled with random numbers: eager random initialisation of the UNet
  # costs 10x the CPU of everything else here.
  rng = np.random.default_rng(0)
  built = nnx.eval_shape(lambda: lego_ldm.build(cfg, 0))
  models = tuple(built[n] for n in lego_ldm.NAMES)
  for m in models:
    load_params(m, {k: rng.normal(size=s).astype(np.float32) * 0.1
                    for k, s in param_shapes(m).items()})
  unet, conditioner, clip_text, vae = models
  vae.config = dataclasses.replace(vae.config, scaling_factor=0.7)
  for which in shipped.LDMS.values():
    shipped.write_ldm(tmp_path / which, (unet, conditioner, clip_text, vae), cfg,
                      trained_steps=1234)
  fresh = config.load("configs/tiny.py")
  got = shipped.load_ldm(shipped.config_for(fresh, "lego", tmp_path))
  for a, b in zip((unet, conditioner, clip_text, vae), got):
    want, have = flat_params(a), flat_params(b)
    assert set(want) == set(have)
    for k in want:
      np.testing.assert_array_equal(have[k], want[k].astype(np.float16).astype(np.float32), k)
  assert got[3].config.scaling_factor == pytest.approx(0.7)
  c = shipped.config_for(fresh, "lego", tmp_path)
  assert (c.ldm_train.prediction_type, c.ldm_train.min_snr_gamma) == ("v_prediction", 5.0)
  assert shipped.data_mismatch(fresh, tmp_path) is None
  # The steps the weights were trained for, not the config's num_steps (320 in tiny.py).
  meta = shipped.metadata("lego", tmp_path)
  assert meta["trained_steps"] == meta["ldm_train"]["num_steps"] == 1234
  shipped.write_ldm(tmp_path / "plain.safetensors", (unet, conditioner, clip_text, vae), cfg)
  from safetensors import safe_open

  with safe_open(str(tmp_path / "plain.safetensors"), "numpy") as f:
    plain = json.loads(f.metadata()["lego_jax"])
  assert "trained_steps" not in plain and plain["ldm_train"]["num_steps"] == cfg.ldm_train.num_steps
  # A run fine-tuned from such a file (train-ldm's saved config: init "lego") counts its steps.
  run = tmp_path / "finetune"
  run.mkdir()
  assert shipped.init_record(run) is None  # no saved config: nothing to count
  (run / "config.train-ldm.json").write_text(json.dumps(
      {"ldm_train": {"init": "lego", "init_checkpoint": str(tmp_path / "ldm_lego.safetensors")}}))
  init = shipped.init_record(run)
  assert init == {"file": "ldm_lego.safetensors", "trained_steps": 1234,
                  "sha256": shipped.sha256(tmp_path / "ldm_lego.safetensors")}
  shipped.write_ldm(run / "ft.safetensors", (unet, conditioner, clip_text, vae), cfg,
                    trained_steps=100, init=init)
  with safe_open(str(run / "ft.safetensors"), "numpy") as f:
    tuned = json.loads(f.metadata()["lego_jax"])
  assert tuned["trained_steps"] == tuned["ldm_train"]["num_steps"] == 1334
  assert tuned["run_steps"] == 100 and tuned["init"] == init
  (run / "config.train-ldm.json").write_text(json.dumps(
      {"ldm_train": {"init": "lego", "init_checkpoint": str(tmp_path / "gone.safetensors")}}))
  with pytest.raises(UserError, match="gone.safetensors, which is missing"):
    shipped.init_record(run)
  other = config.load("configs/tiny.py", ["data.synthetic.num_train=32"])
  assert "data.synthetic" in shipped.data_mismatch(other, tmp_path)
  # more or fewer test frames change no training example: still the shipped models' data
  more = config.load("configs/tiny.py", ["data.synthetic.num_test=256"])
  assert shipped.data_mismatch(more, tmp_path) is None


def _random_ldm(cfg, seed=0):
  from flax import nnx

  from lego_jax.models import lego_ldm
  from lego_jax.weights.state import load_params, param_shapes

  rng = np.random.default_rng(seed)
  built = nnx.eval_shape(lambda: lego_ldm.build(cfg, 0))
  models = tuple(built[n] for n in lego_ldm.NAMES)
  for m in models:
    load_params(m, {k: rng.normal(size=s).astype(np.float32) * 0.1
                    for k, s in param_shapes(m).items()})
  return models


def _unet_out(unet):
  import jax.numpy as jnp

  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 8)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(2, 5, unet.config.context_dim)), jnp.float32)
  return np.asarray(unet(x, jnp.array([10.0, 700.0]), ctx))


def test_grown_ldm_computes_what_the_old_one_did_and_says_its_shape(tmp_path, capsys):
  """grow: both LDMs' UNets at transformer_depth 2, every old weight kept, the new blocks the
  identity (same output as before on the same input), the shape in the metadata so that
  config_for builds it from a config that says depth 1; then a write_ldm of the grown models
  (a fine-tune's export) records the shape it was trained with."""
  from lego_jax.weights.state import flat_params

  cfg = config.load("configs/tiny.py")
  assert cfg.unet.transformer_depth == 1
  models = _random_ldm(cfg)
  src, dst = tmp_path / "src", tmp_path / "dst"
  src.mkdir()
  for name in (shipped.VLLM, shipped.TOKENIZER):
    (src / name).write_bytes(name.encode())
  for which in shipped.LDMS.values():
    shipped.write_ldm(src / which, models, cfg, trained_steps=10)
  assert shipped.main(["grow", str(src), str(dst), "2"]) == 0
  assert set(shipped.verify(dst)) == {shipped.VLLM, shipped.TOKENIZER, *shipped.LDMS.values()}
  c = shipped.config_for(cfg, "lego", dst)
  assert c.unet.transformer_depth == 2 and cfg.unet.transformer_depth == 1
  assert shipped.metadata("lego", dst)["grown_from"]["transformer_depth"] == 1
  grown = shipped.load_ldm(c)
  old = shipped.load_ldm(shipped.config_for(cfg, "lego", src))
  np.testing.assert_array_equal(_unet_out(grown[0]), _unet_out(old[0]))
  assert len(flat_params(grown[0])) == len(flat_params(old[0]))  # stacked along "layers"
  assert sum(np.size(v) for v in flat_params(grown[0]).values()) > 1.3 * sum(
      np.size(v) for v in flat_params(old[0]).values())
  # Trained on (here: perturbed), the grown UNet differs from the old one and its export keeps
  # the depth: a fresh depth-1 config loads it back whole.
  from lego_jax.weights.state import load_params

  load_params(grown[0], {k: v + 0.01 for k, v in flat_params(grown[0]).items()})
  (tmp_path / "ft").mkdir()
  shipped.write_ldm(tmp_path / "ft" / shipped.LDMS["lego"], grown, c, trained_steps=5)
  for name in (shipped.VLLM, shipped.TOKENIZER):
    (tmp_path / "ft" / name).write_bytes(name.encode())
  back = shipped.load_ldm(shipped.config_for(cfg, "lego", tmp_path / "ft"))
  assert shipped.metadata("lego", tmp_path / "ft")["unet"]["transformer_depth"] == 2
  np.testing.assert_allclose(_unet_out(back[0]), _unet_out(grown[0]), atol=0.05)
  assert not np.allclose(_unet_out(back[0]), _unet_out(old[0]), atol=0.05)
  # Refused in one line: nothing to grow, a missing source file, a bad depth.
  capsys.readouterr()
  assert shipped.main(["grow", str(dst), str(tmp_path / "again"), "2"]) == 1
  assert "has transformer_depth 2: nothing to grow to 2" in capsys.readouterr().err
  assert not (tmp_path / "again").exists()
  assert shipped.main(["grow", str(tmp_path / "none"), str(tmp_path / "x"), "2"]) == 1
  assert "vllm.safetensors is missing" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
  before = shipped.sha256(dst / shipped.LDMS["lego"])
  assert shipped.main(["grow", str(src), str(dst), "3"]) == 1   # DST holds a set: kept as it was
  assert "is not empty" in capsys.readouterr().err
  assert shipped.sha256(dst / shipped.LDMS["lego"]) == before
  assert shipped.main(["grow", str(src), str(tmp_path / "y"), "two"]) == 2
  assert shipped.main(["grow", str(src), str(tmp_path / "y"), "1"]) == 2
  assert "an integer >= 2" in capsys.readouterr().err
  assert not (tmp_path / "y").exists()


@needs_files
def test_shipped_files_match_their_sha256_and_fit_the_budget():
  sums = shipped.verify()
  assert set(sums) == {shipped.VLLM, shipped.TOKENIZER, *shipped.LDMS.values()}
  assert sum((shipped.DIR / n).stat().st_size for n in sums) <= BUDGET_BYTES
  # Both LDMs say how long they were trained, and it is the same: the demo compares them.
  steps = {w: shipped.metadata(w).get("trained_steps") for w in shipped.LDMS}
  assert steps["lego"] == steps["action_label"] and steps["lego"] > 320, steps


def _psnr(a, b, mask):
  err = np.mean((a.astype(np.float64)[mask] - b.astype(np.float64)[mask]) ** 2)
  return 10 * np.log10(255.0 ** 2 / err)


@needs_files
def test_shipped_ldm_loads_and_generates_the_kept_scene(tmp_path):
  cfg = config.load("configs/tiny.py")
  c = shipped.config_for(config.load("configs/ablations/ip2p_action.py:tiny"), "action_label")
  assert shipped.data_mismatch(cfg) is None
  vllm.initialise(shipped.config_for(cfg, "lego"))   # the VLLM file loads in full
  c.sampler.update(demo.settings(cfg)["shipped_sampler"])   # as the demo samples them
  models = shipped.load_ldm(c)
  examples = [e for _, _, e in synthetic.generate_split("test", 2, seed=0, size=64,
                                                        objects=(1, 1))]
  tok = load_clip_tokenizer(c, tmp_path)
  batch = {"input": np.stack([e.input for e in examples]),
           "h_img": np.zeros((2, 16, c.conditioner.llm_dim), np.float32),
           "h_txt": np.zeros((2, c.conditioner.text_len, c.conditioner.llm_dim), np.float32)}
  keys = jax.random.split(jax.random.key(0), 2)
  decoded = generate.run_batch(models, batch, tok([e.action for e in examples]), tok([""]), c,
                               keys, num_steps=8)
  frames = generate.to_uint8(np.asarray(decoded), "clamp")
  assert frames.shape == (2, 64, 64, 3)
  outside = [_psnr(f, e.target, e.mask < 128) for f, e in zip(frames, examples)]
  assert min(outside) > 20.0, outside
  # the shipped sampler's colour match is the median shift of the same frames without it
  assert c.sampler.colour_match == "median"
  c.sampler.colour_match = "none"
  plain = generate.run_batch(models, batch, tok([e.action for e in examples]), tok([""]), c,
                             keys, num_steps=8)
  unit = batch["input"].astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(match_colour(plain, unit)),
                             atol=1e-5)
  assert not np.allclose(np.asarray(decoded), np.asarray(plain), atol=1e-3)
