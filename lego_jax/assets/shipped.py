"""The embedded default's shipped checkpoints (lego_jax/assets/tiny/; how each was made, with its
commands, steps, wall time and logs' final numbers: README.md there).

`configs/tiny.py` trained longer than the demo's from-scratch budget allows, by the project's own
commands, stored in the project's PyTorch-compatible layouts (what the loaders read anyway):
  vllm.safetensors              the VLLM in the LLaVA layout (models/llava.py `save_llava`), read
                                as `vllm_train.init_checkpoint`
  ldm_lego.safetensors          LEGO's LDM as a CompVis single file (the release's layout:
                                weights/checkpoints.py): EMA UNet, VAE, CLIP text encoder,
                                conditioner, in float16; read as `ldm_train.init=lego`
  ldm_action_label.safetensors  the action-label-only LDM, the same way
  tokenizer.model               the SentencePiece model both read (prepare-data's, deterministic)
  SHA256SUMS                    every file's sha256, checked before use
Each LDM file's metadata holds the latent scale it was trained with (`scale_by_std`), its
ldm_train learning options and the data settings it was trained on, as JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from lego_jax.errors import UserError

DIR = Path(__file__).with_name("tiny")
VLLM = "vllm.safetensors"
TOKENIZER = "tokenizer.model"
LDMS = {"lego": "ldm_lego.safetensors", "action_label": "ldm_action_label.safetensors"}
SUMS = "SHA256SUMS"
# ldm_train keys the sampler must share with training (lego_jax/infer/schedule.py)
TRAINING_OPTIONS = ("prediction_type", "min_snr_gamma", "zero_terminal_snr")
# unet keys that fix the weights' shapes: a file records its own, so shipped LDMs may be shaped
# otherwise than the config's from-scratch UNet (a file without them has the config's)
UNET_SHAPE = ("in_channels", "out_channels", "block_out_channels", "attention_levels",
              "layers_per_block", "num_heads", "transformer_depth", "context_dim", "norm_groups")


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def available(directory: Path = DIR) -> bool:
  return (Path(directory) / SUMS).is_file()


def verify(directory: Path = DIR) -> dict[str, str]:
  """{file: sha256} after checking every file SHA256SUMS lists; a missing or changed file is a
  UserError naming it."""
  directory = Path(directory)
  sums = directory / SUMS
  if not sums.is_file():
    raise UserError(f"no shipped checkpoints: {sums} does not exist")
  out = {}
  for line in sums.read_text().splitlines():
    if not line.strip():
      continue
    want, name = line.split(maxsplit=1)
    path = directory / name.strip()
    if not path.is_file():
      raise UserError(f"shipped checkpoint {path} is missing (listed in {sums})")
    got = sha256(path)
    if got != want:
      raise UserError(f"shipped checkpoint {path} has sha256 {got}, {sums} says {want}: the file "
                      "changed (a Git LFS pointer or a partial checkout?)")
    out[name.strip()] = got
  return out


def metadata(which: str, directory: Path = DIR) -> dict:
  """The JSON metadata of an LDM file (`which`: lego or action_label)."""
  from safetensors import safe_open

  with safe_open(str(Path(directory) / LDMS[which]), "numpy") as f:
    meta = f.metadata() or {}
  return json.loads(meta.get("lego_jax", "{}"))


def config_for(cfg, which: str, directory: Path = DIR):
  """A copy of `cfg` whose VLLM, tokenizer and LDM (`which`) are the shipped files, with the
  LDM's latent scale and learning options (the sampler must match them) from its metadata."""
  cfg = cfg.copy_and_resolve_references()
  directory = Path(directory).absolute()
  meta = metadata(which, directory)
  cfg.data.tokenizer_dir = str(directory)
  cfg.vllm_train.init_checkpoint = str(directory / VLLM)
  t = cfg.ldm_train
  t.init, t.init_checkpoint, t.init_use_ema = "lego", str(directory / LDMS[which]), True
  t.scale_by_std = False  # the file's factor, below
  cfg.vae.scaling_factor = float(meta["latent_scale"])
  for k in TRAINING_OPTIONS:
    if k in meta.get("ldm_train", {}):
      t[k] = meta["ldm_train"][k]
  for k, v in meta.get("unet", {}).items():
    cfg.unet[k] = tuple(v) if isinstance(v, list) else v
  return cfg


