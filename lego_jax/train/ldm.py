"""`lego-jax train-ldm`: LEGO's latent diffusion stage (Lai et al., ECCV 2024, arXiv 2312.03849,
Sec. 3.2; its release github.com/BolinLai/LEGO, the latent diffusion training).

Per example: input frame, target frame, text (the VLLM's generated description R by default),
H_i and H_t (from `lego-jax extract`). In the step:
  input latent  = VAE posterior MODE of the input frame (NOT scaled by 0.18215)
  target latent = VAE posterior SAMPLE of the target frame x 0.18215 (or, `scale_by_std`, x 1/std
                  of the first training latents: LDM's rule for a VAE of its own)
  context       = [CLIP_text(R) (77), proj_img(H_i) (256), mix(proj_txt(H_t)) (77)]
  eps-MSE of the UNet on [noisy target latent ++ input latent], t ~ U{0..999}, scaled-linear betas.
Classifier-free-guidance dropout exactly as the release, one r ~ U(0,1) per example:
  r < 0.10 -> text dropped: CLIP(""), and the PROJECTED VLLM tokens multiplied by 0;
  0.05 <= r < 0.15 -> input latent zeroed  (net 5% text only, 5% both, 5% image only).
VAE and CLIP text encoder are frozen; the conditioner trains with the UNet when
`train_projections` (the paper) and stays at its init otherwise (the release's optimizer covered
the UNet only). EMA with LitEma's warm-up over every trained parameter.

Ablations and baselines are the same trainer with switches: `text_source` ("generated" R,
"annotation" description, or "action" label only: InstructPix2Pix fine-tuned), and
`use_image_embedding` / `use_text_embedding`. `train_text_source` (default: as text_source)
conditions the training pairs on another text than sampling does (the embedded default: the
annotation's description, which states each pair's hand).
"""

from __future__ import annotations

import functools
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from lego_jax.config import ConfigError
from lego_jax.data import images
from lego_jax.data import pipeline
from lego_jax.infer import ldm as ldm_infer
from lego_jax.infer import sampler as sampler_lib
from lego_jax.infer import schedule as schedule_lib
from lego_jax.infer.schedule import NoiseSchedule
from lego_jax.models import lego_ldm
from lego_jax.models.lego_ldm import prediction_type_of, schedule_of
from lego_jax.parallel import distributed, sharding
from lego_jax.train import common, loop
from lego_jax.train import ldm_cache
from lego_jax.train import vae as vae_train
from lego_jax.weights import checkpoints as ckpts

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "vae", "vae_train", "unet", "clip_text", "conditioner", "ldm_train",
                   "sampler", "mesh", "checkpoint", "seed")


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_of(t):
  """ldm_train's learning rate: constant (the release's) or, with lr_schedule="cosine", cosine to
  0 over this run's num_steps, so a fine-tune from a saved LDM (init="lego") ends annealed
  rather than at its peak rate. An unknown schedule is a ConfigError."""
  kind = t.get("lr_schedule", "constant")
  if kind not in LR_SCHEDULES:
    raise ConfigError(f"ldm_train.lr_schedule={kind!r}: one of {', '.join(LR_SCHEDULES)}")
  if kind == "constant":
    # a plain float, not a schedule: the optimizer state (and so every saved checkpoint's
    # layout) stays what it was before the option existed
    return float(t.lr)
  return common.learning_rate(float(t.lr), int(t.num_steps), 0.0, kind)


def initialise(cfg, workdir: Path) -> dict[str, nnx.Module]:
  """{name: module} of lego_ldm.NAMES as the config's `init` says: random UNet and
  conditioner with train-vae's VAE, or every weight from an SD-1.5 / LEGO file."""
  t = cfg.ldm_train
  if t.init == "random" and t.init_checkpoint:
    raise ConfigError(
        f"ldm_train.init_checkpoint={t.init_checkpoint!r} is read only with ldm_train.init=sd15 "
        "or lego (it says which weights the file holds); ldm_train.init='random' ignores it")
  modules = lego_ldm.build(cfg, cfg.seed, ("unet", "conditioner", "clip_text"))
  unet, conditioner, clip_text = modules["unet"], modules["conditioner"], modules["clip_text"]
  if t.init == "random":
    modules["vae"] = vae_train.load_trained(cfg, workdir)
  elif t.init in ("sd15", "lego"):
    if not t.init_checkpoint:
      raise FileNotFoundError(
          f"ldm_train.init={t.init!r} needs --config.ldm_train.init_checkpoint: "
          + ckpts.WHERE_TO_GET[t.init])
    modules["vae"] = vae_train.build(cfg)
    ckpts.load_ldm_single_file(t.init_checkpoint, unet=unet, vae=modules["vae"],
                               clip_text=clip_text,
                               conditioner=conditioner if t.init == "lego" else None,
                               use_ema=t.init_use_ema, widen_from_sd=t.init == "sd15")
  else:
    raise ValueError(f"ldm_train.init={t.init!r}: one of random, sd15, lego")
  return modules


