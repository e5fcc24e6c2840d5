"""`lego-jax convert`: a PyTorch checkpoint (file or directory) -> an Orbax checkpoint of ours.

    lego-jax convert --config=configs/lego_ego4d.py --source=v1-5-pruned-emaonly.safetensors \
        --kind=sd15 --out=ckpt/sd15
    lego-jax convert --kind=llava --source=llava-llama-2-13b-chat/ --vision_source=clip-vit-large/

kinds (the model sizes come from the config's sections):
  sd15   CompVis SD-1.5 single file -> unet (widened 4 -> 8 input channels), vae, clip_text
  lego   the LEGO release's LDM single file -> unet (EMA unless --config.ldm_train.init_use_ema=false),
         vae, clip_text, conditioner
  unet, vae            diffusers or CompVis layouts, auto-detected
  clip_text, clip_vision   transformers (4.x / 5) or CompVis / LLaVA layouts
  llama                transformers LlamaForCausalLM
  llava                original LLaVA repository or transformers Llava (+ --vision_source)
The output directory holds one Orbax checkpoint: {part: params} plus a JSON of the config
sections used, restorable with `restore_converted`. Models are built abstractly (no random init)
and filled from the file, so a 13B conversion holds one copy of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("vae", "unet", "clip_text", "clip_vision", "llama", "llava", "conditioner",
                   "ldm_train")
CLI_FLAGS = ("out",)


_SOURCE = flags.DEFINE_string("source", None, "convert: PyTorch checkpoint file or directory")
_KIND = flags.DEFINE_enum("kind", None, ["sd15", "lego", "unet", "vae", "clip_text", "clip_vision",
                                         "llama", "llava"], "convert: what the source holds")
_VISION = flags.DEFINE_string("vision_source", None, "convert: separate CLIP files for llava")

SECTIONS = {"unet": "unet", "vae": "vae", "clip_text": "clip_text", "conditioner": "conditioner",
            "clip_vision": "clip_vision", "llama": "llama"}


def _abstract(make):
  return nnx.eval_shape(make)


def build_parts(cfg, kind: str) -> dict:
  """Abstract models for the parts a kind holds."""
  from lego_jax.models import clip_text, clip_vision, conditioner, llama, unet, vae

  makers = {
      "unet": lambda: unet.UNet(unet.UNetConfig(**cfg.unet), rngs=nnx.Rngs(0)),
      "vae": lambda: vae.VAE(vae.VAEConfig(**cfg.vae), rngs=nnx.Rngs(0)),
      "clip_text": lambda: clip_text.CLIPText(clip_text.CLIPTextConfig(**cfg.clip_text), rngs=nnx.Rngs(0)),
      "conditioner": lambda: conditioner.Conditioner(conditioner.ConditionerConfig(**cfg.conditioner),
                                                     rngs=nnx.Rngs(0)),
      "clip_vision": lambda: clip_vision.CLIPVision(clip_vision.CLIPVisionConfig(**cfg.clip_vision),
                                                    rngs=nnx.Rngs(0)),
      "llama": lambda: llama.Llama(llama.LlamaConfig(**cfg.llama), rngs=nnx.Rngs(0)),
  }
  if kind == "llava":
    from lego_jax.models.llava import Llava, LlavaConfig

    return {"llava": _abstract(lambda: Llava(LlavaConfig.from_config(cfg), rngs=nnx.Rngs(0)))}
  parts = {"sd15": ("unet", "vae", "clip_text"), "lego": ("unet", "vae", "clip_text", "conditioner")}
  return {p: _abstract(makers[p]) for p in parts.get(kind, (kind,))}


def convert(cfg, kind: str, source: str, vision_source: str | None = None) -> dict:
  """Fills the parts of `kind` from `source`; returns {part: module}."""
  from lego_jax.weights import checkpoints
  from lego_jax.weights.io import read_state_dict

  parts = build_parts(cfg, kind)
  if kind in ("sd15", "lego"):
    checkpoints.load_ldm_single_file(
        source, unet=parts["unet"], vae=parts["vae"], clip_text=parts["clip_text"],
        conditioner=parts.get("conditioner"), use_ema=cfg.ldm_train.init_use_ema,
        widen_from_sd=kind == "sd15")
    return parts
  sd = read_state_dict(source)
  if kind == "unet":
    from lego_jax.models.unet import load_unet

    load_unet(parts["unet"], sd, widen_input_channels=True)
  elif kind == "vae":
    from lego_jax.models.vae import load_vae

    load_vae(parts["vae"], sd)
  elif kind == "clip_text":
    from lego_jax.models.clip_text import load_clip_text

    load_clip_text(parts["clip_text"], sd)
  elif kind == "clip_vision":
    from lego_jax.models.clip_vision import load_clip_vision

    load_clip_vision(parts["clip_vision"], sd)
  elif kind == "llama":
    from lego_jax.models.llama import load_llama

    load_llama(parts["llama"], sd)
  elif kind == "llava":
    from lego_jax.models.llava import load_llava

    vision = read_state_dict(vision_source) if vision_source else None
    load_llava(parts["llava"], sd, vision_state_dict=vision)
  return parts


def save_converted(parts: dict, out: Path, meta: dict) -> Path:
  out = Path(out).absolute()
  params = {name: nnx.state(module, nnx.Param) for name, module in parts.items()}
  params = jax.tree.map(lambda x: x, nnx.to_pure_dict(nnx.State(params)))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / "params", params, force=True)
  (out / "converted.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
  return out


def restore_converted(out: Path, parts: dict) -> dict:
  """Fills abstract `parts` ({name: module}) from a `convert` output directory."""
  out = Path(out).absolute()
  target = {name: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for name, m in parts.items()}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(out / "params", target)
  for name, module in parts.items():
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, restored[name])
    nnx.update(module, state)
  return parts


def main(cfg, workdir: Path) -> int:
  from lego_jax.cli import UserError

  if not _SOURCE.value or not _KIND.value:
    raise UserError("convert needs --source=FILE_OR_DIR and --kind=" + "|".join(_KIND.enum_values))
  if not Path(_SOURCE.value).exists():
    raise FileNotFoundError(f"--source {_SOURCE.value} does not exist")
  out = Path(flags.FLAGS.out or Path(workdir) / "converted" / _KIND.value)
  parts = convert(cfg, _KIND.value, _SOURCE.value, _VISION.value)
  meta = {"kind": _KIND.value, "source": str(Path(_SOURCE.value).absolute()),
          "sections": {p: cfg[SECTIONS[p]].to_dict() for p in parts if p in SECTIONS}}
  save_converted(parts, out, meta)
  n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(list(parts.values()), nnx.Param)))
  print(f"convert: {_KIND.value} ({', '.join(parts)}; {n:,} parameters) -> {out}")
  return 0
