"""Trainer pieces: gradient accumulation, LitEma decay, freezing, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lego_jax.train import common


def _grad_fn(params, batch, extra):
  keys, idx = extra

  def loss(p):
    noise = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
    pred = batch["x"] @ p["w"] + p["b"] + 0.1 * noise
    l = jnp.mean(jnp.square(pred - batch["y"]))
    return l, {"loss": l, "first_index": idx[0].astype(jnp.float32)}

  return jax.value_and_grad(loss, has_aux=True)(params)


def test_accumulation_equals_one_big_batch():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.zeros(())}
  batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(8))
  extra = (keys, jnp.zeros((8,), jnp.int32))
  (l1, a1), g1 = common.accumulate_gradients(_grad_fn, params, batch, extra, 1)
  (l4, a4), g4 = common.accumulate_gradients(_grad_fn, params, batch, extra, 4)
  np.testing.assert_allclose(l1, l4, rtol=1e-6)
  for k in g1:
    np.testing.assert_allclose(g1[k], g4[k], rtol=1e-5, atol=1e-7)
  # micro-batch indices 0..3 reach the per-example int leaf: their mean is 1.5
  assert float(a4["first_index"]) == 1.5 and float(a1["first_index"]) == 0.0


def test_lit_ema_decay_and_update():
  n = jnp.arange(1, 5)
  np.testing.assert_allclose(common.ema_decay(n, 0.9999), (1 + n) / (10 + n), rtol=1e-6)
  assert float(common.ema_decay(jnp.asarray(10**7), 0.9999)) == np.float32(0.9999)
  ema = common.ema_update({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, jnp.asarray(1), 0.9999)
  np.testing.assert_allclose(ema["w"], 2 / 11, rtol=1e-6)


def test_freezing_by_regex_and_warmup_schedule():
  params = {"vision": {"w": jnp.ones(2)}, "lm": {"w": jnp.ones(2)}}
  tx = common.adamw(params, 0.1, frozen=r"^vision/")
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["vision"]["w"], params["vision"]["w"])
  assert np.all(np.asarray(new["lm"]["w"]) < 1)
  lr = common.learning_rate(2e-5, 100, 0.03, "constant")
  assert float(lr(0)) == 0.0 and np.isclose(float(lr(3)), 2e-5) and np.isclose(float(lr(99)), 2e-5)
  cos = common.learning_rate(1.0, 100, 0.0, "cosine")
  assert np.isclose(float(cos(0)), 1.0) and float(cos(100)) < 1e-6


def test_log_warmup_is_deepspeed_warmuplr_default():
  """The release's VLLM schedule: DeepSpeed WarmupLR (warmup_type "log", min lr 0), stepped after
  each update from iteration -1, emulated here from its definition."""
  base, total, ratio = 2e-5, 400, 0.03
  warm = int(np.ceil(ratio * total))                 # 12 (HF: ceil(warmup_ratio * steps))
  w = max(2, warm)
  it, used = -1, []
  for _ in range(20):
    gamma = 0.0 if it < 0 else (np.log(it + 1) / np.log(w) if it < w else 1.0)
    used.append(base * (gamma if it >= 0 else 0.0))  # the lr this update runs with
    it += 1                                            # scheduler.step() after the update
  lr = common.learning_rate(base, total, ratio, "constant", "log")
  np.testing.assert_allclose([float(lr(k)) for k in range(20)], used, rtol=1e-6, atol=1e-12)
  assert float(lr(1)) == 0.0 and np.isclose(float(lr(warm)), base)
  lin = common.learning_rate(base, total, ratio, "constant", "linear")
  assert float(lr(3)) > float(lin(3))                 # log rises faster than linear
  with pytest.raises(ValueError, match="WarmupLR"):
    common.learning_rate(base, total, ratio, "cosine", "log")


def test_ema_scope_unet_keeps_the_conditioner_raw():
  """The release's LitEma(model) averages the UNet only; the conditioner samples as trained."""
  from lego_jax.train import ldm

  ema = {"unet": {"w": jnp.zeros(3)}, "conditioner": {"w": jnp.zeros(2)}}
  trained = {"unet": {"w": jnp.ones(3)}, "conditioner": {"w": jnp.full(2, 5.0)}}
  d = min(0.9999, (1 + 1) / (10 + 1))
  one = jnp.asarray(1, jnp.int32)  # the step counter, as the train step passes it
  everything = ldm.ema_of(ema, trained, one, 0.9999, "trained")
  release = ldm.ema_of(ema, trained, one, 0.9999, "unet")
  np.testing.assert_allclose(everything["conditioner"]["w"], 5.0 * (1 - d), rtol=1e-6)
  np.testing.assert_allclose(release["conditioner"]["w"], 5.0)
  np.testing.assert_allclose(release["unet"]["w"], everything["unet"]["w"])
  np.testing.assert_allclose(release["unet"]["w"], 1 - d, rtol=1e-6)
  with pytest.raises(ValueError, match="ema_scope"):
    ldm.ema_of(ema, trained, one, 0.9999, "all")