def cfg_dropout(r: jax.Array, t) -> tuple[jax.Array, jax.Array]:
  """The release's guidance dropout from one r ~ U(0,1) per example: (drop_text, drop_image).
  Defaults: r < 0.10 text dropped; 0.05 <= r < 0.15 image dropped (5% / 5% / 5%)."""
  drop_text = r < (t.drop_text_prob + t.drop_both_prob)
  drop_image = (r >= t.drop_text_prob) & (
      r < t.drop_text_prob + t.drop_both_prob + t.drop_image_prob)
  return drop_text, drop_image


def _per_example(keys: jax.Array, shape: tuple[int, ...], fn) -> jax.Array:
  return jax.vmap(lambda k: fn(k, shape))(keys)


def diffusion_loss(trained, frozen, graphdefs, batch, keys, mixer_key, *, cfg,
                   schedule: NoiseSchedule, empty_ids: jax.Array, latent_scale=None):
  """eps-MSE (or v-MSE, min-SNR weighted: ldm_train.prediction_type, min_snr_gamma) of one
  (micro-)batch. `keys` (B,) are per-example PRNG keys, so the draws of an
  example do not depend on how the batch is split into micro-batches. `latent_scale`: the
  target latents' factor (default cfg.vae.scaling_factor; the train state's, see
  `scale_by_std`)."""
  t = cfg.ldm_train
  unet = nnx.merge(graphdefs["unet"], trained["unet"])
  conditioner = nnx.merge(graphdefs["conditioner"],
                          trained["conditioner"] if "conditioner" in trained else frozen["conditioner"])
  vae = nnx.merge(graphdefs["vae"], frozen["vae"])
  clip_text = nnx.merge(graphdefs["clip_text"], frozen["clip_text"])
  k_post, k_drop, k_t, k_noise = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
                                  for i in range(4))
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)

  if "input_mean" in batch:  # ldm_train.cache_frozen: encoded once, before training
    mean, t_mean, t_logvar = batch["input_mean"], batch["target_mean"], batch["target_logvar"]
    text = batch["text"]
  else:
    mean, _ = vae.encode(images.frames_to_unit_range(batch["input"]))
    t_mean, t_logvar = vae.encode(images.frames_to_unit_range(batch["target"]))
    text = clip_text(batch["text_ids"])
  input_latent = jax.lax.stop_gradient(mean)                       # posterior MODE, unscaled
  eps_post = _per_example(k_post, t_mean.shape[1:], normal)
  target_latent = jax.lax.stop_gradient(t_mean + jnp.exp(0.5 * t_logvar) * eps_post)
  if latent_scale is None:
    latent_scale = cfg.vae.scaling_factor
  target_latent = target_latent * latent_scale                     # posterior SAMPLE x 0.18215

  text = jax.lax.stop_gradient(text)
  empty = jax.lax.stop_gradient(clip_text(empty_ids))
  r = jax.vmap(lambda k: jax.random.uniform(k, ()))(k_drop)
  drop_text, drop_image = cfg_dropout(r, t)
  text = jnp.where(drop_text[:, None, None], empty.astype(text.dtype), text)
  dt = conditioner.cfg.dtype
  keep = (1.0 - drop_text.astype(jnp.float32))[:, None, None].astype(dt)
  parts = [text.astype(dt)]
  # The release zeroes the PROJECTED VLLM tokens of text-dropped examples (after the mixer).
  if t.use_image_embedding:
    parts.append(conditioner.image_tokens(batch["h_img"]) * keep)
  if t.use_text_embedding:
    parts.append(conditioner.text_tokens(batch["h_txt"], deterministic=False, rngs=mixer_key) * keep)
  context = sharding.constrain(jnp.concatenate(parts, axis=1), ("batch", "length", "embed"))
  input_latent = input_latent * (1.0 - drop_image.astype(jnp.float32))[:, None, None, None]

  timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))(k_t)
  noise = _per_example(k_noise, target_latent.shape[1:], normal)
  noisy = schedule.q_sample(target_latent, timesteps, noise)
  out = unet(jnp.concatenate([noisy, input_latent], axis=-1), timesteps, context)
  prediction = prediction_type_of(cfg)
  target = schedule_lib.model_target(prediction, schedule.alphas_cumprod, target_latent, noise,
                                     timesteps)
  per_example = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=(1, 2, 3))
  if t.get("min_snr_gamma", 0.0) > 0:
    per_example = per_example * schedule_lib.min_snr_weights(
        jnp.asarray(schedule.snr)[timesteps], t.min_snr_gamma, prediction)
  loss = jnp.mean(per_example)
  return loss, {"loss": loss, "dropped_text": drop_text.mean(), "dropped_image": drop_image.mean()}


