"""The LDM stage's training step: guidance dropout, the loss it optimises, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lego_jax import config as config_lib
from lego_jax.infer.schedule import NoiseSchedule
from lego_jax.models.clip_text import CLIPText, CLIPTextConfig
from lego_jax.models.conditioner import Conditioner, ConditionerConfig
from lego_jax.models.unet import UNet, UNetConfig
from lego_jax.models.vae import VAE, VAEConfig
from lego_jax.train import common, ldm


def _cfg(**ldm_overrides):
  cfg = config_lib.load("tiny")
  cfg.unet.update(block_out_channels=(16, 32), attention_levels=(False, True), num_heads=2,
                  context_dim=16, norm_groups=8)
  cfg.vae.update(block_out_channels=(8, 16), norm_groups=4)
  cfg.clip_text.update(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
  cfg.conditioner.update(llm_dim=24, context_dim=16, num_heads=2, ffn_dim=32, num_layers=1,
                         dropout=0.0)
  cfg.ldm_train.update(lr=3e-3, **ldm_overrides)
  return cfg


def test_cfg_dropout_matches_the_release_bands():
  t = config_lib.load("lego_ego4d").ldm_train
  r = jnp.array([0.0, 0.049, 0.05, 0.099, 0.10, 0.149, 0.15, 0.5, 0.999])
  text, image = ldm.cfg_dropout(r, t)
  np.testing.assert_array_equal(np.asarray(text), [1, 1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(image), [0, 0, 1, 1, 1, 1, 0, 0, 0])
  rs = jax.random.uniform(jax.random.key(0), (200_000,))
  text, image = ldm.cfg_dropout(rs, t)
  only_text = float(jnp.mean(text & ~image))
  both = float(jnp.mean(text & image))
  only_image = float(jnp.mean(~text & image))
  for got in (only_text, both, only_image):
    assert abs(got - 0.05) < 0.003


def _state(cfg, seed=0):
  rngs = nnx.Rngs(seed)
  models = {"unet": UNet(UNetConfig(**cfg.unet), rngs=rngs),
            "conditioner": Conditioner(ConditionerConfig(**cfg.conditioner), rngs=rngs),
            "vae": VAE(VAEConfig(**cfg.vae), rngs=rngs),
            "clip_text": CLIPText(CLIPTextConfig(**cfg.clip_text), rngs=rngs)}
  graphdefs, params = {}, {}
  for k, m in models.items():
    graphdefs[k], params[k] = nnx.split(m)
  trained = {k: params[k] for k in ("unet", "conditioner")}
  frozen = {k: params[k] for k in ("vae", "clip_text")}
  tx = common.adamw(trained, cfg.ldm_train.lr, weight_decay=0.0)
  state = {"trained": trained, "frozen": frozen, "opt_state": tx.init(trained),
           "ema": jax.tree.map(jnp.copy, trained), "step": jnp.zeros((), jnp.int32),
           "nonfinite": jnp.zeros((), jnp.int32)}
  return graphdefs, state, tx


def _batch(n=4, hw=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"input": rng.uniform(-1, 1, (n, hw, hw, 3)).astype(np.float32),
          "target": rng.uniform(-1, 1, (n, hw, hw, 3)).astype(np.float32),
          "text_ids": rng.integers(0, 40, (n, 77)).astype(np.int32),
          "h_img": rng.normal(size=(n, 5, 24)).astype(np.float32),
          "h_txt": rng.normal(size=(n, 77, 24)).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
  # One compiled step shared by the tests: XLA:CPU compiles of a UNet+VAE+CLIP backward are slow.
  cfg = _cfg()
  graphdefs, state, tx = _state(cfg)
  empty = jnp.zeros((1, 77), jnp.int32)
  step = jax.jit(ldm.make_train_step(cfg, graphdefs, tx, NoiseSchedule(), empty))
  return cfg, graphdefs, state, tx, empty, step


def test_step_trains_only_unet_and_conditioner_and_learns(setup):
  cfg, graphdefs, state, tx, empty, step = setup
  batch = jax.tree.map(jnp.asarray, _batch(seed=1))
  s = state
  losses = []
  for i in range(12):
    s, aux = step(s, batch, jax.random.key(0))  # same draws each step: a fixed regression problem
    losses.append(float(aux["loss"]))
  assert losses[-1] < 0.8 * losses[0], losses
  for x, y in zip(jax.tree.leaves(s["frozen"]), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  changed = [not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(s["trained"]), jax.tree.leaves(state["trained"]))]
  assert all(changed)
  assert int(s["step"]) == 12 and int(s["nonfinite"]) == 0
  # EMA: LitEma warm-up, decay_n = min(0.9999, (1+n)/(10+n)) with n counted from 1.
  d1 = (1 + 1) / (10 + 1)
  ema1, _ = step(state, batch, jax.random.key(0))
  leaf = lambda t: np.asarray(jax.tree.leaves(t)[0])
  expect = leaf(state["ema"]) - (1 - d1) * (leaf(state["ema"]) - leaf(ema1["trained"]))
  np.testing.assert_allclose(leaf(ema1["ema"]), expect, rtol=1e-6, atol=1e-7)


def test_non_finite_step_leaves_the_state_unchanged(setup):
  cfg, graphdefs, st, tx, empty, step = setup
  batch = jax.tree.map(jnp.asarray, _batch())
  batch["target"] = batch["target"].at[0, 0, 0, 0].set(jnp.nan)
  new, _ = step(st, batch, jax.random.key(0))
  assert int(new["nonfinite"]) == 1 and int(new["step"]) == 0
  for x, y in zip(jax.tree.leaves(new["trained"]), jax.tree.leaves(st["trained"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lr_schedule_constant_is_the_release_float_and_cosine_anneals_to_zero():
  t = _cfg().ldm_train
  t.update(lr=2e-4, num_steps=1600)
  # constant: a float, so the optimizer state (and saved checkpoints' layout) is unchanged
  assert ldm.learning_rate_of(t) == 2e-4
  t.lr_schedule = "cosine"
  lr = ldm.learning_rate_of(t)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 800, 1600)], [2e-4, 1e-4, 0.0],
                             atol=1e-9)
  # the annealed rate reaches the update: AdamW's first step moves a weight by ~lr
  tx = common.adamw({"w": jnp.zeros(())}, lr)
  opt = tx.init({"w": jnp.zeros(())})
  upd, _ = tx.update({"w": jnp.ones(())}, opt, {"w": jnp.zeros(())})
  np.testing.assert_allclose(float(upd["w"]), -2e-4, rtol=1e-3)
  t.lr_schedule = "linear"
  with pytest.raises(config_lib.ConfigError, match="ldm_train.lr_schedule='linear'"):
    ldm.learning_rate_of(t)


def test_cosine_step_logs_the_rate_it_used():
  cfg = _cfg(lr_schedule="cosine", num_steps=4)
  graphdefs, state, _ = _state(cfg)
  tx = common.adamw(state["trained"], ldm.learning_rate_of(cfg.ldm_train), weight_decay=0.0)
  state = dict(state, opt_state=tx.init(state["trained"]))
  step = jax.jit(ldm.make_train_step(cfg, graphdefs, tx, NoiseSchedule(),
                                     jnp.zeros((1, 77), jnp.int32)))
  batch = jax.tree.map(jnp.asarray, _batch())
  rates = []
  for _ in range(3):
    state, aux = step(state, batch, jax.random.key(0))
    rates.append(float(aux["lr"]))
  # cosine over 4 steps from 3e-3: steps 0, 1, 2
  np.testing.assert_allclose(rates, [3e-3 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(3)],
                             rtol=1e-5)
