"""The programs `lego-jax bench` times, each at the config's sizes with random weights: the
trainers' real steps (unet-train, ldm-train, vllm-train), KV-cache decoding (vllm-decode),
generate's sampling (sample) and the Grain input pipeline (data). Each returns a
`harness.Program` (or `harness.Impl`) and the shapes it ran at; the command
(lego_jax/bench/bench.py) picks one, the harness times it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lego_jax.bench.harness import Impl, Program, param_count, random_batch, random_model
from lego_jax.data import pipeline
from lego_jax.data import tokenizer as tokenizer_lib
from lego_jax.infer import decode
from lego_jax.infer import ldm as ldm_infer
from lego_jax.models.clip_text import CLIPText, CLIPTextConfig
from lego_jax.models.conditioner import Conditioner, ConditionerConfig
from lego_jax.models.llama import Llama, LlamaConfig
from lego_jax.models import lego_ldm
from lego_jax.models.llava import Llava
from lego_jax.models.unet import UNet, UNetConfig
from lego_jax.models.vae import VAE, VAEConfig
from lego_jax.parallel import sharding
from lego_jax.train import common, ldm, vllm

# UNet attention kernels (UNetConfig.attention_impl) a bench may ask for; "default" keeps the
# config's.
UNET_ATTENTION = ("default", "xla", "cudnn")


def latent_size(cfg) -> int:
  return cfg.data.image_size // 2 ** (len(cfg.vae.block_out_channels) - 1)


def num_patches(cfg) -> int:
  return (cfg.clip_vision.image_size // cfg.clip_vision.patch_size) ** 2


def context_length(cfg) -> int:
  """LEGO's cross-attention context: CLIP text, projected H_i, mixed H_t (410 at full size)."""
  t = cfg.ldm_train
  n = cfg.conditioner.text_len
  return (n + (num_patches(cfg) if t.use_image_embedding else 0)
          + (cfg.conditioner.text_len if t.use_text_embedding else 0))


def unet_overrides(unet_attention: str) -> dict:
  return {} if unet_attention == "default" else {"attention_impl": unet_attention}


def _with(cfg_section, **changes) -> dict:
  return {**dict(cfg_section), **changes}


# --- unet-train -------------------------------------------------------------------------------


def unet_train_program(cfg, batch: int, dtype, remat: bool, mesh, unet_attention: str = "default"
                       ) -> tuple[Program, dict]:
  def build(remat_):
    return UNetConfig(**_with(cfg.unet, dtype=dtype, remat=remat_,
                              **unet_overrides(unet_attention)))

  model = random_model(lambda: UNet(build(remat), rngs=nnx.Rngs(0)), mesh, cfg.seed)
  graphdef, params = nnx.split(model)
  t = cfg.ldm_train
  tx = common.adamw(params, t.lr, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps)
  schedule = lego_ldm.schedule_of(cfg)
  params = jax.device_put(params, sharding.state_shardings(mesh, params))
  state = {"params": params, "opt_state": jax.jit(tx.init)(params)}
  shardings = jax.tree.map(lambda x: x.sharding, state)
  size, ctx = latent_size(cfg), context_length(cfg)
  out_channels = cfg.unet.out_channels
  data = random_batch({
      "target": ((batch, size, size, out_channels), "normal", 1.0),
      "input": ((batch, size, size, cfg.unet.in_channels - out_channels), "normal", 1.0),
      "context": ((batch, ctx, cfg.unet.context_dim), "normal", 1.0)})
  data = pipeline.to_global(data, mesh)

  def make_step(gd):
    def loss_fn(p, data, rng):
      unet = nnx.merge(gd, p)
      k_t, k_noise = jax.random.split(rng)
      b = data["target"].shape[0]
      timesteps = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps)
      noise = jax.random.normal(k_noise, data["target"].shape, jnp.float32)
      noisy = schedule.q_sample(data["target"], timesteps, noise)
      eps = unet(jnp.concatenate([noisy, data["input"]], axis=-1), timesteps, data["context"])
      return jnp.mean(jnp.square(eps - noise))

    def step(state, data, rng):
      loss, grads = jax.value_and_grad(loss_fn)(state["params"], data, rng)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    return step

  key = jax.random.key(0)
  program = Program(make_step(graphdef), (state, data, key), mesh, carry=True,
                    in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                    flops_fn=make_step(nnx.split(nnx.eval_shape(
                        lambda: UNet(build(False), rngs=nnx.Rngs(0))))[0]) if remat else None)
  shapes = {"latent": [batch, size, size, cfg.unet.in_channels],
            "context": [batch, ctx, cfg.unet.context_dim],
            "params": param_count(params)}
  return program, shapes