def make_train_step(cfg, graphdefs, tx, schedule, empty_ids):
  t = cfg.ldm_train
  accum = max(int(t.grad_accum), 1)
  lr = learning_rate_of(t)

  def step(state, batch, rng):
    loss_fn = functools.partial(diffusion_loss, frozen=state["frozen"], graphdefs=graphdefs,
                                cfg=cfg, schedule=schedule, empty_ids=empty_ids,
                                latent_scale=state.get("latent_scale"))
    grad_fn = jax.value_and_grad(lambda p, b, k, mk: loss_fn(p, batch=b, keys=k, mixer_key=mk),
                                 has_aux=True)
    n = batch["h_img"].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
    mixer_key = jax.random.fold_in(rng, n)
    # Per-example keys make the result independent of the micro-batch split (up to the mixer's
    # dropout, which draws one key per micro-batch).
    (loss, aux), grads = common.accumulate_gradients(
        lambda p, mb, xs: grad_fn(p, mb, xs[0], jax.random.fold_in(mixer_key, xs[1][0])),
        state["trained"], batch, (keys, jnp.zeros((n,), jnp.int32)), accum)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trained"])
    trained = optax.apply_updates(state["trained"], updates)
    # LitEma counts this update before computing its decay: n = step + 1.
    ema = ema_of(state["ema"], trained, state["step"] + 1, t.ema_decay,
                 t.get("ema_scope", "trained"))
    ok = common.all_finite(loss, grads)
    # One lax.cond, not a jnp.where per leaf: wheres that all wait on a reduction over every
    # gradient made XLA:CPU compile this step 4x slower (175 s vs 43 s of CPU, tiny config).
    updated = {"trained": trained, "opt_state": opt_state, "ema": ema}
    kept = jax.lax.cond(ok, lambda: updated, lambda: {k: state[k] for k in updated})
    new_state = dict(state, **kept,
                     step=state["step"] + ok.astype(jnp.int32),
                     nonfinite=state["nonfinite"] + 1 - ok.astype(jnp.int32))
    if callable(lr):  # a schedule: log the rate this update used (its count is the step's)
      aux = dict(aux, lr=lr(state["step"]))
    return new_state, aux

  return step


EMA_SCOPES = ("unet", "trained")


def ema_of(ema: dict, trained: dict, num_updates, decay: float, scope: str) -> dict:
  """The EMA weights after an update. scope "trained": every trained module averaged; "unet":
  the release's LitEma(self.model), the UNet only: the other trained modules (the conditioner
  with train_projections) are sampled with their current weights, so their "EMA" copy is them."""
  if scope not in EMA_SCOPES:
    raise ValueError(f"ldm_train.ema_scope={scope!r}: one of {EMA_SCOPES}")
  new = common.ema_update(ema, trained, num_updates, decay)
  if scope == "unet":
    new = {k: (v if k == "unet" else jax.tree.map(lambda p, e: p.astype(e.dtype), trained[k],
                                                   ema[k]))
           for k, v in new.items()}
  return new


