"""train-vllm: the answer-only loss mask on a hand-built example, freezing by regex, gradient
accumulation and FSDP sharding giving the same update as one data-parallel batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lego_jax import config as config_lib
from lego_jax.data import tokenizer as tokenizer_lib
from lego_jax.data.prompts import chat_prompt, human_turn
from lego_jax.parallel import sharding
from lego_jax.train import vllm

IMAGE = tokenizer_lib.IMAGE_TOKEN_ID
PATCHES = 4


def small_cfg(**train):
  """The tiny config shrunk further; widths divisible by 8 so FSDP can split them."""
  cfg = config_lib.load("tiny")
  cfg.clip_vision.update(hidden_size=32, intermediate_size=32, num_layers=2, num_heads=2,
                         image_size=16, patch_size=8)
  cfg.llama.update(vocab_size=128, hidden_size=32, intermediate_size=32, num_layers=2,
                   num_heads=4, num_kv_heads=4)
  cfg.llava.update(vision_hidden=32, text_hidden=32)
  cfg.data.vllm_image_size = 16
  # The release's rule: the tower frozen (the tiny default trains its random tower).
  cfg.vllm_train.update({"batch_size": 8, "grad_accum": 1, "max_length": 24,
                         "frozen": r"^vision/.*", **train})
  return cfg


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  actions = [f"{v} the {c} {k}" for v in ("cut", "pick up", "open") for c in ("red", "blue")
             for k in ("carrot", "cup", "drawer")]
  lines = []
  for a in actions:
    answer = f"The left hand reaches to the right side of the table and grasps the {a[-8:]}."
    lines += [f"{chat_prompt(human_turn(a))} {answer}", answer, a]
  return tokenizer_lib.train_tokenizer(lines * 3, tmp_path_factory.mktemp("tok"), 128)


def random_batch(seed: int, batch: int, length: int = 24, vocab: int = 128, size: int = 16):
  """Token rows with PATCHES image placeholders at 2.., answers of different lengths."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 2:2 + PATCHES] = IMAGE
  targets = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
  targets = np.where(targets == IMAGE, 0, targets)
  weights = np.zeros((batch, length), np.float32)
  for b in range(batch):
    weights[b, 8:8 + 3 + 2 * b % 13] = 1.0  # 3 to 15 answer tokens per row
  return {"ids": ids, "targets": targets, "weights": weights,
          "pixels": rng.normal(size=(batch, size, size, 3)).astype(np.float32)}


def test_example_masks_the_prompt_through_inst_and_trains_answer_and_eos(tok):
  human, answer = human_turn("cut the red carrot"), "The left hand grasps the red carrot."
  e = vllm.encode_example(tok, human, answer, num_patches=PATCHES, max_length=256)
  # The prompt/answer split gives exactly the ids of the joined text (plus EOS).
  joined = vllm.expand_image(tok.encode_with_image(f"{chat_prompt(human)} {answer}"), PATCHES)
  np.testing.assert_array_equal(e.ids[:e.length], joined + [tok.eos_id])
  assert e.ids[0] == tok.bos_id and list(e.ids).count(IMAGE) == PATCHES
  assert np.all(e.ids[e.length:] == tok.pad_id)
  prompt = vllm.expand_image(tok.encode_with_image(chat_prompt(human)), PATCHES)
  assert e.num_prompt == len(prompt)
  assert tok.decode(e.ids[:e.num_prompt]).endswith("[/INST]")
  # Loss positions: the one predicting the first answer token (the "]" of [/INST]) through the
  # one predicting EOS; nothing else.
  answer_ids = tok.encode(answer, bos=False) + [tok.eos_id]
  counted = np.flatnonzero(e.weights)
  np.testing.assert_array_equal(counted, np.arange(e.num_prompt - 1, e.length - 1))
  np.testing.assert_array_equal(e.targets[counted], answer_ids)
  assert tok.decode(e.targets[counted]) == answer
  assert e.weights.sum() == len(answer_ids) and not e.truncated

  short = vllm.encode_example(tok, human, answer, num_patches=PATCHES,
                              max_length=e.num_prompt + 3)
  assert short.truncated and short.weights.sum() == 3
  np.testing.assert_array_equal(short.targets[np.flatnonzero(short.weights)], answer_ids[:3])
  with pytest.raises(config_lib.ConfigError, match="max_length"):
    vllm.encode_example(tok, human, answer, num_patches=PATCHES, max_length=5)


