"""`lego-jax train-vae`: the KL autoencoder of latent diffusion, trained from scratch.

The paper starts from SD-1.5's pretrained VAE; no such weights exist offline, so the embedded
default trains its own small one first (the same model class at a small size). Loss as in latent
diffusion's autoencoder without the adversarial term: L1 reconstruction + an optional L2 term +
kl_weight * KL(posterior || N(0, 1)). After training, a reconstruction check on held-out frames
(PSNR of mode reconstructions) is written to WORKDIR/vae_check.json with a PNG of originals over
reconstructions.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from lego_jax.data import images as images_lib
from lego_jax.data import pipeline
from lego_jax.models.vae import VAE, VAEConfig, load_vae
from lego_jax.parallel import distributed, sharding
from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train import common, loop
from lego_jax.weights import io as weights_io


# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "vae", "vae_train", "mesh", "checkpoint", "seed")


def build(cfg, rngs: nnx.Rngs | None = None) -> VAE:
  return VAE(VAEConfig(**cfg.vae), rngs=rngs or nnx.Rngs(cfg.seed))


def vae_loss(model: VAE, images: jax.Array, rng: jax.Array, kl_weight: float, l2_weight: float):
  images = images_lib.frames_to_unit_range(images)
  mean, logvar = model.encode(images)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
  recon = model.decode(z)
  l1 = jnp.mean(jnp.abs(recon - images))
  l2 = jnp.mean(jnp.square(recon - images))
  # KL summed over latent elements, averaged over the batch (LDM's DiagonalGaussian.kl()).
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)).mean()
  loss = l1 + l2_weight * l2 + kl_weight * kl
  return loss, {"loss": loss, "l1": l1, "l2": l2, "kl": kl}


def make_train_step(graphdef, tx, kl_weight: float, l2_weight: float):
  def step(state, batch, rng):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["frozen"])
      return vae_loss(model, batch["images"], rng, kl_weight, l2_weight)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trained"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["trained"])
    params = optax.apply_updates(state["trained"], updates)
    ok = common.all_finite(loss, grads)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = dict(state, trained=keep(params, state["trained"]),
                     opt_state=keep(opt_state, state["opt_state"]),
                     step=state["step"] + 1, nonfinite=state["nonfinite"] + (1 - ok.astype(jnp.int32)))
    return new_state, aux

  return step


def init_state(cfg, mesh, *, abstract: bool = False):
  """(graphdef, state, state_shardings, tx): common.make_state's layout, the VAE's parameters
  trained, placed on `mesh`. `abstract`: ShapeDtypeStructs with shardings instead (restore and
  compile targets); nothing is initialised or read from disk."""
  t = cfg.vae_train
  if abstract:
    model = nnx.eval_shape(lambda: build(cfg))
  else:
    model = build(cfg)
    if t.init_checkpoint:
      # Training starts from the given VAE (SD-1.5's, as the paper does), not from random weights.
      load_init_checkpoint(model, t.init_checkpoint)
  graphdef, params, rest = common.split_params(model)
  tx = common.adamw(params, common.learning_rate(t.lr, t.num_steps, t.warmup_ratio),
                    weight_decay=t.weight_decay)
  state, shardings = common.make_state(mesh, tx, params, rest, abstract=abstract)
  return graphdef, state, shardings, tx


def images_of(batch: dict) -> np.ndarray:
  # Both frames of every pair are training images for the autoencoder.
  return np.concatenate([np.asarray(batch["input"]), np.asarray(batch["target"])], axis=0)


def train(cfg, workdir: Path, stop_after: int | None = None):
  t = cfg.vae_train
  mesh = sharding.make_mesh(cfg.mesh.shape)
  common.check_schedule("vae_train", t, mesh, pairs=True)
  graphdef, state, shardings, tx = init_state(cfg, mesh)
  step = jax.jit(make_train_step(graphdef, tx, t.kl_weight, t.l2_weight),
                 in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  # Each data shard gives batch/shards images (half of them input frames, half targets), in the
  # same rows of the global batch whatever the number of processes.
  loader = distributed.ShardedLoader(
      lambda shard, n: pipeline.train_pairs(cfg, workdir, n // 2, views=("ldm",),
                                            shard_options=shard),
      global_batch=t.batch_size, prepare=lambda b: {"images": images_of(b)})
  with sharding.use_mesh(mesh):
    state = loop.run(
        name="vae", workdir=workdir, config=cfg.to_dict(), state=state, state_shardings=shardings,
        step_fn=step, loader=loader,
        batch_fn=lambda b: pipeline.to_global(b, mesh),
        num_steps=t.num_steps, seed=cfg.seed, log_every=t.log_every, ckpt_every=t.ckpt_every,
        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
        skip_nonfinite=t.skip_nonfinite, items_per_step=t.batch_size, item_name="images",
        stop_after=stop_after)
  return graphdef, state


def load_init_checkpoint(model: VAE, path: str) -> VAE:
  return load_vae(model, weights_io.read_state_dict(path))


def load_trained(cfg, workdir: Path) -> VAE:
  """The VAE of WORKDIR's latest train-vae checkpoint (its weights alone are read); without
  one, cfg.vae_train.init_checkpoint as it is (a VAE used untrained, e.g. SD-1.5's)."""
  t = cfg.vae_train
  mesh = sharding.make_mesh(cfg.mesh.shape)
  with ckpt_lib.Checkpointer(Path(workdir) / "checkpoints" / "vae", reader=True) as ckpt:
    if ckpt.latest_step() is None:
      if t.init_checkpoint:
        graphdef, state, _, _ = init_state(cfg, mesh)
        return nnx.merge(graphdef, state["trained"], state["frozen"])
      raise FileNotFoundError(
          f"no VAE checkpoint in {ckpt.directory}: run `lego-jax train-vae` first, or set "
          "--config.vae_train.init_checkpoint to a diffusers/CompVis VAE file (SD-1.5's "
          "vae/diffusion_pytorch_model.safetensors from runwayml/stable-diffusion-v1-5)")
    graphdef, abstract, _, _ = init_state(cfg, mesh, abstract=True)
    _, state, _ = ckpt.restore({k: abstract[k] for k in ("trained", "frozen")}, partial=True)
  return nnx.merge(graphdef, state["trained"], state["frozen"])


def reconstruction_check(cfg, workdir: Path, model: VAE, num: int = 16) -> dict:
  """PSNR of mode reconstructions on held-out frames, and a PNG: originals over reconstructions."""
  loader = pipeline.eval_pairs(cfg, workdir, num, split="val", views=("ldm",))
  with iter(loader) as it:  # closed now: its workers have the rest of the split queued
    batch = next(it)
  x = jnp.asarray(images_lib.frames_to_unit_range(batch["target"]))
  recon = jax.jit(lambda m, a: m(a))(model, x)
  to01 = lambda a: np.clip((np.asarray(a) + 1) / 2, 0, 1)
  mse = np.mean((to01(recon) - to01(x)) ** 2, axis=(1, 2, 3))
  psnr = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))
  grid = np.concatenate([np.concatenate(list(to01(x)), axis=1),
                         np.concatenate(list(to01(recon)), axis=1)], axis=0)
  Image.fromarray((grid * 255).round().astype(np.uint8)).save(Path(workdir) / "vae_check.png")
  result = {"val_psnr_db": psnr, "num_images": int(x.shape[0]),
            "latent_shape": list(model.encode(x[:1])[0].shape[1:])}
  ckpt_lib.dump_json(result, Path(workdir) / "vae_check.json")
  return result


def main(cfg, workdir: Path) -> int:
  train(cfg, workdir)
  model = load_trained(cfg, workdir)
  result = reconstruction_check(cfg, workdir, model)
  print(f"train-vae: held-out reconstruction PSNR {result['val_psnr_db']:.2f} dB "
        f"({workdir / 'vae_check.png'})")
  return 0
