"""`lego-jax train-vllm`: LLaVA visual instruction tuning, LEGO's first stage (Lai et al., ECCV
2024, arXiv 2312.03849; its release github.com/BolinLai/LEGO trains it with LLaVA's code).

One training sequence per instruction record, LLaMA-2 chat template:

    BOS [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<image>\\n{question} [/INST] {answer} EOS

`<image>` becomes `num_patches` placeholder ids whose embeddings the model replaces by the
projected CLIP features H_i. The loss is next-token cross-entropy on the answer and its EOS only:
everything up to and including "[/INST] " is masked (the space before the answer is the dummy
prefix of its first SentencePiece token, as in LLaVA's tokenisation). Sequences are right-padded
to the fixed `max_length` (longer ones are truncated with a warning), so the step compiles once.

The loss of a step is the mean over every answer token of the GLOBAL batch (sum of token losses /
answer tokens), so splitting the batch into `grad_accum` micro-batches (a `lax.scan`) changes the
arithmetic order only, never the result. (The release's HF Trainer averaged per-micro-batch
means instead, which weights short answers more.)

What trains is decided by ONE regex over parameter paths (`vllm_train.frozen`, default
`^vision/`: the CLIP tower; paths look like `lm/layers/mlp/down_proj/kernel`,
`projector/linear_1/kernel`, `vision/encoder/...`). Frozen parameters get no gradient and no
optimizer state. Master weights and Adam moments are fp32; `compute_dtype` sets the activations
(bf16 as the release). Parameters are sharded over the mesh by their logical names through the one
rule table (FSDP: "embed" over the `fsdp` mesh axis), the batch over (data, fsdp).

`zero_image` trains (and, read by `extract`/`describe`, runs) the same model with the image
features replaced by zeros: the text-only control of the "does it look at the image" check.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from lego_jax.config import ConfigError
from lego_jax.data import pipeline, records
from lego_jax.data import tokenizer as tokenizer_lib
from lego_jax.data.prompts import chat_prompt
from lego_jax.models import clip_vision
from lego_jax.models.llava import Llava, LlavaConfig, load_llava
from lego_jax.parallel import distributed, sharding
from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train import common, loop
from lego_jax.weights import io as weights_io

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data", "clip_vision", "llama", "llava", "vllm_train", "mesh", "checkpoint",
                   "seed")


NAME = "vllm"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --- model ------------------------------------------------------------------------------------


def compute_dtype(name: str):
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"compute_dtype={name!r}: one of {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def llava_config(cfg, *, dtype: str | None = None, remat: bool | None = None) -> LlavaConfig:
  """The LLaVA of the experiment config: fp32 parameters, `dtype` compute (default
  vllm_train.compute_dtype), LLaVA's image placeholder id of our tokenizer."""
  t = cfg.vllm_train
  return LlavaConfig.from_config(
      cfg, dtype=compute_dtype(dtype or t.compute_dtype), param_dtype=jnp.float32,
      remat=t.remat if remat is None else remat, image_token_id=tokenizer_lib.IMAGE_TOKEN_ID)


def initialise(cfg, *, dtype: str | None = None, remat: bool | None = None) -> Llava:
  """The model training starts from: `init_checkpoint` (a LLaVA of any layout, its CLIP tower from
  the file or `vision_checkpoint`), else random (seed cfg.seed) with an optional CLIP tower."""
  t = cfg.vllm_train
  config = llava_config(cfg, dtype=dtype, remat=remat)
  if t.init_checkpoint:
    # Abstract first: no random initialisation of 13B parameters that are overwritten anyway.
    model = nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(cfg.seed)))
    vision = weights_io.read_state_dict(t.vision_checkpoint) if t.vision_checkpoint else None
    return load_llava(model, weights_io.read_state_dict(t.init_checkpoint), vision)
  model = Llava(config, rngs=nnx.Rngs(cfg.seed))
  if t.vision_checkpoint:
    clip_vision.load_clip_vision(model.vision, t.vision_checkpoint)
  return model


def param_path(path) -> str:
  """An NNX state path -> "lm/layers/mlp/down_proj/kernel", what `vllm_train.frozen` matches."""
  return "/".join(str(p) for p in path)