def test_loss_is_the_mean_nll_of_answer_tokens_only(tok):
  cfg = small_cfg()
  model = vllm.initialise(cfg)
  examples = [vllm.encode_example(tok, human_turn(a), ans, num_patches=PATCHES, max_length=256)
              for a, ans in (("open the blue drawer", "The right hand pulls it."),
                             ("pick up the red cup", "The left hand reaches to the middle."))]
  rng = np.random.default_rng(0)
  batch = {"ids": np.stack([e.ids for e in examples]),
           "targets": np.stack([e.targets for e in examples]),
           "weights": np.stack([e.weights for e in examples]),
           "pixels": rng.normal(size=(2, 16, 16, 3)).astype(np.float32)}
  nll, count, _ = nnx.jit(vllm.answer_nll)(model, batch)
  logits, _, _ = nnx.jit(lambda m, i, x: m(i, x))(model, batch["ids"], batch["pixels"])
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  expected = -sum(logp[b, t, examples[b].targets[t]]
                  for b in range(2) for t in range(examples[b].num_prompt - 1, examples[b].length - 1))
  assert int(count) == sum(len(tok.encode(a, bos=False)) + 1 for a in
                           ("The right hand pulls it.", "The left hand reaches to the middle."))
  np.testing.assert_allclose(float(nll), expected, rtol=1e-5)
  # Targets at masked positions do not matter.
  scrambled = dict(batch, targets=np.where(batch["weights"] > 0, batch["targets"],
                                           rng.integers(0, 128, batch["targets"].shape)))
  np.testing.assert_allclose(float(nnx.jit(vllm.answer_nll)(model, scrambled)[0]), float(nll),
                             rtol=1e-6)


def sgd_step(cfg, mesh, accum: int):
  """(initial state, jitted step) with plain SGD at lr 1: the update IS the gradient."""
  graphdef, state, shardings, _, _ = vllm.init_state(cfg, mesh, 10)
  tx = optax.sgd(1.0)
  state["opt_state"] = tx.init(state["trained"])
  step = jax.jit(vllm.make_train_step(graphdef, tx, optax.constant_schedule(1.0), accum=accum))
  return state, step


def run(state, step, mesh, batch):
  with sharding.use_mesh(mesh):
    old = jax.device_get(state["trained"])
    new, metrics = step(state, jax.device_put(batch, sharding.named_sharding(mesh, ("batch",))),
                        jax.random.key(0))
  delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(new["trained"]), old)
  return new, delta, jax.device_get(metrics)


def rel(a, b) -> float:
  """Relative error of two gradient trees taken as one vector (per-leaf ratios would blow up
  fp32 rounding in leaves whose gradient is tiny)."""
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(np.float64)
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


def test_frozen_vision_stays_bitwise_projector_and_lm_train():
  cfg = small_cfg()
  mesh = sharding.make_mesh((-1, 1, 1))
  graphdef, state, shardings, tx, schedule = vllm.init_state(cfg, mesh, 10)
  assert set(state["frozen"].keys()) == {"vision"}
  assert set(state["trained"].keys()) == {"lm", "projector"}
  # No optimizer state for frozen parameters.
  n_trained = len(jax.tree.leaves(state["trained"]))
  assert len([x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]) == 2 * n_trained
  vision0 = jax.device_get(state["frozen"])
  trained0 = jax.device_get(state["trained"])
  step = jax.jit(vllm.make_train_step(graphdef, tx, schedule), in_shardings=(shardings, None, None),
                 out_shardings=(shardings, None), donate_argnums=0)
  losses = []
  with sharding.use_mesh(mesh):
    for s in range(3):
      state, metrics = step(state, random_batch(s, 8), jax.random.key(s))
      losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and int(state["step"]) == 3
  for a, b in zip(jax.tree.leaves(vision0), jax.tree.leaves(jax.device_get(state["frozen"]))):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(trained0), jax.tree.leaves(jax.device_get(state["trained"])))]
  assert all(changed), f"{changed.count(False)} trained leaves did not move"
  with pytest.raises(config_lib.ConfigError, match="matches no parameter"):
    vllm.split_trainable(vllm.initialise(cfg), r"^tower/")


