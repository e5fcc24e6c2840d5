"""A train-vae step on a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices equals the step on
one device, with parameters really split; indivisible dimensions stay whole."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from lego_jax import config as config_lib
from lego_jax.data import pipeline
from lego_jax.parallel import sharding
from lego_jax.train import vae

OVERRIDES = ["vae.block_out_channels=(8,)", "vae.layers_per_block=1", "vae.norm_groups=4",
             "vae_train.lr=1e-4"]
# The attention key bias shifts every logit of a query equally, which softmax ignores: its
# gradient is zero up to rounding, and Adam scales that rounding noise to lr-sized steps.
NOISE_ONLY = "['to_k']['bias']"


def test_fit_spec_leaves_indivisible_dimensions_whole():
  mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
  spec = sharding.logical_to_spec(("embed", "mlp"))
  assert sharding.fit_spec(spec, (8, 6), mesh) == P("fsdp", "tensor")
  assert sharding.fit_spec(spec, (3, 6), mesh) == P(None, "tensor")
  assert sharding.fit_spec(P(("data", "fsdp")), (6,), mesh) == P(None)
  assert sharding.named_sharding(mesh, ("batch", None), (8, 3)).spec == P(("data", "fsdp"), None)


def _run(cfg, mesh, images, steps=2):
  graphdef, state, shardings, tx = vae.init_state(cfg, mesh)
  step = jax.jit(vae.make_train_step(graphdef, tx, cfg.vae_train.kl_weight,
                                     cfg.vae_train.l2_weight),
                 in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  losses = []
  with sharding.use_mesh(mesh):
    for i in range(steps):
      batch = pipeline.to_global({"images": images[i]}, mesh)
      state, metrics = step(state, batch, jax.random.key(i))
      losses.append(float(metrics["loss"]))
  return losses, state


def test_vae_step_on_2x2x2_mesh_equals_one_device():
  cfg = config_lib.load("tiny", OVERRIDES)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 16, 16, 3)).astype(np.float32)
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
  losses_1, state_1 = _run(cfg, one, images)
  losses_8, state_8 = _run(cfg, eight, images)

  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-6)
  assert losses_1[1] != losses_1[0]  # the first step changed the parameters
  flat_1 = dict(jax.tree_util.tree_leaves_with_path(state_1["trained"]))
  split = {"fsdp": 0, "tensor": 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state_8["trained"]):
    if NOISE_ONLY in jax.tree_util.keystr(path):
      continue
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(flat_1[path]), rtol=1e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
    for axis in split:
      if axis in jax.tree.leaves(tuple(leaf.sharding.spec)):
        split[axis] += 1
        # Really split: each device holds a part, not a replica.
        assert leaf.addressable_shards[0].data.size < leaf.size
  # FSDP over the model dimension and tensor parallelism over heads/MLP both happened.
  assert split["fsdp"] >= 10 and split["tensor"] >= 2, split
  assert state_8["trained"]["encoder"]["conv_in"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
