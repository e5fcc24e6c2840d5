"""LLaMA parity with transformers' LlamaForCausalLM, KV cache, padding, packing, bf16, sharding."""

from __future__ import annotations

import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lego_jax.infer import decode
from lego_jax.models import llama as llama_lib
from lego_jax.models.llama import Llama, LlamaConfig
from lego_jax.parallel import sharding
from lego_jax.weights import io
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.pretrained import PretrainedConfigError
from lego_jax.weights.state import abstract_param_shapes, count_params, flat_params
from helpers import rel_l2

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab, tied)
CONFIGS = {
    "gqa": (32, 48, 2, 4, 2, 64, False),        # 2 query heads per kv head
    "mqa_odd": (48, 40, 3, 3, 1, 50, False),    # odd head count, one kv head, odd vocab
    "mha_tied": (40, 72, 1, 5, 5, 70, True),    # 5 heads of 8, tied embeddings
}


def _configs(name, **overrides):
  hidden, inter, layers, heads, kv, vocab, tied = CONFIGS[name]
  hf_cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5,
      tie_word_embeddings=tied, max_position_embeddings=128)
  ours = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv, max_position=128,
                     tie_embeddings=tied, **overrides)
  return hf_cfg, ours


_CACHE = {}


def reference(name, tmp_path_factory):
  """(transformers model, its save_pretrained state dict as read back from disk)."""
  if name not in _CACHE:
    torch.manual_seed(sum(map(ord, name)))
    hf_cfg, _ = _configs(name)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    path = tmp_path_factory.mktemp(f"llama_{name}")
    model.save_pretrained(path)
    _CACHE[name] = (model, io.read_state_dict(path))
    _PATHS[name] = path
  return _CACHE[name]


_PATHS = {}


def ours(name, tmp_path_factory, **overrides):
  """Our model with the reference weights, built abstractly (no random init to overwrite)."""
  _, cfg = _configs(name, **overrides)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  return llama_lib.load_llama(model, reference(name, tmp_path_factory)[1])


def hf_run(model, ids):
  with torch.no_grad():
    out = model(torch.as_tensor(ids), output_hidden_states=True)
    base = model.model(torch.as_tensor(ids)).last_hidden_state
  return out.logits.numpy(), out.hidden_states[-1].numpy(), base.numpy()


def test_full_size_param_count():
  shapes = abstract_param_shapes(lambda: Llama(LlamaConfig(), rngs=nnx.Rngs(0)))
  assert sum(int(np.prod(s)) for s in shapes.values()) == 13_015_864_320
  assert shapes["layers.self_attn.q_proj.kernel"] == (40, 5120, 5120)
  assert shapes["layers.mlp.down_proj.kernel"] == (40, 13824, 5120)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_hidden_match_transformers(name, tmp_path_factory):
  hf, sd = reference(name, tmp_path_factory)
  model = ours(name, tmp_path_factory)
  assert count_params(model) == sum(p.numel() for p in hf.parameters())
  ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 11))
  ref_logits, ref_last, ref_base = hf_run(hf, ids)
  # transformers' hidden_states[-1] is the output of the final RMSNorm (= last_hidden_state).
  np.testing.assert_array_equal(ref_last, ref_base)
  logits, hidden, cache = model(jnp.asarray(ids))
  assert cache is None
  assert logits.shape == ref_logits.shape and hidden.shape == ref_last.shape
  assert rel_l2(logits, ref_logits) <= 1e-4
  assert rel_l2(hidden, ref_last) <= 1e-4


