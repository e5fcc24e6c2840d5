"""`lego-jax convert`: a PyTorch checkpoint (file or directory) -> an Orbax checkpoint of ours.

    lego-jax convert --config=configs/lego_ego4d.py --source=v1-5-pruned-emaonly.safetensors \
        --kind=sd15 --out=ckpt/sd15
    lego-jax convert --kind=llava --source=llava-llama-2-13b-chat/ --vision_source=clip-vit-large/

A directory with the config its library wrote (transformers / diffusers `config.json`, e.g. SD's
unet/ or vae/ folder, a LlavaForConditionalGeneration or LLaMA folder) is built with ITS sizes: no
size flags are needed, and a `--config.<section>.<field>` given on the command line must agree
with it (one line names the field otherwise). A CompVis single file (sd15, lego) is sized by the
yaml beside it (same stem, or --source_config=FILE.yaml), else by the config's sections.

kinds (without a config beside the weights, the model sizes come from the config's sections):
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

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from lego_jax.errors import UserError
from lego_jax.models import clip_text, clip_vision, conditioner, llama, llava, unet, vae
from lego_jax.weights import checkpoints, pretrained
from lego_jax.weights.io import read_state_dict

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("vae", "unet", "clip_text", "clip_vision", "llama", "llava", "conditioner",
                   "ldm_train")
CLI_FLAGS = ("out",)


_SOURCE = flags.DEFINE_string("source", None, "convert: PyTorch checkpoint file or directory")
_KIND = flags.DEFINE_enum("kind", None, ["sd15", "lego", "unet", "vae", "clip_text", "clip_vision",
                                         "llama", "llava"], "convert: what the source holds")
_VISION = flags.DEFINE_string("vision_source", None, "convert: separate CLIP files for llava")
_SOURCE_CONFIG = flags.DEFINE_string(
    "source_config", None, "convert: the CompVis yaml of an sd15 / lego single file (default: "
    "the .yaml beside it, if any)")

SECTIONS = {"unet": "unet", "vae": "vae", "clip_text": "clip_text", "conditioner": "conditioner",
            "clip_vision": "clip_vision", "llama": "llama"}


def _abstract(make):
  return nnx.eval_shape(make)


def build_parts(cfg, kind: str) -> dict:
  """Abstract models for the parts a kind holds."""
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
    return {"llava": _abstract(lambda: llava.Llava(llava.LlavaConfig.from_config(cfg),
                                                   rngs=nnx.Rngs(0)))}
  parts = {"sd15": ("unet", "vae", "clip_text"),
           "lego": ("unet", "vae", "clip_text", "conditioner")}
  return {p: _abstract(makers[p]) for p in parts.get(kind, (kind,))}


def _from_pretrained(cfg, kind: str, source: str, vision_source: str | None,
                     overrides: dict) -> dict:
  """{part: module} built from the config.json beside the weights (see lego_jax/weights/
  pretrained.py); `overrides` = {section: {field: value}} stated on the command line."""
  def over(section: str, stated) -> dict:
    # The section's fields the checkpoint does not state (dtype, remat, with_projection, ...),
    # then the command line's flags, which must agree with what it does state.
    unstated = {k: v for k, v in cfg[section].to_dict().items() if k not in stated}
    return {**unstated, **overrides.get(section, {})}

  if kind == "llava":
    derived = ("vision_hidden", "text_hidden", "image_token_id", *llava.HF_CONFIG)
    return {"llava": llava.from_pretrained(
        source, vision_source, vision=over("clip_vision", (*clip_vision.HF_CONFIG, "select_layer")),
        llama=over("llama", llama.HF_CONFIG), **over("llava", derived))}
  module = {"unet": unet, "vae": vae, "clip_text": clip_text, "clip_vision": clip_vision,
            "llama": llama}[kind]
  kw = over(SECTIONS[kind], module.HF_CONFIG)
  if kind == "unet":
    # LEGO's UNet reads 8 channels: an SD unet/ folder (4) is widened to the config's width.
    widen = kw.pop("in_channels", cfg.unet.in_channels)
    return {"unet": module.from_pretrained(source, widen_input_channels=widen, **kw)}
  return {kind: module.from_pretrained(source, **kw)}


def convert(cfg, kind: str, source: str, vision_source: str | None = None,
            overrides: dict | None = None, source_config: str | None = None) -> dict:
  """Fills the parts of `kind` from `source`; returns {part: module}.

  A directory holding its config.json is built with those sizes (`overrides`, {section: {field:
  value}}, must agree with them); a CompVis single file with its yaml (`source_config`, or the
  .yaml beside it); anything else with the sizes of `cfg`'s sections.
  """
  overrides = overrides or {}
  if kind not in ("sd15", "lego") and pretrained.config_file(source) is not None and (
      Path(source).is_dir()):
    return _from_pretrained(cfg, kind, source, vision_source, overrides)
  if kind in ("sd15", "lego"):
    yaml_path = source_config or pretrained.config_file(source, ())
    if yaml_path is not None and str(yaml_path).endswith((".yaml", ".yml")):
      parts = checkpoints.ldm_parts_from_yaml(yaml_path, kind, overrides)
      checkpoints.load_ldm_single_file(
          source, unet=parts["unet"], vae=parts["vae"], clip_text=parts["clip_text"],
          conditioner=parts.get("conditioner"), use_ema=cfg.ldm_train.init_use_ema,
          widen_from_sd=kind == "sd15")
      return parts
  parts = build_parts(cfg, kind)
  if kind in ("sd15", "lego"):
    checkpoints.load_ldm_single_file(
        source, unet=parts["unet"], vae=parts["vae"], clip_text=parts["clip_text"],
        conditioner=parts.get("conditioner"), use_ema=cfg.ldm_train.init_use_ema,
        widen_from_sd=kind == "sd15")
    return parts
  sd = read_state_dict(source)
  if kind == "unet":
    unet.load_unet(parts["unet"], sd, widen_input_channels=True)
  elif kind == "vae":
    vae.load_vae(parts["vae"], sd)
  elif kind == "clip_text":
    clip_text.load_clip_text(parts["clip_text"], sd)
  elif kind == "clip_vision":
    clip_vision.load_clip_vision(parts["clip_vision"], sd)
  elif kind == "llama":
    llama.load_llama(parts["llama"], sd)
  elif kind == "llava":
    llava.load_llava(parts["llava"], sd, vision_source)
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


def _sizes(module) -> dict:
  """The config a part was built with, as JSON (the sizes to build it again for restoring)."""
  config = getattr(module, "config", None) or getattr(module, "cfg")
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def main(cfg, workdir: Path) -> int:
  if not _SOURCE.value or not _KIND.value:
    raise UserError("convert needs --source=FILE_OR_DIR and --kind=" + "|".join(_KIND.enum_values))
  if not Path(_SOURCE.value).exists():
    raise FileNotFoundError(f"--source {_SOURCE.value} does not exist")
  out = Path(flags.FLAGS.out or Path(workdir) / "converted" / _KIND.value)
  overrides = {}
  for key, value in config_flags.get_override_values(flags.FLAGS["config"]).items():
    section, _, field = key.partition(".")
    overrides.setdefault(section, {})[field] = value
  parts = convert(cfg, _KIND.value, _SOURCE.value, _VISION.value, overrides, _SOURCE_CONFIG.value)
  meta = {"kind": _KIND.value, "source": str(Path(_SOURCE.value).absolute()),
          "sections": {p: _sizes(m) for p, m in parts.items()}}
  save_converted(parts, out, meta)
  n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(list(parts.values()), nnx.Param)))
  print(f"convert: {_KIND.value} ({', '.join(parts)}; {n:,} parameters) -> {out}")
  return 0