def split_trainable(model: Llava, frozen: str):
  """(graphdef, trained, frozen) States: `trained` the parameters whose `param_path` the regex
  `frozen` does not match, `frozen` every other variable."""
  rx = re.compile(frozen) if frozen else None

  def is_frozen(path, value) -> bool:
    return rx is not None and isinstance(value, nnx.Param) and bool(rx.search(param_path(path)))

  graphdef, frozen_params, trained, rest = nnx.split(model, is_frozen, nnx.Param, ...)
  if rx is not None and not jax.tree.leaves(frozen_params):
    tops = sorted({param_path(p).split("/")[0] for p, _ in nnx.to_flat_state(nnx.state(model))})
    raise ConfigError(f"vllm_train.frozen={frozen!r} matches no parameter (paths start with "
                     f"{tops}, e.g. 'vision/encoder/...'); use '' to train everything")
  if not jax.tree.leaves(trained):
    raise ConfigError(f"vllm_train.frozen={frozen!r} freezes every parameter: nothing to train")
  return graphdef, trained, nnx.merge_state(frozen_params, rest)


# --- examples ---------------------------------------------------------------------------------


def expand_image(ids: Sequence[int], num_patches: int,
                 image_token_id: int = tokenizer_lib.IMAGE_TOKEN_ID) -> list[int]:
  """One image placeholder id -> `num_patches` copies (the model fills them with H_i rows)."""
  out: list[int] = []
  for i in ids:
    out.extend([i] * num_patches if i == image_token_id else [i])
  return out


def prompt_ids(tok: tokenizer_lib.Tokenizer, human: str, num_patches: int) -> list[int]:
  """BOS + the chat prompt up to and including "[/INST]", image placeholder expanded."""
  ids = tok.encode_with_image(chat_prompt(human))
  images = sum(i == tokenizer_lib.IMAGE_TOKEN_ID for i in ids)
  if images != 1:
    raise ValueError(f"the prompt must hold exactly one <image>, it holds {images}: {human!r}")
  return expand_image(ids, num_patches)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One training sequence, right-padded to max_length T.

  ids (T,) int32 inputs (placeholders expanded, pad_id after `length`); targets (T,) int32 the
  next token of each position; weights (T,) float32 1 where the target is an answer token or
  the final EOS, else 0; num_prompt: tokens up to and including "[/INST]"."""
  ids: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  length: int
  num_prompt: int
  truncated: bool


def encode_example(tok: tokenizer_lib.Tokenizer, human: str, answer: str, *, num_patches: int,
                   max_length: int) -> Encoded:
  """The prompt tokens followed by the answer's own tokens (its dummy prefix is the space after
  "[/INST]": SentencePiece gives exactly these ids for the joined text) and EOS."""
  prompt = prompt_ids(tok, human, num_patches)
  seq = prompt + tok.encode(answer, bos=False, eos=True)
  last_image = max(i for i, t in enumerate(prompt) if t == tokenizer_lib.IMAGE_TOKEN_ID)
  if last_image >= max_length - 1:
    raise ConfigError(f"vllm_train.max_length={max_length} cuts the image placeholders (they end "
                     f"at token {last_image + 1}): raise it")
  truncated = len(seq) > max_length
  seq = seq[:max_length]
  ids = np.full((max_length,), tok.pad_id, np.int32)
  ids[:len(seq)] = seq
  targets = np.full((max_length,), tok.pad_id, np.int32)
  targets[:len(seq) - 1] = seq[1:]
  # Image placeholders are never predicted (masked); keep the ids inside the vocabulary.
  targets[targets == tokenizer_lib.IMAGE_TOKEN_ID] = tok.pad_id
  weights = np.zeros((max_length,), np.float32)
  # Position t predicts token t + 1: answer tokens sit at len(prompt) ... len(seq) - 1.
  weights[len(prompt) - 1:len(seq) - 1] = 1.0
  return Encoded(ids, targets, weights, len(seq), len(prompt), truncated)


class BatchEncoder:
  """Host side: an instruction batch (prompt, answer, clip_image) -> the step's arrays
  ids, targets, weights (B, T), pixels (B, S, S, 3) and truncated (B,) float32 flags; warns
  the first time an example is truncated."""

  def __init__(self, tok: tokenizer_lib.Tokenizer, num_patches: int, max_length: int):
    self.tok, self.num_patches, self.max_length = tok, num_patches, max_length
    self.truncated = 0

  def __call__(self, batch: dict) -> dict:
    enc = [encode_example(self.tok, str(h), str(a), num_patches=self.num_patches,
                          max_length=self.max_length)
           for h, a in zip(batch["prompt"], batch["answer"])]
    cut = sum(e.truncated for e in enc)
    if cut and not self.truncated:
      logging.warning("train-vllm: %d example(s) of a batch are longer than vllm_train.max_length"
                      "=%d and were truncated (their tail is not trained); the number per step "
                      "is logged as `truncated`", cut, self.max_length)
    self.truncated += cut
    return {"ids": np.stack([e.ids for e in enc]), "targets": np.stack([e.targets for e in enc]),
            "weights": np.stack([e.weights for e in enc]),
            "pixels": np.asarray(batch["clip_image"], np.float32),
            "truncated": np.asarray([e.truncated for e in enc], np.float32)}


# --- loss and step ----------------------------------------------------------------------------


def image_features(model: Llava, pixels: jax.Array, zero_image: bool) -> jax.Array:
  """H_i (B, patches, hidden); zeros for the text-only control."""
  features = model.image_features(pixels)
  return jnp.zeros_like(features) if zero_image else features


def answer_nll(model: Llava, batch: dict, zero_image: bool = False, layer_grads=None):
  """(sum of answer-token negative log-likelihoods, answer tokens, correct argmax predictions)
  of a batch of `BatchEncoder` arrays. Logits in fp32 whatever the compute dtype. `layer_grads`:
  the LLaMA blocks' gradient accumulator (`Llama.hidden_states`)."""
  features = image_features(model, batch["pixels"], zero_image)
  extra = {} if layer_grads is None else {"layer_grads": layer_grads}
  logits, _, _ = model(batch["ids"], image_features=features, **extra)
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  w = batch["weights"]
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  # where, not a product: a masked position's value never reaches the sum, even if not finite.
  return jnp.sum(jnp.where(w > 0, nll * w, 0.0)), jnp.sum(w), jnp.sum(jnp.where(w > 0, correct, 0.0))