def load_ldm(cfg) -> tuple:
  """(unet, conditioner, clip_text, vae) from the LDM file of a `config_for` config: the models
  built abstractly (no random initialisation to overwrite: 10x less CPU than building them)
  and filled by the release-layout loader; the VAE carries the file's latent scale."""
  from flax import nnx

  from lego_jax.models import lego_ldm
  from lego_jax.weights.checkpoints import load_ldm_single_file

  t = cfg.ldm_train
  built = nnx.eval_shape(lambda: lego_ldm.build(cfg, cfg.seed))
  unet, conditioner, clip_text, vae = (built[n] for n in lego_ldm.NAMES)
  load_ldm_single_file(t.init_checkpoint, unet=unet, vae=vae, clip_text=clip_text,
                       conditioner=conditioner, use_ema=t.init_use_ema)
  for m in (unet, conditioner, clip_text, vae):
    abstract = [v for v in jax.tree.leaves(nnx.state(m)) if isinstance(v, jax.ShapeDtypeStruct)]
    if abstract:  # a state variable no file fills (none today): refuse, do not run on shapes
      raise RuntimeError(f"{type(m).__name__}: {len(abstract)} state entries not in {t.init_checkpoint}")
  return unet, conditioner, clip_text, vae


def data_mismatch(cfg, directory: Path = DIR) -> str | None:
  """Why the shipped models were not trained on `cfg`'s data (None: they were, so the demo's
  held-out frames are theirs too)."""
  trained = _training_view(metadata("lego", directory).get("data", {}))
  now = _training_view(data_settings(cfg))
  diff = sorted(k for k in set(trained) | set(now) if trained.get(k) != now.get(k))
  if diff:
    return ("the shipped checkpoints were trained on other data settings ("
            + ", ".join(f"data.{k}: {trained.get(k)!r} there, {now.get(k)!r} here"
                        for k in diff[:3]) + ")")
  return None


# How many test frames are generated changes no training example (each split draws its scenes
# from its own seed stream, so the first N test frames are the same for any larger count): the
# shipped models are scored on any number of them.
EVALUATION_ONLY = ("num_test",)


def _training_view(settings: dict) -> dict:
  out = dict(settings)
  if isinstance(out.get("synthetic"), dict):
    out["synthetic"] = {k: v for k, v in out["synthetic"].items() if k not in EVALUATION_ONLY}
  return out


def data_settings(cfg) -> dict:
  d = cfg.data
  out = {"source": d.source, "image_size": d.image_size, "vllm_image_size": d.vllm_image_size}
  if "synthetic" in d:
    out["synthetic"] = json.loads(json.dumps(d.synthetic.to_dict()))
  return out


# ------------------------------------------------------------------------- writing the files

def export(cfg, workdir: Path, baseline_dir: Path, out: Path = DIR,
           baseline_cfg=None, ldms_only: bool = False) -> dict[str, str]:
  """Writes the shipped files from the trained checkpoints of a demo-like run: WORKDIR's VLLM,
  tokenizer and LEGO LDM, BASELINE_DIR's action-label LDM (default config: the demo's
  `baseline_config`). `ldms_only`: the two LDMs alone, for LDMs fine-tuned next to a VLLM and
  tokenizer already in OUT (which must then be there). Returns {file: sha256} (also written to
  SHA256SUMS)."""
  from lego_jax.infer import ldm as ldm_infer

  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  workdir, baseline_dir = Path(workdir), Path(baseline_dir)
  if ldms_only:
    missing = [n for n in (VLLM, TOKENIZER) if not (out / n).is_file()]
    if missing:
      raise UserError(f"--ldms-only keeps the VLLM and tokenizer in {out}, but {missing[0]} is "
                      "not there: copy the files the LDMs were trained with into it first")
  else:
    from lego_jax.data.tokenizer import tokenizer_dir
    from lego_jax.models.llava import save_llava
    from lego_jax.train import vllm as vllm_stage

    model, _ = vllm_stage.load_trained(cfg, workdir, dtype="float32")
    save_llava(model, out / VLLM)
    shutil.copyfile(tokenizer_dir(cfg.data, workdir) / TOKENIZER, out / TOKENIZER)
  if baseline_cfg is None:
    from lego_jax.baseline import baseline_config

    baseline_cfg = baseline_config(cfg, workdir)
  runs = {"lego": (cfg, workdir), "action_label": (baseline_cfg, baseline_dir)}
  inits = {which: init_record(w) for which, (_, w) in runs.items()}  # before OUT is written
  for which, (c, w) in runs.items():
    step, models = ldm_infer.load_trained_step(c, w, use_ema=True)
    write_ldm(out / LDMS[which], models, c, trained_steps=step, init=inits[which])
  return write_sums(out)


