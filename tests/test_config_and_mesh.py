import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lego_jax import config as config_lib
from lego_jax.parallel import sharding


def test_overrides_and_unknown_keys(tmp_path):
  cfg = config_lib.load("tiny", ["ldm_train.lr=0.25", "unet.block_out_channels=(8,16)",
                                 "sampler.use_ema=false"])
  assert cfg.ldm_train.lr == 0.25 and cfg.unet.block_out_channels == (8, 16)
  assert cfg.sampler.use_ema is False
  with pytest.raises(config_lib.ConfigError, match="ldm_train.nope"):
    config_lib.load("tiny", ["ldm_train.nope=1"])
  out = config_lib.save(cfg, tmp_path)
  assert '"lr": 0.25' in out.read_text()


def test_full_configs_hold_the_paper_settings():
  cfg = config_lib.load("lego_ego4d")
  assert cfg.llama.hidden_size == 5120 and cfg.llama.num_layers == 40
  assert cfg.unet.in_channels == 8 and cfg.vae.scaling_factor == 0.18215
  assert (cfg.sampler.text_guidance, cfg.sampler.image_guidance, cfg.sampler.num_steps) == (7.5, 1.5, 100)
  assert config_lib.load("lego_epickitchens").eval.egovlp_frames == 16
  # Comparable with the release by default (docs/fidelity.md lists each switch).
  for name in ("lego_ego4d", "lego_epickitchens"):
    c = config_lib.load(name)
    assert (c.sampler.postprocess, c.sampler.image_format, c.eval.lpips_release_range,
            c.ldm_train.ema_scope, c.vllm_train.warmup_shape, c.data.action_normalisation,
            c.data.instructions) == ("release", "release", True, "unet", "log", "release",
                                     "gpt_curated")


def test_rule_table_and_mesh():
  assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  with pytest.raises(KeyError, match="nonsense"):
    sharding.logical_to_spec(("nonsense",))
  mesh = sharding.make_mesh((2, 2, -1), devices=jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh((3, 1, 1), devices=jax.devices()[:8])
  x = np.arange(16.0).reshape(8, 2)
  with sharding.use_mesh(mesh):
    y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None)))(x)
  np.testing.assert_array_equal(np.asarray(y), x * 2)


def test_ablation_configs_switch_only_the_conditioning():
  full = config_lib.load("tiny")
  for name, src, img, txt in [("ip2p_action", "action", False, False),
                              ("description_only", "generated", False, False),
                              ("description_image", "generated", True, False),
                              ("description_text", "generated", False, True)]:
    cfg = config_lib.load(f"configs/ablations/{name}.py:tiny")
    t = cfg.ldm_train
    assert (t.text_source, t.use_image_embedding, t.use_text_embedding) == (src, img, txt)
    assert cfg.unet == full.unet and cfg.ldm_train.lr == full.ldm_train.lr
  assert config_lib.load("configs/ablations/ip2p_action.py").unet.block_out_channels[0] == 320


def test_differences_and_the_demo_baseline_come_from_the_ablation_file(tmp_path):
  from lego_jax import demo

  tiny = config_lib.load("tiny")
  ablation = config_lib.load("configs/ablations/ip2p_action.py:tiny")
  assert config_lib.differences(tiny, ablation) == {
      ("name",): "tiny/ip2p_action", ("ldm_train", "text_source"): "action",
      ("ldm_train", "train_text_source"): "action",
      ("ldm_train", "use_image_embedding"): False, ("ldm_train", "use_text_embedding"): False}
  # The demo's baseline: the same switches on the demo's config (with its overrides kept), and
  # its own records / tokenizer paths.
  cfg = config_lib.load("tiny", ["ldm_train.num_steps=7"])
  base = demo.baseline_config(cfg, tmp_path)
  diff = config_lib.differences(cfg, base)
  assert {k: v for k, v in diff.items() if k[0] != "data"} == config_lib.differences(tiny, ablation)
  assert base.ldm_train.num_steps == 7
  assert diff[("data", "records_dir")] == str((tmp_path / "records").absolute())


def test_training_text_can_differ_from_the_sampling_text(monkeypatch):
  from lego_jax.models import lego_ldm

  monkeypatch.setattr(lego_ldm, "load_clip_tokenizer", lambda cfg, workdir: None)
  batch = {"generated": ["R"], "description": ["D"], "action": ["A"]}
  for name, train, sample in [("configs/lego_ego4d.py", "R", "R"), ("tiny", "D", "R"),
                              ("configs/ablations/ip2p_action.py:tiny", "A", "A"),
                              ("configs/ablations/description_only.py:tiny", "D", "R")]:
    cfg = config_lib.load(name)
    lego_ldm.check(cfg)
    assert lego_ldm.TextIds(cfg, "w", train=True).texts(batch) == [train], name
    assert lego_ldm.TextIds(cfg, "w").texts(batch) == [sample], name
  cfg = config_lib.load("tiny", ["ldm_train.train_text_source=vllm"])
  with pytest.raises(ValueError, match="train_text_source='vllm'"):
    lego_ldm.check(cfg)