def test_gradients_with_remat_match_torch(tmp_path_factory):
  hf, _ = reference("mqa_odd", tmp_path_factory)
  model = ours("mqa_odd", tmp_path_factory, remat=True)
  rng = np.random.default_rng(9)
  ids = rng.integers(0, 50, (2, 7))
  weights = rng.normal(size=(2, 7, 50)).astype(np.float32)
  hf.zero_grad()
  (hf(torch.as_tensor(ids)).logits * torch.from_numpy(weights)).sum().backward()
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids))[0] * weights)))(model)
  attn = hf.model.layers[1].self_attn
  assert rel_l2(grads["layers"]["self_attn"]["k_proj"]["kernel"].get_value()[1],
             attn.k_proj.weight.grad.numpy().T) <= 1e-4
  assert rel_l2(grads["layers"]["input_layernorm"]["scale"].get_value()[2],
             hf.model.layers[2].input_layernorm.weight.grad.numpy()) <= 1e-4
  assert rel_l2(grads["embed_tokens"]["embedding"].get_value(),
             hf.model.embed_tokens.weight.grad.numpy()) <= 1e-4
  hf.zero_grad()


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
def test_kv_cache_prefill_then_decode_equals_full_forward(per_layer, tmp_path_factory):
  hf, _ = reference("gqa", tmp_path_factory)
  model = ours("gqa", tmp_path_factory)
  ids = np.random.default_rng(2).integers(0, 64, (2, 9))
  ref_logits, ref_hidden, _ = hf_run(hf, ids)
  cache = model.init_cache(2, 12, per_layer=per_layer)
  # per_layer: the blocks run from per-layer weight copies with one cache buffer per layer
  # (what generation does), the same numbers as the stacked scan.
  step = nnx.jit(lambda m, x, c: m(x, cache=c, layers=m.layer_states() if per_layer else None))
  logits, hidden, cache = step(model, jnp.asarray(ids[:, :5]), cache)
  outs, hids = [logits], [hidden]
  for t in range(5, 9):  # one compiled decode step, reused
    logits, hidden, cache = step(model, jnp.asarray(ids[:, t:t + 1]), cache)
    outs.append(logits)
    hids.append(hidden)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [9, 9])
  if per_layer:
    assert [k.shape for k in cache.k] == [(2, 12, 2, 8)] * 2 and cache.max_len == 12
  else:
    assert cache.k.shape == (2, 2, 12, 2, 8) and cache.max_len == 12
  assert rel_l2(jnp.concatenate(outs, 1), ref_logits) <= 1e-4
  assert rel_l2(jnp.concatenate(hids, 1), ref_hidden) <= 1e-4
  other = model.init_cache(2, 12, per_layer=not per_layer)
  with pytest.raises(ValueError, match="per-layer cache goes with per-layer weights"):
    step(model, jnp.asarray(ids[:, :5]), other)


def test_right_padded_batch_rows_equal_each_row_alone(tmp_path_factory):
  hf, _ = reference("mqa_odd", tmp_path_factory)
  model = ours("mqa_odd", tmp_path_factory)
  rng = np.random.default_rng(3)
  lengths = np.array([8, 3, 6])
  ids = np.zeros((3, 8), np.int64)
  for b, n in enumerate(lengths):
    ids[b, :n] = rng.integers(1, 50, n)
  cache = model.init_cache(3, 10)
  logits, _, cache = model(jnp.asarray(ids), cache=cache, lengths=jnp.asarray(lengths))
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
  # One more token per row, written at each row's own slot and position.
  nxt = rng.integers(1, 50, (3, 1))
  step_logits, _, cache = model(jnp.asarray(nxt), cache=cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 1)
  for b, n in enumerate(lengths):
    alone = np.concatenate([ids[b:b + 1, :n], nxt[b:b + 1]], axis=1)
    ref, _, _ = hf_run(hf, alone)
    assert rel_l2(logits[b, :n], ref[0, :n]) <= 1e-4
    assert rel_l2(step_logits[b, 0], ref[0, n]) <= 1e-4


def test_packed_segments_equal_separate_sequences(tmp_path_factory):
  hf, _ = reference("gqa", tmp_path_factory)
  model = ours("gqa", tmp_path_factory)
  rng = np.random.default_rng(4)
  a, b = rng.integers(0, 64, (1, 5)), rng.integers(0, 64, (1, 4))
  packed = np.concatenate([a, b], axis=1)
  segments = np.array([[0] * 5 + [1] * 4])
  positions = np.array([list(range(5)) + list(range(4))])
  logits, _, _ = model(jnp.asarray(packed), segment_ids=jnp.asarray(segments),
                       positions=jnp.asarray(positions))
  assert rel_l2(logits[0, :5], hf_run(hf, a)[0][0]) <= 1e-4
  assert rel_l2(logits[0, 5:], hf_run(hf, b)[0][0]) <= 1e-4