def write_sums(directory: Path) -> dict[str, str]:
  """{file: sha256} of a shipped-layout folder's files, also written to its SHA256SUMS."""
  names = [VLLM, TOKENIZER, *LDMS.values()]
  sums = {n: sha256(directory / n) for n in names}
  (directory / SUMS).write_text("".join(f"{sums[n]}  {n}\n" for n in names))
  return sums


def init_record(run_dir: Path) -> dict | None:
  """The LDM file a train-ldm run in `run_dir` started from (its saved config's
  ldm_train.init "lego"): {file, sha256, trained_steps (None when the file does not say)};
  None for a run from scratch or one without a saved config."""
  from safetensors import safe_open

  saved = Path(run_dir) / "config.train-ldm.json"
  if not saved.is_file():
    return None
  t = json.loads(saved.read_text()).get("ldm_train", {})
  if t.get("init") != "lego":
    return None
  path = Path(t["init_checkpoint"])
  if not path.is_file():
    raise UserError(f"{saved} says the LDM started from {path}, which is missing: the steps "
                    "before this run cannot be counted")
  with safe_open(str(path), "numpy") as f:
    meta = json.loads((f.metadata() or {}).get("lego_jax", "{}"))
  return {"file": path.name, "sha256": sha256(path), "trained_steps": meta.get("trained_steps")}


def write_ldm(path: Path, models: tuple, cfg, trained_steps: int | None = None,
              init: dict | None = None) -> Path:
  """(unet, conditioner, clip_text, vae) -> one CompVis single file at `path` in float16 (half
  the bytes; loading widens them back exactly), with the metadata `config_for` reads: the VAE's
  latent scale, `cfg`'s ldm_train options and data settings. `trained_steps`: the step of the
  checkpoint the weights come from; it is the file's `ldm_train.num_steps` (the config's own
  num_steps says how long a run was asked to be, not how far the exported one got). `init`:
  the file the run started from (`init_record`), kept in the metadata; its trained steps are
  added, so a fine-tuned file says how long its weights were trained in all, and
  `run_steps` how many of those the last run made."""
  from lego_jax.weights import io as weights_io
  from lego_jax.weights.checkpoints import export_ldm_single_file

  unet, conditioner, clip_text, vae = models
  path = Path(path)
  tmp = path.with_name(path.stem + ".fp32.safetensors")
  export_ldm_single_file(tmp, unet=unet, vae=vae, clip_text=clip_text, conditioner=conditioner)
  sd = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v)
        for k, v in weights_io.read_state_dict(tmp).items()}
  tmp.unlink()
  meta = {"latent_scale": float(vae.config.scaling_factor),
          "ldm_train": {k: cfg.ldm_train.get(k) for k in TRAINING_OPTIONS + (
              "num_steps", "batch_size", "lr", "lr_schedule", "text_source", "train_text_source",
              "use_image_embedding",
              "use_text_embedding") if k in cfg.ldm_train},
          "data": data_settings(cfg), "config": cfg.name,
          "unet": {k: json.loads(json.dumps(cfg.unet[k])) for k in UNET_SHAPE if k in cfg.unet}}
  if trained_steps is not None:
    total = int(trained_steps)
    if init is not None:
      meta["init"] = dict(init)
      meta["run_steps"] = total
      total += int(init.get("trained_steps") or 0)
    meta["trained_steps"] = meta["ldm_train"]["num_steps"] = total
  return weights_io.write_safetensors(sd, path, metadata={
      "format": "pt", "source": "lego_jax", "lego_jax": json.dumps(meta, sort_keys=True)})


# ------------------------------------------------------------------------- growing the UNet

# A new transformer block starts as the identity: each of its residual branches ends in one of
# these projections, zeroed; the rest copies block 0, so the grown UNet computes what the old
# one did and training starts from the old one's quality.
_BRANCH_OUT = re.compile(r"\.(attn1\.to_out\.0|attn2\.to_out\.0|ff\.net\.2)\.(weight|bias)$")