def test_grad_accumulation_equals_one_batch():
  cfg = small_cfg(batch_size=4)
  mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:2])
  batch = random_batch(7, 4)
  _, full, m_full = run(*sgd_step(cfg, mesh, 1), mesh, batch)
  _, accum, m_accum = run(*sgd_step(cfg, mesh, 2), mesh, batch)
  assert rel(accum, full) <= 1e-5
  np.testing.assert_allclose(m_accum["loss"], m_full["loss"], rtol=1e-6)
  assert m_full["answer_tokens"] == batch["weights"].sum()
  assert float(np.abs(np.concatenate([x.ravel() for x in jax.tree.leaves(full)])).max()) > 0


def test_fsdp_shards_parameters_and_gives_the_data_parallel_update():
  cfg = small_cfg()
  batch = random_batch(3, 8)
  dp_mesh = sharding.make_mesh((8, 1, 1))
  fsdp_mesh = sharding.make_mesh((1, 8, 1))
  _, dp, m_dp = run(*sgd_step(cfg, dp_mesh, 1), dp_mesh, batch)
  state, step = sgd_step(cfg, fsdp_mesh, 1)
  kernel = state["trained"]["lm"]["layers"]["mlp"]["up_proj"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (2, 4, 32)     # (layers, embed / 8, mlp)
  # Adam's moments are split like the parameters they follow.
  adam = vllm.init_state(cfg, fsdp_mesh, 10)[1]["opt_state"]
  moments = [x for p, x in jax.tree_util.tree_leaves_with_path(adam)
             if "up_proj" in jax.tree_util.keystr(p)]
  assert len(moments) == 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)
  new, fsdp, m_fsdp = run(state, step, fsdp_mesh, batch)
  # The updated parameters stay split: (vocab, embed / 8) per device.
  assert new["trained"]["lm"]["embed_tokens"]["embedding"][...].addressable_shards[0].data.shape \
      == (128, 4)
  assert rel(fsdp, dp) <= 1e-5
  np.testing.assert_allclose(m_fsdp["loss"], m_dp["loss"], rtol=1e-6)


def test_bf16_compute_keeps_fp32_master_weights_and_opt_state():
  mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:2])
  batch = random_batch(5, 8)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    cfg = small_cfg(compute_dtype=dtype)
    graphdef, state, shardings, tx, schedule = vllm.init_state(cfg, mesh, 10)
    assert nnx.merge(graphdef, state["trained"], state["frozen"]).lm.config.dtype \
        == jnp.dtype(dtype)
    step = jax.jit(vllm.make_train_step(graphdef, tx, schedule))
    with sharding.use_mesh(mesh):
      state, metrics = step(state, batch, jax.random.key(0))
    leaves = jax.tree.leaves(state["trained"]) + jax.tree.leaves(state["opt_state"])
    assert {x.dtype for x in leaves if x.ndim} == {jnp.dtype(jnp.float32)}
    losses[dtype] = float(metrics["loss"])
  assert np.isfinite(losses["bfloat16"])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_accumulating_step_holds_no_second_weight_sized_gradient():
  """The step `lego-jax plan` compiles (plan.vllm_stage: abstract state, FSDP over 4 devices),
  with grad_accum 4: XLA:CPU's temporaries stay below 3.1x the trained weights' per-device fp32
  bytes (2.83x measured). jax.grad's stacked gradient of the LLaMA blocks, added to the
  accumulator after each micro-batch, took them to 3.34x (the blocks' gradient now goes into the
  accumulator layer by layer, llama.fold_layer_grads; docs/plan-targets.md, 2026-12-04)."""
  from lego_jax import plan
  cfg = small_cfg(grad_accum=4, batch_size=16, max_length=64)
  # Weights dominate the temporaries: 8 blocks of width 256, short sequences.
  cfg.llama.update(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=8)
  cfg.llava.update(text_hidden=256)
  mesh = sharding.make_mesh((1, 4, 1), devices=jax.devices()[:4])
  stage = plan.vllm_stage(cfg, mesh)
  with sharding.use_mesh(mesh):
    lowered = jax.jit(stage.step, in_shardings=(stage.shardings, None, None),
                      out_shardings=(stage.shardings, None), donate_argnums=0).lower(
                          stage.state, stage.batch, jax.eval_shape(lambda: jax.random.key(0)))
  # The buffers, not the machine code, are measured: LLVM's optimisations off (as the plan).
  compiled = lowered.compile({"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})
  shard = stage.trained_params * 4 / 4
  ratio = compiled.memory_analysis().temp_size_in_bytes / shard
  assert ratio < 3.1, ratio