def test_bf16_compute_with_fp32_params_stays_close(tmp_path_factory):
  hf, _ = reference("gqa", tmp_path_factory)
  model = ours("gqa", tmp_path_factory, dtype=jnp.bfloat16)
  assert model.layers.self_attn.q_proj.kernel.get_value().dtype == jnp.float32
  ids = np.random.default_rng(5).integers(0, 64, (2, 10))
  ref_logits, ref_hidden, _ = hf_run(hf, ids)
  logits, hidden, _ = model(jnp.asarray(ids))
  assert logits.dtype == jnp.bfloat16
  assert rel_l2(logits, ref_logits) <= 3e-2
  assert rel_l2(hidden, ref_hidden) <= 3e-2


def test_bf16_generation_greedy_matches_fp32_reference_and_sampling_knobs(tmp_path_factory):
  hf, _ = reference("gqa", tmp_path_factory)
  model = ours("gqa", tmp_path_factory, dtype=jnp.bfloat16)
  ids = np.random.default_rng(6).integers(0, 64, (2, 6))
  lengths = np.array([6, 4])

  def run(seed=0, **kw):
    cfg = decode.SamplingConfig(max_new_tokens=4, eos_id=-1, **kw)
    return decode.generate_from_ids(model, ids, lengths, cfg, seed=seed)

  greedy = run(greedy=True)
  assert greedy.hidden.dtype == jnp.bfloat16            # bf16 compute, bf16 cache
  np.testing.assert_array_equal(np.asarray(greedy.num_tokens), [4, 4])
  for row, n in enumerate(lengths):
    with torch.no_grad():
      ref = hf.generate(torch.as_tensor(ids[row:row + 1, :n]), do_sample=False, max_new_tokens=4,
                        eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(greedy.tokens[row]), ref[0, n:].numpy())
  # The stacked scan (unstack_layers=False) makes the same tokens and H_t rows.
  stacked = run(greedy=True, unstack_layers=False)
  np.testing.assert_array_equal(np.asarray(stacked.tokens), np.asarray(greedy.tokens))
  np.testing.assert_allclose(np.asarray(stacked.hidden, np.float32),
                             np.asarray(greedy.hidden, np.float32), atol=2e-2)
  np.testing.assert_array_equal(np.asarray(run(5, temperature=5.0, unstack_layers=False).tokens),
                                np.asarray(run(5, temperature=5.0).tokens))
  greedy = np.asarray(greedy.tokens)
  compiled = decode._generate_jit("cpu")._cache_size()
  # A vanishing nucleus or k=1 leaves only the argmax, whatever the temperature.
  np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6).tokens, greedy)
  np.testing.assert_array_equal(run(temperature=1.0, top_k=1).tokens, greedy)
  hot = lambda seed: np.asarray(run(seed, temperature=5.0).tokens)
  np.testing.assert_array_equal(hot(7), hot(7))
  assert not np.array_equal(hot(7), hot(8))
  assert decode._generate_jit("cpu")._cache_size() == compiled   # the knobs are traced, not static

  # The stop is the tokenizer's EOS (transformers' tokenizer fields here), never a guessed id:
  # with row 0's first greedy token as EOS, row 0 stops at once unless min_new_tokens forbids it,
  # exactly as transformers' generate(eos_token_id=, min_new_tokens=).
  tokenizer = types.SimpleNamespace(eos_token_id=int(greedy[0, 0]), pad_token_id=None)
  for min_new in (0, 2):
    cfg = decode.SamplingConfig.for_tokenizer(tokenizer, max_new_tokens=4, greedy=True,
                                              min_new_tokens=min_new)
    assert (cfg.eos_id, cfg.pad_id) == (greedy[0, 0], greedy[0, 0])
    out = decode.generate_from_ids(model, ids, lengths, cfg)
    for row, n in enumerate(lengths):
      with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids[row:row + 1, :n]), do_sample=False,
                          max_new_tokens=4, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
                          min_new_tokens=min_new)[0, n:].numpy()
      assert int(out.num_tokens[row]) == len(ref)
      np.testing.assert_array_equal(np.asarray(out.tokens[row, :len(ref)]), ref)
    assert int(out.num_tokens[0]) == 1 if min_new == 0 else int(out.num_tokens[0]) >= min_new
  assert decode._generate_jit("cpu")._cache_size() == compiled
  with pytest.raises(ValueError, match="eos_id is not set"):
    decode.generate_from_ids(model, ids, lengths, decode.SamplingConfig(max_new_tokens=4))
  # top-p keeps exactly the best tokens whose mass above them is < p.
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(decode.filter_logits(
      logits, decode.SamplingConfig(temperature=1.0, top_p=0.79))))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = np.isfinite(np.asarray(decode.filter_logits(
      logits, decode.SamplingConfig(temperature=1.0, top_p=0.81))))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])
  kept = np.isfinite(np.asarray(decode.filter_logits(
      logits, decode.SamplingConfig(temperature=1.0, top_p=0.99, top_k=2))))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])