_BATCH_AXES = {"ids": ("batch", "length"), "targets": ("batch", "length"),
               "weights": ("batch", "length"), "pixels": ("batch", "height", "width", None)}


def _trains_all_blocks(trained, frozen) -> bool:
  """Whether every parameter of the LLaMA blocks trains (the default `^vision/` freezing): then
  the step accumulates their gradient inside the backward pass (llama.fold_layer_grads)."""
  try:
    blocks = trained["lm"]["layers"]
  except (KeyError, TypeError):
    return False
  try:
    frozen_blocks = jax.tree.leaves(frozen["lm"]["layers"])
  except (KeyError, TypeError):
    frozen_blocks = []
  return bool(jax.tree.leaves(blocks)) and not frozen_blocks


def micro_batches(batch: dict, accum: int) -> dict:
  """(B, ...) -> (accum, B / accum, ...), micro-batch i = rows i, i + accum, ...: with the batch
  split over devices in contiguous blocks, every device keeps its rows (no resharding)."""
  def split(x):
    return jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    accum: int = 1, zero_image: bool = False):
  """The pure step (state, batch, rng) -> (state, metrics); jit it with the state shardings."""

  def loss_fn(trained, frozen, mb, total, layer_grads=None):
    model = nnx.merge(graphdef, trained, frozen)
    nll, _, correct = answer_nll(model, mb, zero_image, layer_grads)
    return nll / total, correct

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  # Differentiated with respect to the LLaMA blocks' accumulator too: their gradient is added
  # into it layer by layer (llama.fold_layer_grads), never held apart.
  fold_fn = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)

  def step(state, batch, rng):
    del rng  # LLaVA has no dropout: the step is deterministic
    batch = dict(batch)
    truncated = jnp.sum(batch.pop("truncated")) if "truncated" in batch else jnp.float32(0)
    total = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    trained, frozen = state["trained"], state["frozen"]
    if accum == 1:
      (loss, correct), grads = grad_fn(trained, frozen, batch, total)
    else:
      # The fold recomputes each block in the backward pass, as remat does: without remat the
      # blocks' activations are kept and jax.grad's own backward does less work.
      fold = (_trains_all_blocks(trained, frozen)
              and nnx.merge(graphdef, trained, frozen).lm.config.remat)

      def body(carry, mb):
        # The parameters ride in the (unchanged) carry: NNX refuses to scan its layers over
        # variables holding tracers of an outer trace level.
        params, (acc, acc_l, acc_c) = carry
        mb = {k: sharding.constrain(v, _BATCH_AXES[k]) for k, v in mb.items()}
        if not fold:
          (l, c), g = grad_fn(*params, mb, total)
          return (params, jax.tree.map(jnp.add, (acc, acc_l, acc_c), (g, l, c))), None
        (l, c), (g, blocks) = fold_fn(*params, mb, total, acc["lm"]["layers"])
        # g's block entries are zeros (the blocks' gradient went into `blocks`): replaced.
        acc = jax.tree.map(jnp.add, acc, g)
        acc["lm"]["layers"] = blocks
        return (params, (acc, acc_l + l, acc_c + c)), None

      zeros = (jax.tree.map(jnp.zeros_like, trained), jnp.float32(0), jnp.float32(0))
      (_, (grads, loss, correct)), _ = jax.lax.scan(
          body, ((trained, frozen), zeros), micro_batches(batch, accum))
    updates, opt_state = tx.update(grads, state["opt_state"], trained)
    new_trained = optax.apply_updates(trained, updates)
    ok = common.all_finite(loss, grads)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = dict(state, trained=pick(new_trained, trained),
                     opt_state=pick(opt_state, state["opt_state"]),
                     step=state["step"] + ok.astype(jnp.int32),
                     nonfinite=state["nonfinite"] + 1 - ok.astype(jnp.int32))
    metrics = {"loss": loss, "token_accuracy": correct / total, "answer_tokens": total,
               "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "truncated": truncated}
    return new_state, metrics

  return step


# --- state ------------------------------------------------------------------------------------


def num_train_steps(cfg, workdir: Path) -> int:
  """vllm_train.num_steps, or (when -1) `epochs` passes over the train split. 0 trains nothing:
  the initial weights are saved as checkpoint 0 (the untrained control of extract/describe)."""
  t = cfg.vllm_train
  if t.num_steps >= 0:
    return int(t.num_steps)
  n = len(records.open_split(pipeline.records_dir_of(cfg.data, workdir), "train", records.INSTRUCT))
  return max(1, math.ceil(t.epochs * n / t.batch_size))


def make_optimizer(cfg, trained, num_steps: int):
  t = cfg.vllm_train
  schedule = common.learning_rate(t.lr, num_steps, t.warmup_ratio, t.schedule,
                                  t.get("warmup_shape", "linear"))
  tx = common.adamw(trained, schedule, weight_decay=t.weight_decay, grad_clip=t.grad_clip or None)
  return tx, schedule


def init_state(cfg, mesh, num_steps: int, *, model: Llava | None = None, abstract: bool = False,
               dtype: str | None = None, remat: bool | None = None):
  """(graphdef, state, state_shardings, tx, schedule): common.make_state's layout, placed on
  `mesh`. `abstract`: ShapeDtypeStructs with shardings instead of arrays (restore and compile
  targets; nothing is initialised or allocated)."""
  t = cfg.vllm_train
  if abstract:
    config = llava_config(cfg, dtype=dtype, remat=remat)
    model = nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(cfg.seed)))
  elif model is None:
    model = initialise(cfg, dtype=dtype)
  graphdef, trained, frozen = split_trainable(model, t.frozen)
  tx, schedule = make_optimizer(cfg, trained, num_steps)
  state, shardings = common.make_state(mesh, tx, trained, frozen, abstract=abstract)
  return graphdef, state, shardings, tx, schedule