def init_state(cfg, workdir: Path, mesh, *, abstract: bool = False):
  """(graphdefs, state, state_shardings, tx): the train state (common.make_state's layout, with
  the EMA and the latent scale) placed on `mesh`. `abstract`: ShapeDtypeStructs with shardings
  instead (plan's compile targets); nothing is initialised or read from disk."""
  t = cfg.ldm_train
  lego_ldm.check(cfg)
  lr = learning_rate_of(t)
  if abstract:
    graphdefs, params = lego_ldm.abstract(cfg)
  else:
    split = {n: nnx.split(m) for n, m in initialise(cfg, workdir).items()}
    graphdefs, params = ({n: v[0] for n, v in split.items()}, {n: v[1] for n, v in split.items()})
  trained_names = lego_ldm.trained_names(cfg)
  trained = {n: params[n] for n in lego_ldm.NAMES if n in trained_names}
  frozen = {n: params[n] for n in lego_ldm.NAMES if n not in trained_names}
  tx = common.adamw(trained, lr, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps)
  # latent_scale is saved with the checkpoint: generation decodes with the factor training used.
  state, shardings = common.make_state(
      mesh, tx, trained, frozen, ema=True, abstract=abstract,
      extra={"latent_scale": jnp.asarray(cfg.vae.scaling_factor, jnp.float32)})
  return graphdefs, state, shardings, tx


def scale_by_std(cfg, workdir: Path, graphdefs, frozen, num: int = 64) -> float:
  """Latent diffusion's `scale_by_std`: 1 / std of the VAE posterior samples of the first `num`
  training targets, so the diffusion's data have unit variance. SD's 0.18215 is this number for
  SD's VAE; a VAE trained from scratch (the embedded default) needs its own (the tiny one's
  latents have std ~1.5: x 0.18215 would leave the diffusion ~0.28-std data and a 13x lower
  signal-to-noise ratio at every step than its schedule assumes). The same records in the same
  order on every host, so every host computes the same number. With `cache_frozen` the cached
  posteriors of those records are read (no VAE encode to compile)."""
  if cfg.ldm_train.cache_frozen:  # train() builds the cache first
    src = ldm_cache.open_source(workdir, "train")
    rows = [ldm_cache.decode(src[i]) for i in range(min(num, len(src)))]
    mean = np.stack([r["target_mean"] for r in rows]).astype(np.float64)
    logvar = np.stack([r["target_logvar"] for r in rows]).astype(np.float64)
    z = mean + np.exp(0.5 * logvar) * np.random.default_rng(0).normal(size=mean.shape)
    return _inverse_std(float(np.std(z)), len(rows))
  loader = pipeline.pair_loader(
      pipeline.records_dir_of(cfg.data, workdir), "train", batch_size=num,
      image_size=cfg.data.image_size, vllm_image_size=None, shuffle=False, num_epochs=1,
      shard_options=grain.sharding.NoSharding(), worker_count=0, drop_remainder=False)
  batch = next(iter(loader))
  vae = nnx.merge(graphdefs["vae"], frozen["vae"])

  @jax.jit
  def std(frames):
    mean, logvar = vae.encode(images.frames_to_unit_range(frames))
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(0), mean.shape)
    return jnp.std(z.astype(jnp.float32))

  return _inverse_std(float(std(jnp.asarray(batch["target"]))), len(batch["target"]))


def _inverse_std(value: float, num: int) -> float:
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f"ldm_train.scale_by_std: the VAE's latents have std {value} on the first "
                     f"{num} training targets")
  return 1.0 / value


def loader_for(cfg, workdir: Path, split: str, batch_size: int, train: bool,
               shard_options=None):
  """lego_ldm.loader_for, reading the frozen-encoder cache in training with `cache_frozen`."""
  cache = None
  if train and cfg.ldm_train.cache_frozen:  # cached latents and text states replace the frames
    cache = (ldm_cache.open_source(workdir, split), ldm_cache.DecodeCache())
  return lego_ldm.loader_for(cfg, workdir, split, batch_size, train, shard_options, cache)