def test_key_errors_and_export_round_trip(tmp_path_factory, tmp_path):
  hf, sd = reference("mqa_odd", tmp_path_factory)
  model = ours("mqa_odd", tmp_path_factory)
  exported = llama_lib.export_llama(model)
  assert set(exported) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v)
  # Written as safetensors, transformers loads it as a LlamaForCausalLM state dict.
  path = llama_lib.save_llama(model, tmp_path / "model.safetensors")
  back = transformers.LlamaForCausalLM(hf.config).eval()
  missing, unexpected = back.load_state_dict(
      {k: torch.from_numpy(v.copy()) for k, v in io.read_state_dict(path).items()}, strict=False)
  assert not unexpected and all("rotary_emb" in k for k in missing)
  ids = np.random.default_rng(7).integers(0, 50, (1, 6))
  np.testing.assert_array_equal(hf_run(back, ids)[0], hf_run(hf, ids)[0])
  # Old checkpoints carry rotary inv_freq buffers: skipped on purpose.
  with_buffers = dict(sd, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8)})
  llama_lib.load_llama(nnx.eval_shape(lambda: Llama(model.config, rngs=nnx.Rngs(1))), with_buffers)
  # Anything else is listed.
  broken = dict(sd)
  del broken["model.layers.2.mlp.up_proj.weight"]
  broken["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  broken["model.norm.weight"] = np.zeros(7, np.float32)
  with pytest.raises(KeyMappingError) as err:
    llama_lib.load_llama(nnx.eval_shape(lambda: Llama(model.config, rngs=nnx.Rngs(1))), broken)
  msg = str(err.value)
  assert "model.layers.0.self_attn.extra.weight" in msg
  assert "layers.mlp.up_proj.kernel" in msg and "norm.scale (7,)" in msg


def test_sharded_forward_matches_single_device(tmp_path_factory):
  model = ours("gqa", tmp_path_factory)
  ids = jnp.asarray(np.random.default_rng(8).integers(0, 64, (4, 6)))
  ref, _, _ = model(ids)
  mesh = sharding.make_mesh((2, 2, 2))
  state = nnx.state(model)
  shardings = sharding.state_shardings(mesh, state)
  logical = nnx.get_partition_spec(state)
  # Logical names on the parameters, resolved to mesh axes by the one rule table.
  assert tuple(logical["layers"]["self_attn"]["q_proj"]["kernel"].get_value()) == (
      "layers", "embed", "heads")
  assert tuple(logical["layers"]["mlp"]["down_proj"]["kernel"].get_value()) == (
      "layers", "mlp", "embed")
  q_sharding = shardings["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
  assert tuple(q_sharding.spec) == (None, "fsdp", "tensor")
  assert tuple(shardings["embed_tokens"]["embedding"].get_value().spec) == ("tensor", "fsdp")
  with sharding.use_mesh(mesh):
    nnx.update(model, jax.device_put(state, shardings))
    logits, _, cache = nnx.jit(lambda m, x, c: m(x, cache=c))(model, ids, model.init_cache(4, 8))
  assert model.layers.self_attn.q_proj.kernel.get_value().sharding.spec == q_sharding.spec
  assert len(logits.sharding.device_set) == 8
  # The cache follows its logical axes too: batch over (data, fsdp), kv heads over tensor.
  expected = NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor", None))
  assert cache.k.sharding.is_equivalent_to(expected, cache.k.ndim)
  assert rel_l2(logits, ref) <= 1e-5


@pytest.mark.parametrize("name", ["gqa", "mqa_odd"])
def test_from_pretrained_directory_needs_no_sizes(name, tmp_path_factory):
  """save_pretrained's directory alone builds the model: heads, kv heads (GQA / one kv head),
  layers, widths and vocab come from config.json; outputs equal transformers'."""
  hf, _ = reference(name, tmp_path_factory)
  model = llama_lib.from_pretrained(_PATHS[name])
  assert model.config == _configs(name)[1]
  ids = np.random.default_rng(9).integers(0, CONFIGS[name][5], (2, 7))
  logits, hidden, _ = model(jnp.asarray(ids))
  ref_logits, ref_hidden, _ = hf_run(hf, ids)
  assert rel_l2(logits, ref_logits) <= 1e-5 and rel_l2(hidden, ref_hidden) <= 1e-5
  # The loader takes the directory's path as well as a state dict.
  again = llama_lib.load_llama(nnx.eval_shape(lambda: Llama(model.config, rngs=nnx.Rngs(1))),
                               str(_PATHS[name]))
  want = flat_params(model)
  assert all(np.array_equal(v, want[k]) for k, v in flat_params(again).items())


def test_from_pretrained_refuses_disagreements_by_field(tmp_path_factory, tmp_path):
  reference("mqa_odd", tmp_path_factory)
  src = _PATHS["mqa_odd"]
  # An override that disagrees with config.json; one it does not state is taken.
  with pytest.raises(PretrainedConfigError, match=r"num_heads=4 .*num_attention_heads\)=3"):
    llama_lib.from_pretrained(src, num_heads=4)
  assert llama_lib.from_pretrained(src, remat=True, num_heads=3).config.remat
  # config.json against the weights: a wrong kv-head count and a wrong depth, by field name.
  for key, value, field in (("num_key_value_heads", 3, "num_kv_heads"),
                            ("num_hidden_layers", 2, "num_layers")):
    bad = tmp_path / key
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedConfigError, match=f"says {field}={value} but the weights"):
      llama_lib.from_pretrained(bad)
  # What the model does not implement is refused by name, not run differently.
  config["num_hidden_layers"], config["hidden_act"] = 3, "gelu"
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(PretrainedConfigError, match="hidden_act='gelu' is not supported"):
    llama_lib.from_pretrained(bad)
  (bad / "config.json").unlink()
  with pytest.raises(PretrainedConfigError, match="no config.json"):
    llama_lib.from_pretrained(bad)


def test_layer_grads_fold_the_blocks_gradient_into_the_accumulator():
  """`layer_grads`: differentiated with respect to the accumulator, the call gives the
  accumulator plus the blocks' gradient of a plain jax.grad, bit for bit; every other
  parameter's gradient and the loss are unchanged, and the blocks' own gradient is zero."""
  _, cfg = _configs("gqa", remat=True, dtype=jnp.bfloat16)
  graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(3)))
  rng = np.random.default_rng(4)
  ids = jnp.asarray(rng.integers(0, 64, (2, 9)))
  weights = jnp.asarray(rng.normal(size=(2, 9, 64)).astype(np.float32))
  acc = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params["layers"])

  def loss(params, acc=None):
    logits = nnx.merge(graphdef, params)(ids, layer_grads=acc)[0]
    return jnp.sum(logits.astype(jnp.float32) * weights)

  plain_loss, plain = jax.jit(jax.value_and_grad(loss))(params)
  folded_loss, (grads, folded) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, acc)
  assert float(folded_loss) == float(plain_loss)
  expected = jax.jit(lambda a, g: jax.tree.map(jnp.add, a, g))(acc, plain["layers"])
  for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(grads["layers"]))
  for name in ("embed_tokens", "norm", "lm_head"):
    for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(plain[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="cache-free"):
    nnx.merge(graphdef, params)(ids, layer_grads=acc,
                                cache=nnx.merge(graphdef, params).init_cache(2, 16))