def check_config(cfg, mesh) -> None:
  t = cfg.vllm_train
  if cfg.data.vllm_image_size != cfg.clip_vision.image_size:
    raise ConfigError(f"data.vllm_image_size={cfg.data.vllm_image_size} differs from the vision "
                     f"tower's clip_vision.image_size={cfg.clip_vision.image_size}")
  common.check_schedule("vllm_train", t, mesh, epochs_allowed=True)


# --- training ---------------------------------------------------------------------------------


def load_tokenizer(cfg, workdir: Path) -> tokenizer_lib.Tokenizer:
  tok = tokenizer_lib.load_tokenizer(tokenizer_lib.tokenizer_dir(cfg.data, workdir))
  if tok.vocab_size > cfg.llama.vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} ids, more than llama.vocab_size="
                     f"{cfg.llama.vocab_size}")
  return tok


def targets_note(records_dir: Path) -> str:
  """Says (printed, and returned) where the training targets came from when they are not a
  LLaVA file: prepare-data records it in the instruction records' fingerprint."""
  derived = records.build_metadata(records_dir, records.INSTRUCT).get("fingerprint", {}).get(
      "derived", [])
  if "train" not in derived:
    return ""
  note = ("train-vllm: the train targets are the annotation's llava_forecast_finetune, the "
          "released VLLM's outputs (cfg.data.instructions=released_vllm_outputs): this distils "
          "that VLLM rather than reproducing its GPT-curated instruction tuning")
  print(note)
  return note