def training_sample_callback(cfg, workdir: Path, graphdefs, num: int = 4):
  """A train-ldm callback: every `sample_every` steps, EMA samples of `num` val frames as a PNG
  (input | sample | target rows) under WORKDIR/samples/ and in TensorBoard."""
  text_ids = lego_ldm.TextIds(cfg, workdir)
  loader = lego_ldm.loader_for(cfg, workdir, "val", num, train=False)
  with iter(loader) as it:  # closed now: its workers have the rest of the split queued
    arrays = lego_ldm.batch_arrays(cfg, next(it), text_ids)
  empty = text_ids.empty()
  out_dir = Path(workdir) / "samples"
  out_dir.mkdir(parents=True, exist_ok=True)
  writer = common.MetricWriter(Path(workdir) / "logs" / "ldm_samples")

  def callback(step, state):
    models = lego_ldm.models_from(graphdefs, dict(state["frozen"], **state["ema"]),
                                  state["latent_scale"])
    decoded = ldm_infer.run_batch(models, arrays, arrays["text_ids"], empty, cfg,
                                  jax.random.key(cfg.sampler.seed))
    gen = ldm_infer.to_uint8(np.asarray(decoded), cfg.sampler.output_norm)
    inp, ref = ldm_infer.frames_uint8(arrays["input"]), ldm_infer.frames_uint8(arrays["target"])
    rows = [[inp[i], gen[i], ref[i]] for i in range(len(gen))]
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    Image.fromarray(grid).save(out_dir / f"step_{step:07d}.png")
    writer.image(step, "samples/input|ema_sample|target", grid)

  return callback


def train(cfg, workdir: Path, stop_after: int | None = None, samples: bool = True):
  t = cfg.ldm_train
  mesh = sharding.make_mesh(cfg.mesh.shape)
  common.check_schedule("ldm_train", t, mesh)
  if samples and t.sample_every:   # its samples use cfg.sampler: fail now, not at the first sample
    sampler_lib.check_settings(cfg.sampler)
  graphdefs, state, shardings, tx = init_state(cfg, workdir, mesh)
  text_ids = lego_ldm.TextIds(cfg, workdir, train=True)
  empty_ids = jnp.asarray(text_ids.empty())
  step = jax.jit(make_train_step(cfg, graphdefs, tx, schedule_of(cfg), empty_ids),
                 in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  if t.cache_frozen:
    info = ldm_cache.build(cfg, workdir, graphdefs, state["frozen"], text_ids)
    if jax.process_index() == 0 and not info.get("kept"):
      print(f"train-ldm: frozen-encoder cache {ldm_cache.cache_dir(workdir)}: "
            f"{info['num_records']} examples, {info['bytes_per_example'] / 1024:.1f} KiB each")
  if t.scale_by_std:  # a resumed run keeps its checkpoint's factor (loop.run restores it)
    scale = scale_by_std(cfg, workdir, graphdefs, state["frozen"])
    state["latent_scale"] = jax.device_put(jnp.asarray(scale, jnp.float32),
                                           shardings["latent_scale"])
    if jax.process_index() == 0:
      print(f"train-ldm: latent scale 1/std = {scale:.5f} (ldm_train.scale_by_std; "
            f"cfg.vae.scaling_factor={cfg.vae.scaling_factor} unused)")
  # Data shards, not hosts, fix the data order: a run on 2 hosts equals one on 1 host with
  # --data_shards=2, and resumes on either.
  loader = distributed.ShardedLoader(
      lambda shard, n: loader_for(cfg, workdir, "train", n, train=True, shard_options=shard),
      global_batch=t.batch_size)
  every = None
  if samples and t.sample_every:
    every = {t.sample_every: training_sample_callback(cfg, workdir, graphdefs)}
  with sharding.use_mesh(mesh):
    state = loop.run(
        name="ldm", workdir=workdir, config=cfg.to_dict(), state=state, state_shardings=shardings,
        step_fn=step, loader=loader,
        batch_fn=lambda b: pipeline.to_global(lego_ldm.batch_arrays(cfg, b, text_ids), mesh),
        num_steps=t.num_steps, seed=cfg.seed, log_every=t.log_every, ckpt_every=t.ckpt_every,
        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
        skip_nonfinite=t.skip_nonfinite, items_per_step=t.batch_size, every=every,
        stop_after=stop_after)
  return graphdefs, state


def main(cfg, workdir: Path) -> int:
  train(cfg, workdir)
  print(f"train-ldm: checkpoints in {Path(workdir) / 'checkpoints' / 'ldm'}, samples in "
        f"{Path(workdir) / 'samples'}, TensorBoard logs in {Path(workdir) / 'logs'}")
  return 0
