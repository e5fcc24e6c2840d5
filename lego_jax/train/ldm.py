"""`lego-jax train-ldm`: LEGO's latent diffusion stage (paper Sec. 3.2; facts file "Stage 2").

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
`use_image_embedding` / `use_text_embedding`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lego_jax.config import ConfigError
from lego_jax.data import features as features_lib
from lego_jax.data import images
from lego_jax.data import pipeline
from lego_jax.data.tokenizer import load_clip_tokenizer
from lego_jax.infer import sampler as sampler_lib
from lego_jax.infer import schedule as schedule_lib
from lego_jax.infer.schedule import NoiseSchedule
from lego_jax.models.clip_text import CLIPText, CLIPTextConfig
from lego_jax.models.conditioner import Conditioner, ConditionerConfig
from lego_jax.models.unet import UNet, UNetConfig
from lego_jax.parallel import distributed, sharding
from lego_jax.train import common, loop
from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train import ldm_cache
from lego_jax.train import vae as vae_train

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "vae", "vae_train", "unet", "clip_text", "conditioner", "ldm_train",
                   "sampler", "mesh", "checkpoint", "seed")


TEXT_SOURCES = ("generated", "annotation", "action")


def uses_features(cfg) -> bool:
  t = cfg.ldm_train
  return t.use_image_embedding or t.use_text_embedding or t.text_source == "generated"


def schedule_of(cfg) -> NoiseSchedule:
  t = cfg.ldm_train
  schedule = NoiseSchedule(t.num_timesteps, t.beta_start, t.beta_end,
                           zero_terminal_snr=bool(t.get("zero_terminal_snr", False)))
  try:
    sampler_lib.check_prediction(prediction_type_of(cfg), schedule)
  except ValueError as e:
    raise ConfigError(f"ldm_train: {e}") from None
  return schedule


def prediction_type_of(cfg) -> str:
  """What the UNet is trained to output (ldm_train.prediction_type; the release: epsilon)."""
  return cfg.ldm_train.get("prediction_type", "epsilon")


def build_trainable(cfg, seed: int):
  """UNet + conditioner at their initialisation (random; SD/LEGO weights are loaded after)."""
  rngs = nnx.Rngs(seed)
  unet = UNet(UNetConfig(**cfg.unet), rngs=rngs)
  conditioner = Conditioner(ConditionerConfig(**cfg.conditioner), rngs=nnx.Rngs(seed + 23))
  return unet, conditioner


def build_text_encoder(cfg, seed: int) -> CLIPText:
  return CLIPText(CLIPTextConfig(**cfg.clip_text), rngs=nnx.Rngs(seed + 7))


def initialise(cfg, workdir: Path):
  """(unet, conditioner, clip_text, vae) as the config's `init` says."""
  t = cfg.ldm_train
  if t.init == "random" and t.init_checkpoint:
    raise ConfigError(
        f"ldm_train.init_checkpoint={t.init_checkpoint!r} is read only with ldm_train.init=sd15 "
        "or lego (it says which weights the file holds); ldm_train.init='random' ignores it")
  unet, conditioner = build_trainable(cfg, cfg.seed)
  clip_text = build_text_encoder(cfg, cfg.seed)
  if t.init == "random":
    vae = vae_train.load_trained(cfg, workdir)
  elif t.init in ("sd15", "lego"):
    from lego_jax.weights import checkpoints as ckpts

    if not t.init_checkpoint:
      raise FileNotFoundError(
          f"ldm_train.init={t.init!r} needs --config.ldm_train.init_checkpoint: "
          + ckpts.WHERE_TO_GET[t.init])
    vae = vae_train.build(cfg)
    ckpts.load_ldm_single_file(t.init_checkpoint, unet=unet, vae=vae, clip_text=clip_text,
                               conditioner=conditioner if t.init == "lego" else None,
                               use_ema=t.init_use_ema, widen_from_sd=t.init == "sd15")
  else:
    raise ValueError(f"ldm_train.init={t.init!r}: one of random, sd15, lego")
  return unet, conditioner, clip_text, vae


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


def init_state(cfg, workdir: Path, mesh):
  t = cfg.ldm_train
  if t.text_source not in TEXT_SOURCES:
    raise ValueError(f"ldm_train.text_source={t.text_source!r}: one of {TEXT_SOURCES}")
  unet, conditioner, clip_text, vae = initialise(cfg, workdir)
  graphdefs, trained, frozen = {}, {}, {}
  for name, module, trains in (("unet", unet, True), ("conditioner", conditioner, t.train_projections),
                               ("vae", vae, False), ("clip_text", clip_text, False)):
    graphdefs[name], params = nnx.split(module)
    (trained if trains else frozen)[name] = params
  tx = common.adamw(trained, t.lr, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps)
  replicated = NamedSharding(mesh, P())
  trained = jax.device_put(trained, sharding.state_shardings(mesh, trained))
  frozen = jax.device_put(frozen, sharding.state_shardings(mesh, frozen))
  # Adam's moments carry the parameters' logical names: they shard exactly like them. Explicit:
  # left to jit, the step counts (which depend on no input) land on one device, off the mesh.
  opt_shardings = sharding.state_shardings(mesh, jax.eval_shape(tx.init, trained))
  state = {"trained": trained, "frozen": frozen,
           "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(trained),
           "ema": jax.jit(lambda p: jax.tree.map(jnp.copy, p))(trained),
           "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           "nonfinite": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           # Saved with the checkpoint: generation decodes with the factor training used.
           "latent_scale": jax.device_put(jnp.asarray(cfg.vae.scaling_factor, jnp.float32),
                                          replicated)}
  shardings = jax.tree.map(lambda x: x.sharding, state)
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
  import grain

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