def train(cfg, workdir: Path, stop_after: int | None = None):
  """Runs (or resumes) train-vllm; returns (graphdef, final state)."""
  t = cfg.vllm_train
  workdir = Path(workdir)
  mesh = sharding.make_mesh(cfg.mesh.shape)
  check_config(cfg, mesh)
  tok = load_tokenizer(cfg, workdir)
  num_steps = num_train_steps(cfg, workdir)
  graphdef, state, shardings, tx, schedule = init_state(cfg, mesh, num_steps)
  if num_steps == 0:
    # The loop saves after steps only; the untrained model still needs a checkpoint to load.
    with checkpointer(workdir) as ckpt:
      if ckpt.latest_step() is None:
        ckpt.save(0, state, None, cfg.to_dict(), force=True)
    return graphdef, state
  step = jax.jit(make_train_step(graphdef, tx, schedule, accum=max(int(t.grad_accum), 1),
                                 zero_image=bool(t.zero_image)),
                 in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  encoder = BatchEncoder(tok, llava_config(cfg).num_patches, int(t.max_length))
  targets_note(pipeline.records_dir_of(cfg.data, workdir))
  # Data shards, not hosts, fix the data order (as in train-vae and train-ldm).
  loader = distributed.ShardedLoader(
      lambda shard, n: pipeline.instruct_loader(
          pipeline.records_dir_of(cfg.data, workdir), "train", batch_size=n,
          vllm_image_size=cfg.data.vllm_image_size, seed=cfg.seed, shuffle=True, num_epochs=None,
          shard_options=shard, worker_count=cfg.data.num_workers),
      global_batch=t.batch_size)

  with sharding.use_mesh(mesh):
    state = loop.run(
        name=NAME, workdir=workdir, config=cfg.to_dict(), state=state, state_shardings=shardings,
        step_fn=step, loader=loader,
        batch_fn=lambda b: pipeline.to_global(encoder(b), mesh),
        num_steps=num_steps, seed=cfg.seed, log_every=t.log_every, ckpt_every=t.ckpt_every,
        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
        skip_nonfinite=t.skip_nonfinite, items_per_step=t.batch_size * t.max_length,
        item_name="tokens", stop_after=stop_after)
  return graphdef, state


def checkpointer(workdir: Path, reader: bool = False) -> ckpt_lib.Checkpointer:
  return ckpt_lib.Checkpointer(Path(workdir) / "checkpoints" / NAME, reader=reader)


def trained_source(cfg, workdir: Path) -> str:
  """Which weights `load_trained` returns, as a string that changes when they do."""
  directory = (Path(workdir) / "checkpoints" / NAME).absolute()
  if directory.exists():
    with checkpointer(workdir, reader=True) as ckpt:
      step = ckpt.latest_step()
    if step is not None:  # relative: a moved workdir keeps its extracted features valid
      return f"WORKDIR/checkpoints/{NAME} step {step}"
  if cfg.vllm_train.init_checkpoint:
    return f"init_checkpoint {cfg.vllm_train.init_checkpoint}"
  raise FileNotFoundError(
      f"no VLLM checkpoint in {directory}: run `lego-jax train-vllm` first, or set "
      "--config.vllm_train.init_checkpoint to a LLaVA checkpoint to use as it is (e.g. the LEGO "
      "release's fine-tuned VLLM)")


def load_trained(cfg, workdir: Path, *, dtype: str | None = None,
                 mesh=None) -> tuple[Llava, tokenizer_lib.Tokenizer]:
  """(the Llava of WORKDIR's latest train-vllm checkpoint, the tokenizer), computing in `dtype`
  (default vllm_train.compute_dtype), placed on `mesh` (default the config's). Without a
  checkpoint, `vllm_train.init_checkpoint` as it is."""
  workdir = Path(workdir)
  tok = load_tokenizer(cfg, workdir)
  source = trained_source(cfg, workdir)
  mesh = mesh or sharding.make_mesh(cfg.mesh.shape)
  if source.startswith("init_checkpoint"):
    graphdef, params = nnx.split(initialise(cfg, dtype=dtype, remat=False))
    return nnx.merge(graphdef, jax.device_put(params, sharding.state_shardings(mesh, params))), tok
  graphdef, abstract, _, _, _ = init_state(cfg, mesh, 1, abstract=True, dtype=dtype, remat=False)
  with checkpointer(workdir, reader=True) as ckpt:  # the weights alone: no optimizer state
    _, state, _ = ckpt.restore({k: abstract[k] for k in ("trained", "frozen")}, partial=True)
  return nnx.merge(graphdef, state["trained"], state["frozen"]), tok


def main(cfg, workdir: Path) -> int:
  _, state = train(cfg, workdir)
  metrics = common.read_metrics(Path(workdir) / "logs" / NAME)
  last = metrics[-1] if metrics else {}
  print(f"train-vllm: {int(jax.device_get(state['step']))} steps, last loss "
        f"{last.get('loss', float('nan')):.4f}, answer-token accuracy "
        f"{last.get('token_accuracy', float('nan')):.3f} -> "
        f"{(Path(workdir) / 'checkpoints' / NAME).absolute()}")
  return 0