def grow_transformer_depth(src: Path, dst: Path, depth: int) -> dict[str, str]:
  """Copies the shipped-layout folder SRC to DST with both LDMs' UNets grown to `depth`
  transformer blocks per spatial transformer (new blocks the identity at start, above), their
  metadata saying so (`unet.transformer_depth`, read back by `config_for`). Returns DST's
  {file: sha256} (also written to its SHA256SUMS)."""
  from safetensors import safe_open
  from safetensors.numpy import load_file

  from lego_jax.weights import io as weights_io

  src, dst = Path(src), Path(dst)
  if dst.exists() and any(dst.iterdir()):
    raise UserError(f"grow writes a new folder: {dst} is not empty")
  # every check before the first write, so a refusal leaves no half-grown folder behind
  for name in (VLLM, TOKENIZER, *LDMS.values()):
    if not (src / name).is_file():
      raise UserError(f"{src / name} is missing: SRC must hold a shipped set's files")
  headers = {}   # name -> (safetensors header, its lego_jax metadata, its transformer depth)
  for name in LDMS.values():
    with safe_open(str(src / name), "numpy") as f:
      header = f.metadata() or {}
    meta = json.loads(header.get("lego_jax", "{}"))
    have = int(meta.get("unet", {}).get("transformer_depth", 1))
    if depth <= have:
      raise UserError(f"{src / name} has transformer_depth {have}: nothing to grow to {depth}")
    headers[name] = (header, meta, have)
  dst.mkdir(parents=True, exist_ok=True)
  for name in (VLLM, TOKENIZER):
    shutil.copyfile(src / name, dst / name)
  for name, (header, meta, have) in headers.items():
    sd = load_file(str(src / name))
    grown = dict(sd)
    for k, v in sd.items():
      if ".transformer_blocks.0." in k:
        for j in range(have, depth):
          grown[k.replace(".transformer_blocks.0.", f".transformer_blocks.{j}.")] = (
              np.zeros_like(v) if _BRANCH_OUT.search(k) else v)
    meta.setdefault("unet", {})["transformer_depth"] = depth
    meta["grown_from"] = {"file": name, "sha256": sha256(src / name), "transformer_depth": have}
    weights_io.write_safetensors(grown, dst / name, metadata={
        **header, "lego_jax": json.dumps(meta, sort_keys=True)})
  return write_sums(dst)


def main(argv: list[str]) -> int:
  """python -m lego_jax.assets.shipped CONFIG WORKDIR OUT [--ldms-only] [section.key=value ...]:
  export a demo-like run's trained VLLM and both LDMs (WORKDIR/baseline_action_label) as the
  shipped files in OUT, the config with the overrides the run was trained with. --ldms-only:
  the two LDMs alone (fine-tuned next to the VLLM and tokenizer already in OUT).

  python -m lego_jax.assets.shipped grow SRC DST DEPTH: copy the shipped-layout folder SRC to
  DST with both LDMs' UNets grown to DEPTH transformer blocks per spatial transformer, the new
  blocks the identity at start (fine-tune them with --config.unet.transformer_depth=DEPTH)."""
  from lego_jax import config as config_lib

  if {"-h", "--help"} & set(argv):
    print(main.__doc__)
    return 0
  if argv[:1] == ["grow"]:
    if len(argv) != 4 or not argv[3].isdigit() or int(argv[3]) < 2:
      print(f"error: grow takes SRC DST DEPTH (an integer >= 2), got {' '.join(argv[1:])!r}",
            file=sys.stderr)
      return 2
    try:
      sums = grow_transformer_depth(Path(argv[1]), Path(argv[2]), int(argv[3]))
    except (UserError, OSError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    for n, s in sums.items():
      print(f"{s}  {n}")
    return 0
  ldms_only = "--ldms-only" in argv
  argv = [a for a in argv if a != "--ldms-only"]
  if len(argv) < 3:
    print(main.__doc__, file=sys.stderr)
    return 2
  cfg = config_lib.load(argv[0], argv[3:])
  workdir = Path(argv[1])
  from lego_jax.baseline import BASELINE_DIR

  try:
    sums = export(cfg, workdir, workdir / BASELINE_DIR, Path(argv[2]), ldms_only=ldms_only)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for n, s in sums.items():
    print(f"{s}  {n}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