def models_from(graphdefs, params: dict, latent_scale) -> tuple:
  """(unet, conditioner, clip_text, vae) from split params; the VAE carries the latent scale
  the LDM was trained with (as diffusers' vae.config.scaling_factor)."""
  unet, conditioner, clip_text, vae = (nnx.merge(graphdefs[n], params[n])
                                       for n in ("unet", "conditioner", "clip_text", "vae"))
  vae.config = dataclasses.replace(vae.config, scaling_factor=float(latent_scale))
  return unet, conditioner, clip_text, vae


class TextIds:
  """Host side: the chosen text of each example -> (B, 77) CLIP token ids."""

  def __init__(self, cfg, workdir: Path):
    self.tokenize = load_clip_tokenizer(cfg, workdir)
    self.source = cfg.ldm_train.text_source
    self.text_len = cfg.conditioner.text_len

  def texts(self, batch: dict) -> list[str]:
    key = {"generated": "generated", "annotation": "description", "action": "action"}[self.source]
    return [str(s) for s in batch[key]]

  def __call__(self, batch: dict) -> np.ndarray:
    return self.tokenize(self.texts(batch))

  def empty(self) -> np.ndarray:
    return self.tokenize([""])


def feature_extras(cfg, workdir: Path, split: str) -> tuple[dict, list]:
  """The VLLM feature records zipped with the split's pairs, and their decoding operation."""
  extras, ops = {}, []
  if uses_features(cfg):
    extras["features"] = features_lib.open_source(Path(workdir) / "features", split)
    ops.append(features_lib.DecodeFeatures(cfg.conditioner.text_len))
  return extras, ops


def loader_for(cfg, workdir: Path, split: str, batch_size: int, train: bool,
               shard_options=None):
  extras, ops = feature_extras(cfg, workdir, split)
  views = ("ldm",)
  if train and cfg.ldm_train.cache_frozen:  # cached latents and text states replace the frames
    extras["cache"] = ldm_cache.open_source(workdir, split)
    ops.append(ldm_cache.DecodeCache())
    views = ()
  make = pipeline.train_pairs if train else pipeline.eval_pairs
  return make(cfg, workdir, batch_size, split=split, views=views, extra_sources=extras,
              extra_operations=ops, shard_options=shard_options)


def batch_arrays(cfg, batch: dict, text_ids: TextIds) -> dict:
  """The numeric arrays one step needs (features zero-filled when the ablation drops them)."""
  if "input_mean" in batch:  # ldm_train.cache_frozen: the frozen encoders' outputs
    out = {k: batch[k] for k in ldm_cache.LATENTS + ("text",)}
  else:
    out = {"input": batch["input"], "target": batch["target"], "text_ids": text_ids(batch)}
  b = len(out["text" if "text" in out else "text_ids"])
  n_img = cfg.data.get("num_image_tokens", None)
  if "h_img" in batch:
    out["h_img"], out["h_txt"] = batch["h_img"], batch["h_txt"]
  else:
    dim = cfg.conditioner.llm_dim
    n = (cfg.clip_vision.image_size // cfg.clip_vision.patch_size) ** 2 if n_img is None else n_img
    out["h_img"] = np.zeros((b, n, dim), np.float32)
    out["h_txt"] = np.zeros((b, cfg.conditioner.text_len, dim), np.float32)
  return out


def train(cfg, workdir: Path, stop_after: int | None = None, samples: bool = True):
  t = cfg.ldm_train
  mesh = sharding.make_mesh(cfg.mesh.shape)
  common.check_schedule("ldm_train", t, mesh)
  graphdefs, state, shardings, tx = init_state(cfg, workdir, mesh)
  text_ids = TextIds(cfg, workdir)
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
    from lego_jax.infer.generate import training_sample_callback

    every = {t.sample_every: training_sample_callback(cfg, workdir, graphdefs)}
  with sharding.use_mesh(mesh):
    state = loop.run(
        name="ldm", workdir=workdir, config=cfg.to_dict(), state=state, state_shardings=shardings,
        step_fn=step, loader=loader,
        batch_fn=lambda b: pipeline.to_global(batch_arrays(cfg, b, text_ids), mesh),
        num_steps=t.num_steps, seed=cfg.seed, log_every=t.log_every, ckpt_every=t.ckpt_every,
        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
        skip_nonfinite=t.skip_nonfinite, items_per_step=t.batch_size, every=every,
        stop_after=stop_after)
  return graphdefs, state


def load_trained(cfg, workdir: Path, use_ema: bool = True):
  """(unet, conditioner, clip_text, vae) from WORKDIR's latest train-ldm checkpoint."""
  mesh = sharding.make_mesh(cfg.mesh.shape)
  graphdefs, state, shardings, _ = init_state(cfg, workdir, mesh)
  with ckpt_lib.Checkpointer(Path(workdir) / "checkpoints" / "ldm") as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
          f"no LDM checkpoint in {ckpt.directory}: run `lego-jax train-ldm` first")
    _, state, _ = ckpt.restore(ckpt_lib.abstract_like(state, shardings))
  params = dict(state["frozen"], **(state["ema"] if use_ema else state["trained"]))
  return models_from(graphdefs, params, state["latent_scale"])


def main(cfg, workdir: Path) -> int:
  train(cfg, workdir)
  print(f"train-ldm: checkpoints in {Path(workdir) / 'checkpoints' / 'ldm'}, samples in "
        f"{Path(workdir) / 'samples'}, TensorBoard logs in {Path(workdir) / 'logs'}")
  return 0
