"""ldm_train.cache_frozen: the frozen VAE / CLIP text outputs computed once equal what the step
computes from the frames, flips pick the flipped latents, builds resume and follow the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from lego_jax import config
from lego_jax.data import images, prepare
from lego_jax.infer.schedule import NoiseSchedule
from lego_jax.models.vae import VAE, VAEConfig
from lego_jax.infer import ldm as ldm_infer
from lego_jax.models import lego_ldm
from lego_jax.train import ldm, ldm_cache

tfds.display_progress_bar(False)
N = 10


def _cfg(**ldm_overrides):
  cfg = config.load("tiny")
  cfg.data.synthetic.update(num_train=N, num_val=2, num_test=2, frame_size=32, num_instruction=0)
  cfg.data.update(num_shards=1, num_workers=0, tokenizer_vocab_size=256, image_size=16,
                  hflip_prob=0.5)
  # The smallest UNet that still reads the context (compiles dominate this file's time).
  cfg.unet.update(block_out_channels=(8, 16), attention_levels=(False, True), num_heads=2,
                  context_dim=16, norm_groups=4)
  cfg.vae.update(block_out_channels=(8, 16), norm_groups=4)
  cfg.clip_text.update(vocab_size=256, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2)
  cfg.conditioner.update(context_dim=16, num_heads=2, ffn_dim=32, num_layers=1, dropout=0.0)
  # The action label as the text and no VLLM features: no VLLM stage needed here.
  cfg.ldm_train.update(text_source="action", use_image_embedding=False, use_text_embedding=False,
                       **ldm_overrides)
  return cfg


def _frozen(cfg, seed=0):
  vae = VAE(VAEConfig(**cfg.vae), rngs=nnx.Rngs(seed))
  clip_text = lego_ldm.build(cfg, seed)["clip_text"]
  graphdefs, frozen = {}, {}
  graphdefs["vae"], frozen["vae"] = nnx.split(vae)
  graphdefs["clip_text"], frozen["clip_text"] = nnx.split(clip_text)
  return graphdefs, frozen


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cache")
  cfg = _cfg()
  prepare.prepare(cfg, workdir)
  graphdefs, frozen = _frozen(cfg)
  text_ids = lego_ldm.TextIds(cfg, workdir)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ldm_cache, "PART_SIZE", 4)  # 3 parts: 4 + 4 + 2 records
    info = ldm_cache.build(cfg, workdir, graphdefs, frozen, text_ids, batch_size=3)
  return cfg, workdir, graphdefs, frozen, text_ids, info


def _stored(workdir):
  src = ldm_cache.open_source(workdir)
  return [ldm_cache.decode(src[i]) for i in range(len(src))]


def test_cache_holds_what_the_frozen_encoders_give(built):
  cfg, workdir, graphdefs, frozen, text_ids, info = built
  assert info["complete"] and info["num_records"] == N and info["num_parts"] == 3
  assert info["bytes_per_example"] > 0
  stored = _stored(workdir)
  assert [r["index"] for r in stored] == list(range(N))
  # The reference: the evaluation pipeline's frames (ordered, unflipped), encoded one by one.
  batch = next(iter(ldm.loader_for(cfg, workdir, "train", N, train=False)))
  assert list(batch["index"]) == list(range(N))
  vae = nnx.merge(graphdefs["vae"], frozen["vae"])
  clip_text = nnx.merge(graphdefs["clip_text"], frozen["clip_text"])
  x = images.frames_to_unit_range(batch["input"])
  y = images.frames_to_unit_range(batch["target"])
  encode = jax.jit(lambda a: vae.encode(a))
  mean, _ = encode(x)
  t_mean, t_logvar = encode(y)
  f_mean, _ = encode(x[:, :, ::-1])
  ft_mean, ft_logvar = encode(y[:, :, ::-1])
  want = {"input_mean": mean, "target_mean": t_mean, "target_logvar": t_logvar,
          "flipped_input_mean": f_mean, "flipped_target_mean": ft_mean,
          "flipped_target_logvar": ft_logvar, "text": clip_text(jnp.asarray(text_ids(batch)))}
  for i in range(N):
    assert sorted(stored[i]) == sorted([*want, "index"])
    for k, v in want.items():
      np.testing.assert_allclose(stored[i][k], np.asarray(v)[i], rtol=1e-5, atol=1e-5, err_msg=k)
  # Flipping changes the latents (the test would not see a wrong variant otherwise).
  assert not np.allclose(stored[0]["input_mean"], stored[0]["flipped_input_mean"])


def test_training_batches_carry_the_flipped_or_plain_latents(built):
  cfg, workdir, *_ = built
  cfg = cfg.copy_and_resolve_references()
  cfg.ldm_train.cache_frozen = True
  stored = _stored(workdir)
  batch = next(iter(ldm.loader_for(cfg, workdir, "train", 8, train=True)))
  assert "input" not in batch and "target" not in batch  # no frames decoded
  flipped = np.asarray(batch["flipped"])
  assert 0 < flipped.sum() < len(flipped)
  for row, i in enumerate(batch["index"]):
    prefix = "flipped_" if flipped[row] else ""
    for k in ldm_cache.LATENTS:
      np.testing.assert_array_equal(batch[k][row], stored[i][prefix + k])
    np.testing.assert_array_equal(batch["text"][row], stored[i]["text"])
  arrays = lego_ldm.batch_arrays(cfg, batch, None)
  assert sorted(arrays) == sorted(list(ldm_cache.LATENTS) + ["text", "h_img", "h_txt"])


def test_cached_loss_equals_the_loss_computed_from_frames(built):
  cfg, workdir, graphdefs, frozen, text_ids, _ = built
  unet, conditioner = (lego_ldm.build(cfg, 0)[n] for n in ("unet", "conditioner"))
  for name, module in (("unet", unet), ("conditioner", conditioner)):
    graphdefs[name], params = nnx.split(module)
    frozen = dict(frozen, **{name: params})
  trained = {k: frozen.pop(k) for k in ("unet", "conditioner")}
  batch = next(iter(ldm.loader_for(cfg, workdir, "train", 4, train=False)))
  from_frames = lego_ldm.batch_arrays(cfg, batch, text_ids)
  stored = _stored(workdir)
  cached = dict(from_frames)
  for k in ldm_cache.LATENTS + ("text",):
    cached[k] = np.stack([stored[i][k] for i in batch["index"]])
  for k in ("input", "target", "text_ids"):
    cached.pop(k)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(4))
  loss = jax.jit(lambda b: ldm.diffusion_loss(
      trained, frozen, graphdefs, b, keys, jax.random.key(4), cfg=cfg, schedule=NoiseSchedule(),
      empty_ids=jnp.zeros((1, 77), jnp.int32))[0])
  a, b = float(loss(from_frames)), float(loss(cached))
  assert a > 0 and b == pytest.approx(a, rel=1e-5)


def test_scale_by_std_gives_unit_variance_latents_and_travels_with_the_vae(built):
  """LDM's scale_by_std: the factor makes the training targets' latents unit-variance; the step
  uses the state's factor over the config's, and the loaded VAE carries it for decoding."""
  cfg, workdir, graphdefs, frozen, text_ids, _ = built
  frames = cfg.copy_and_resolve_references()
  frames.ldm_train.cache_frozen = False  # the VAE encodes the frames (the tiny default caches)
  scale = ldm.scale_by_std(frames, workdir, graphdefs, frozen, num=N)
  # Independently: the cache's stored posteriors of the same targets, sampled with other keys.
  stored = _stored(workdir)
  mean = np.stack([r["target_mean"] for r in stored])
  logvar = np.stack([r["target_logvar"] for r in stored])
  rng = np.random.default_rng(0)
  z = np.concatenate([mean + np.exp(0.5 * logvar) * rng.normal(size=mean.shape)
                      for _ in range(8)])
  assert abs(float(np.std(z)) * scale - 1.0) < 0.05
  assert abs(scale - cfg.vae.scaling_factor) > 0.05  # a random VAE's latents are not SD's
  # With cache_frozen the cached posteriors give it (other noise draws: close, not equal).
  cached = cfg.copy_and_resolve_references()
  cached.ldm_train.cache_frozen = True
  from_cache = ldm.scale_by_std(cached, workdir, graphdefs, frozen, num=N)
  assert from_cache == pytest.approx(scale, rel=0.05) and from_cache != scale

  unet, conditioner = (lego_ldm.build(cfg, 0)[n] for n in ("unet", "conditioner"))
  gd = dict(graphdefs)
  gd["unet"], p_unet = nnx.split(unet)
  gd["conditioner"], p_cond = nnx.split(conditioner)
  trained = {"unet": p_unet, "conditioner": p_cond}
  batch = lego_ldm.batch_arrays(cfg, next(iter(ldm.loader_for(cfg, workdir, "train", 4,
                                                        train=False))), text_ids)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(4))

  def loss(c, latent_scale=None):
    return float(ldm.diffusion_loss(
        trained, frozen, gd, batch, keys, jax.random.key(4), cfg=c, schedule=NoiseSchedule(),
        empty_ids=jnp.zeros((1, 77), jnp.int32), latent_scale=latent_scale)[0])

  as_config = cfg.copy_and_resolve_references()
  as_config.vae.scaling_factor = scale
  by_state = loss(cfg, jnp.float32(scale))
  assert by_state == pytest.approx(loss(as_config), rel=1e-5)
  assert by_state != pytest.approx(loss(cfg), rel=1e-3)  # the factor matters
  params = dict(frozen, **trained)
  vae = lego_ldm.models_from(gd, params, jnp.float32(scale))[3]
  assert vae.config.scaling_factor == pytest.approx(scale)


def test_interrupted_build_resumes_and_new_weights_rebuild(built):
  cfg, workdir, graphdefs, frozen, text_ids, info = built
  before = _stored(workdir)
  part = ldm_cache.store.part_path(ldm_cache.cache_dir(workdir), "train", 1)
  kept = ldm_cache.store.part_path(ldm_cache.cache_dir(workdir), "train", 0).stat().st_mtime_ns
  part.unlink()  # as if killed while writing part 1 (parts are renamed into place when whole)
  with pytest.raises(FileNotFoundError, match="incomplete"):
    ldm_cache.open_source(workdir)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ldm_cache, "PART_SIZE", 4)
    again = ldm_cache.build(cfg, workdir, graphdefs, frozen, text_ids, batch_size=3)
    assert again["complete"] and not again.get("kept")
    assert ldm_cache.store.part_path(
        ldm_cache.cache_dir(workdir), "train", 0).stat().st_mtime_ns == kept
    after = _stored(workdir)
    for x, y in zip(before, after):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert ldm_cache.build(cfg, workdir, graphdefs, frozen, text_ids)["kept"]
    # Other frozen weights: a different fingerprint, so the cache is built again from them.
    _, other = _frozen(cfg, seed=1)
    rebuilt = ldm_cache.build(cfg, workdir, graphdefs, other, text_ids, batch_size=3)
  assert rebuilt["fingerprint"] != info["fingerprint"] and not rebuilt.get("kept")
  assert not np.allclose(_stored(workdir)[0]["input_mean"], before[0]["input_mean"])


def test_missing_checkpoints_name_the_command_to_run(tmp_path):
  """A workdir without checkpoints: the VAE's and the LDM's loaders say which file is missing
  and which command makes it."""
  from lego_jax.train import vae as vae_train

  cfg = _cfg()
  with pytest.raises(FileNotFoundError, match="no VAE checkpoint .* run `lego-jax train-vae`"):
    vae_train.load_trained(cfg, tmp_path)
  # Generation reads the LDM's checkpoint alone (it holds the VAE's weights too).
  with pytest.raises(FileNotFoundError, match="no LDM checkpoint .* run `lego-jax train-ldm`"):
    ldm_infer.load_trained(cfg, tmp_path)