# --- ldm-train --------------------------------------------------------------------------------


def ldm_models(cfg, dtype, remat: bool, mesh=None, param_dtype=jnp.float32,
               unet_attention: str = "default"):
  """(unet, conditioner, clip_text, vae) at the config's sizes computing in `dtype`: random on
  `mesh`, or abstract (shapes only) without one."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)

  def build():
    rngs = nnx.Rngs(0)
    unet = UNetConfig(**_with(cfg.unet, remat=remat, **kw, **unet_overrides(unet_attention)))
    return (UNet(unet, rngs=rngs),
            Conditioner(ConditionerConfig(**_with(cfg.conditioner, **kw)), rngs=rngs),
            CLIPText(CLIPTextConfig(**_with(cfg.clip_text, **kw)), rngs=rngs),
            VAE(VAEConfig(**_with(cfg.vae, **kw)), rngs=rngs))

  return nnx.eval_shape(build) if mesh is None else random_model(build, mesh, cfg.seed)


def ldm_train_program(cfg, batch: int, dtype, remat: bool, mesh, unet_attention: str = "default"
                      ) -> tuple[Program, dict]:
  """train-ldm's step (lego_jax.train.ldm.make_train_step) on a state laid out as its
  `init_state` lays it out, with a random VAE instead of a trained one."""
  t = cfg.ldm_train
  names = ("unet", "conditioner", "clip_text", "vae")
  trains = {"unet": True, "conditioner": t.train_projections, "clip_text": False, "vae": False}

  def split(models):
    graphdefs, trained, frozen = {}, {}, {}
    for name, module in zip(names, models):
      graphdefs[name], params = nnx.split(module)
      (trained if trains[name] else frozen)[name] = params
    return graphdefs, trained, frozen

  graphdefs, trained, frozen = split(ldm_models(cfg, dtype, remat, mesh,
                                                unet_attention=unet_attention))
  tx = common.adamw(trained, t.lr, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps)
  trained = jax.device_put(trained, sharding.state_shardings(mesh, trained))
  frozen = jax.device_put(frozen, sharding.state_shardings(mesh, frozen))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"trained": trained, "frozen": frozen, "opt_state": jax.jit(tx.init)(trained),
           "ema": jax.jit(lambda p: jax.tree.map(jnp.copy, p))(trained),
           "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           "nonfinite": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
  shardings = jax.tree.map(lambda x: x.sharding, state)
  size, text_len = cfg.data.image_size, cfg.conditioner.text_len
  vocab, llm = cfg.clip_text.vocab_size, cfg.conditioner.llm_dim
  data = pipeline.to_global(random_batch({
      "input": ((batch, size, size, 3), "uniform", 1.0),
      "target": ((batch, size, size, 3), "uniform", 1.0),
      "text_ids": ((batch, text_len), "int", vocab),
      "h_img": ((batch, num_patches(cfg), llm), "normal", 1.0),
      "h_txt": ((batch, text_len, llm), "normal", 1.0)}), mesh)
  empty_ids = jnp.asarray(random_batch({"e": ((1, text_len), "int", vocab)}, seed=1)["e"])
  schedule = lego_ldm.schedule_of(cfg)
  step = ldm.make_train_step(cfg, graphdefs, tx, schedule, empty_ids)
  counting = (ldm.make_train_step(
      cfg, split(ldm_models(cfg, dtype, False, unet_attention=unet_attention))[0], tx, schedule,
      empty_ids) if remat else None)
  program = Program(step, (state, data, jax.random.key(0)), mesh, carry=True,
                    in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                    flops_fn=counting)
  shapes = {"images": [batch, size, size, 3], "latent": [batch, latent_size(cfg),
                                                         latent_size(cfg), cfg.unet.in_channels],
            "context": [batch, context_length(cfg), cfg.unet.context_dim],
            "grad_accum": int(t.grad_accum), "trained_params": param_count(trained),
            "frozen_params": param_count(frozen)}
  return program, shapes


# --- vllm-train -------------------------------------------------------------------------------


def vllm_batch(cfg, batch: int, seq_len: int, mesh, image_token_id: int) -> dict:
  """Right-padded-free sequences: BOS, a short prefix, the image placeholders, text; the last
  third of each sequence counts as the answer (loss weights 1)."""
  patches = num_patches(cfg)
  if seq_len < patches + 8:
    raise ValueError(f"--seq_len={seq_len} cannot hold the {patches} image placeholders")
  size = cfg.clip_vision.image_size
  data = random_batch({"ids": ((batch, seq_len), "int", cfg.llama.vocab_size),
                       "targets": ((batch, seq_len), "int", cfg.llama.vocab_size),
                       "pixels": ((batch, size, size, 3), "normal", 1.0)})
  data["ids"][:, 4:4 + patches] = image_token_id
  weights = np.zeros((batch, seq_len), np.float32)
  weights[:, max(patches + 4, (2 * seq_len) // 3):] = 1.0
  data["weights"] = weights
  return pipeline.to_global(data, mesh)


def vllm_train_program(cfg, batch: int, seq_len: int, dtype, remat: bool, mesh
                       ) -> tuple[Program, dict]:
  t = cfg.vllm_train
  dtype_name = jnp.dtype(dtype).name
  config = vllm.llava_config(cfg, dtype=dtype_name, remat=remat)
  model = random_model(lambda: Llava(config, rngs=nnx.Rngs(0)), mesh, cfg.seed)
  accum = max(int(t.grad_accum), 1)
  graphdef, state, shardings, tx, schedule = vllm.init_state(cfg, mesh, 1000, model=model,
                                                             dtype=dtype_name, remat=remat)
  data = vllm_batch(cfg, batch, seq_len, mesh, tokenizer_lib.IMAGE_TOKEN_ID)
  step = vllm.make_train_step(graphdef, tx, schedule, accum=accum)
  counting = None
  if remat:
    counting_model = nnx.eval_shape(lambda: Llava(
        vllm.llava_config(cfg, dtype=dtype_name, remat=False), rngs=nnx.Rngs(0)))
    counting = vllm.make_train_step(vllm.split_trainable(counting_model, t.frozen)[0], tx,
                                    schedule, accum=accum)
  program = Program(step, (state, data, jax.random.key(0)), mesh, carry=True,
                    in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                    flops_fn=counting)
  shapes = {"ids": [batch, seq_len], "pixels": list(data["pixels"].shape), "grad_accum": accum,
            "trained_params": param_count(state["trained"]),
            "frozen_params": param_count(state["frozen"]), "frozen": t.frozen}
  return program, shapes


# --- vllm-decode ------------------------------------------------------------------------------


def decode_program(cfg, batch: int, prompt_len: int, new_tokens: int, dtype, param_dtype, mesh
                   ) -> tuple[Program, dict]:
  g = cfg.vllm_generate
  config = LlamaConfig(**_with(cfg.llama, dtype=dtype, param_dtype=param_dtype))
  if prompt_len + new_tokens > config.max_position:
    raise ValueError(f"prompt {prompt_len} + {new_tokens} new tokens exceed llama.max_position="
                     f"{config.max_position}")
  lm = random_model(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, cfg.seed)
  graphdef, state = nnx.split(lm)
  state = jax.device_put(state, sharding.state_shardings(mesh, state))
  ids = random_batch({"ids": ((batch, prompt_len), "int", config.vocab_size)})["ids"]
  embeds = jax.jit(lambda s, i: nnx.merge(graphdef, s).embed(i))(state, jnp.asarray(ids))
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  # eos_id -1 never matches a token: every row makes exactly `new_tokens` tokens.
  knobs = decode.SamplingConfig(
      max_new_tokens=new_tokens, greedy=bool(g.greedy), temperature=float(g.temperature),
      top_p=float(g.top_p), top_k=int(g.top_k), eos_id=-1, pad_id=0,
      unstack_layers=bool(g.get("unstack_layers", True))).traced()
  cache_dtype = jnp.dtype(dtype)

  def generate(state, embeds, lengths, key, knobs):
    return decode._generate(graphdef, state, embeds, lengths, key, knobs, cache_dtype)

  program = Program(generate, (state, embeds, lengths, jax.random.key(0), knobs), mesh,
                    while_trips=new_tokens - 1,
                    compiler_options=decode.compiler_options(mesh.devices.flat[0].platform))
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  shapes = {"prompt": [batch, prompt_len], "new_tokens": new_tokens,
            "params": param_count(state), "weight_bytes": int(weight_bytes),
            "param_dtype": jnp.dtype(param_dtype).name,
            "sampling": {"greedy": bool(g.greedy), "temperature": float(g.temperature),
                         "top_k": int(g.top_k), "top_p": float(g.top_p)},
            "unstack_layers": bool(knobs.unstack_layers)}
  return program, shapes


# --- sample -----------------------------------------------------------------------------------


def sample_program(cfg, batch: int, num_steps: int, dtype, param_dtype, mesh,
                   unet_attention: str = "default") -> tuple[Program, dict]:
  models = ldm_models(cfg, dtype, False, mesh, param_dtype, unet_attention)
  graphdefs, states = zip(*(nnx.split(m) for m in models))
  states = tuple(jax.device_put(s, sharding.state_shardings(mesh, s)) for s in states)
  size, text_len = cfg.data.image_size, cfg.conditioner.text_len
  vocab, llm = cfg.clip_text.vocab_size, cfg.conditioner.llm_dim
  data = pipeline.to_global(random_batch({
      "input": ((batch, size, size, 3), "uniform", 1.0),
      "text_ids": ((batch, text_len), "int", vocab),
      "h_img": ((batch, num_patches(cfg), llm), "normal", 1.0),
      "h_txt": ((batch, text_len, llm), "normal", 1.0)}), mesh)
  empty_ids = jnp.asarray(random_batch({"e": ((1, text_len), "int", vocab)}, seed=1)["e"])
  s, t = cfg.sampler, cfg.ldm_train

  def run(states, data, key):
    unet, conditioner, clip_text, vae = (nnx.merge(g, st) for g, st in zip(graphdefs, states))
    return ldm_infer.generate_latents(
        unet, conditioner, clip_text, vae, data["input"], data["text_ids"], empty_ids,
        data["h_img"], data["h_txt"], key, s.text_guidance, s.image_guidance,
        num_steps=num_steps,
        kind=s.kind, use_image=t.use_image_embedding, use_text=t.use_text_embedding,
        scaling=cfg.vae.scaling_factor)

  program = Program(run, (states, data, jax.random.key(0)), mesh)
  shapes = {"frames": [batch, size, size, 3], "unet_batch": 3 * batch, "steps": num_steps,
            "sampler": s.kind, "param_dtype": jnp.dtype(param_dtype).name,
            "context": [3 * batch, context_length(cfg), cfg.unet.context_dim]}
  return program, shapes


# --- data -------------------------------------------------------------------------------------


def data_impl(cfg, batch: int, records_dir: Path) -> tuple[Impl, dict]:
  """The LDM training input pipeline (both views when the config trains the VLLM at a different
  size: here the LDM view only, what train-ldm reads) over synthetic records."""
  # Imported here: its absl flags (--workers, --batch_size, ...) belong to its own script.
  from lego_jax.bench import data_pipeline

  size = cfg.data.image_size
  # Ego4D frames are 4:3 at the stored short side, so the squash to size x size is real work.
  source_h, source_w = size, round(size * 4 / 3)
  start = time.perf_counter()
  data_pipeline.write_records(records_dir, max(4 * batch, 64), source_h, source_w)
  written = time.perf_counter() - start
  loader = pipeline.pair_loader(
      records_dir, "train", batch_size=batch, image_size=size, vllm_image_size=None,
      hflip_prob=cfg.data.hflip_prob, seed=0, shuffle=True, num_epochs=None,
      worker_count=int(cfg.data.num_workers))
  it = iter(loader)

  def step():
    return next(it)["input"].shape

  def close():
    nonlocal it
    it = None
    gc.collect()

  impl = Impl("jax", step, info={"pipeline": "grain pair_loader, LDM view"}, close=close)
  facts = {"records_written_s": written, "source_frames": [source_h, source_w],
           "workers": int(cfg.data.num_workers)}
  return impl, facts
