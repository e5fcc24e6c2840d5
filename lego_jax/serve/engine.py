"""The models behind `lego-jax serve`, loaded and compiled once; one request at a time.

An upload is checked on the request's thread (`read_upload`, `check_action`, `Settings`), before
it joins the queue, so a bad one is answered at once; the models then run on the queue's single
worker (one device: requests are serialised, never interleaved). The work per request is the
single-frame path of `lego-jax generate --image --action` (lego_jax/infer/single.py): the VLLM's
description with H_i / H_t, then each LDM's frame.

Compilation: guidance scales are passed as traced float32 arrays, so new values reuse the compiled
sampler (the guided 3-way UNet batch always runs, even at scales (1, 1)); the seed is a traced key.
The step count is static: every new value compiles once (the configured one at start-up).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lego_jax.data import images, pipeline, records
from lego_jax.data.prompts import human_turn
from lego_jax.baseline import BASELINE_DIR, baseline_config
from lego_jax.errors import UserError
from lego_jax.infer import describe as describe_lib
from lego_jax.infer import extract
from lego_jax.infer import ldm as ldm_infer
from lego_jax.infer import single
from lego_jax.models import lego_ldm
from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train import vllm

MAX_UPLOAD_BYTES = 40 * 2**20
MAX_ACTION_CHARS = 300
OUTPUT_MAX_SIDE = 1024   # results come back at the input's aspect ratio, at most this long a side
STEP_CHOICES = (10, 20, 50, 100)
MAX_SCALE = 30.0
NUM_EXAMPLES = 16


def read_upload(data: bytes, name: str, model_size: int) -> tuple[np.ndarray, str]:
  """Uploaded file bytes -> ((H, W, 3) uint8 RGB, a note on what was converted for the model of
  `model_size` pixels a side); UserError when the file is empty, too large, not an image, or of a
  size the models cannot take."""
  if not data:
    raise UserError(f"{name}: the file is empty: choose a JPEG or PNG frame")
  if len(data) > MAX_UPLOAD_BYTES:
    raise UserError(f"{name}: {len(data) / 2**20:.0f} MiB is over the {MAX_UPLOAD_BYTES >> 20} MiB "
                    "upload limit")
  try:
    with Image.open(io.BytesIO(data)) as probe:  # header only: the size before decoding
      mode, (w, h) = probe.mode, probe.size
  except Image.DecompressionBombError as e:
    raise UserError(f"{name}: {e}") from None
  except Exception:  # PIL raises a zoo of types for files that are not images
    raise UserError(f"{name}: not an image PIL can read (upload a JPEG, PNG, BMP or WebP "
                    "frame)") from None
  if min(w, h) < single.MIN_SIDE or max(w, h) > single.MAX_SIDE:
    raise UserError(f"{name}: {w}x{h} pixels is outside the supported {single.MIN_SIDE}.."
                    f"{single.MAX_SIDE} pixels per side")
  try:
    frame = images.decode_rgb(data)
  except images.ImageError as e:
    raise UserError(f"{name}: {e}") from None
  notes = []
  if mode != "RGB":
    notes.append(f"converted from mode {mode} to 8-bit RGB")
  if (w, h) != (model_size, model_size):
    notes.append(f"{w}x{h} squashed to the model's {model_size}x{model_size}")
  return single.check_size(frame, name), "; ".join(notes)


def check_action(text: str | None) -> str:
  action = (text or "").strip()
  if not action:
    raise UserError("the action is empty: type what the hands do, e.g. \"cut the carrot\"")
  if len(action) > MAX_ACTION_CHARS:
    raise UserError(f"the action is {len(action):,} characters long; at most "
                    f"{MAX_ACTION_CHARS} (a short instruction, e.g. \"cut the carrot\")")
  return action


class CompileCounter:
  """Counts XLA compilations in this process (JAX's monitoring event for each backend compile):
  the page reports it, and the browser test checks new guidance scales add none."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._event)

  def _event(self, event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@dataclasses.dataclass(frozen=True)
class Settings:
  """The page's sampler controls, checked."""
  text_scale: float
  image_scale: float
  num_steps: int
  seed: int

  @classmethod
  def parse(cls, text_scale, image_scale, num_steps, seed, choices) -> "Settings":
    def number(value, what, lo, hi, kind=float):
      try:
        x = kind(value)
      except (TypeError, ValueError):
        raise UserError(f"{what}={value!r} is not a number") from None
      if not (math.isfinite(x) and lo <= x <= hi):
        raise UserError(f"{what}={value} must be between {lo} and {hi}")
      return x

    steps = number(num_steps, "steps", 1, 10_000, int)
    if steps not in choices:
      raise UserError(f"steps={steps}: one of {', '.join(map(str, choices))}")
    return cls(number(text_scale, "text guidance", 0.0, MAX_SCALE),
               number(image_scale, "image guidance", 0.0, MAX_SCALE), steps,
               number(seed, "seed", 0, 2**31 - 1, int))


@dataclasses.dataclass
class Model:
  """One LDM run: its config, (unet, conditioner, clip_text, vae) and text ids."""
  label: str
  cfg: object
  models: tuple
  text_ids: object


def model_paths(workdir: Path) -> dict[str, Path]:
  return {"VLLM": workdir / "checkpoints" / "vllm", "VAE": workdir / "checkpoints" / "vae",
          "LEGO LDM": workdir / "checkpoints" / "ldm",
          "baseline LDM": workdir / BASELINE_DIR / "checkpoints" / "ldm"}


def _finished(directory: Path) -> bool:
  if not directory.is_dir():
    return False
  with ckpt_lib.Checkpointer(directory, reader=True) as ckpt:
    return ckpt.latest_step() is not None


def missing(cfg, workdir: Path) -> str | None:
  """One line naming what serve needs and WORKDIR lacks, and the command that makes it; None
  when the VLLM, VAE and LEGO LDM are all there (the baseline is optional)."""
  make_all = f"`bash launch/demo.sh` (WORKDIR={workdir}) or `lego-jax demo --workdir={workdir}`"
  if not workdir.is_dir():
    return f"workdir {workdir} does not exist: make it with {make_all}"
  paths = model_paths(workdir)
  needed = [("VLLM", "train-vllm", not cfg.vllm_train.init_checkpoint),
            ("VAE", "train-vae", not cfg.vae_train.init_checkpoint),
            ("LEGO LDM", "train-ldm", True)]
  for label, command, needs_checkpoint in needed:
    if needs_checkpoint and not _finished(paths[label]):
      return (f"no {label} checkpoint in {paths[label]}: make it with `lego-jax {command} "
              f"--workdir={workdir}` (with the same --config), or every model with {make_all}")
  return None


class Engine:
  """VLLM + LEGO LDM (+ the action-label-only baseline when WORKDIR has one), loaded once."""

  def __init__(self, cfg, workdir: Path, log: Callable[[str], None] = print):
    self.cfg, self.workdir = cfg, Path(workdir)
    self.image_size = int(cfg.data.image_size)
    self.compilations = CompileCounter()
    self.mesh = extract.local_mesh(cfg)
    t0 = time.perf_counter()
    self.vllm, self.tok = vllm.load_trained(cfg, workdir, dtype=cfg.vllm_generate.compute_dtype,
                                            mesh=self.mesh)
    self.ldms = [Model("LEGO", cfg,
                       ldm_infer.load_trained(cfg, workdir, use_ema=cfg.sampler.use_ema),
                       lego_ldm.TextIds(cfg, workdir))]
    baseline_dir = self.workdir / BASELINE_DIR
    if _finished(model_paths(self.workdir)["baseline LDM"]):
      base_cfg = baseline_config(cfg, self.workdir)
      self.ldms.append(Model("action label only", base_cfg,
                             ldm_infer.load_trained(base_cfg, baseline_dir,
                                                    use_ema=cfg.sampler.use_ema),
                             lego_ldm.TextIds(base_cfg, baseline_dir)))
    log(f"serve: loaded {', '.join(['VLLM'] + [m.label for m in self.ldms])} in "
        f"{time.perf_counter() - t0:.0f} s")
    self.default_steps = int(cfg.sampler.num_steps)
    self.step_choices = tuple(sorted({self.default_steps, *STEP_CHOICES}))
    self.compiled: set[tuple[str, int]] = set()  # (LDM label, steps) run at least once
    self.seconds: dict[tuple[str, int], float] = {}  # (stage, steps) -> the last run's time
    self.examples = self._examples()

  def _examples(self) -> list[dict]:
    """Up to NUM_EXAMPLES held-out frames of the test split: id, action, JPEG bytes."""
    records_dir = pipeline.records_dir_of(self.cfg.data, self.workdir)
    try:
      if "test" not in records.split_names(records_dir, records.PAIRS):
        return []
      src = records.open_split(records_dir, "test", records.PAIRS)
    except Exception:  # no records beside a workdir of converted weights: no examples, still served
      return []
    out = []
    for i in range(min(NUM_EXAMPLES, len(src))):
      r = records.to_python(src[i])
      out.append({"id": r["id"], "action": r["action"], "jpeg": r["input_jpeg"]})
    return out

  def check_prompt(self, action: str) -> None:
    """UserError when the action's prompt and the description would not fit the VLLM."""
    n = len(vllm.prompt_ids(self.tok, human_turn(action), self.vllm.config.num_patches))
    limit = int(self.cfg.llama.max_position) - int(self.cfg.vllm_generate.max_new_tokens)
    if n > limit:
      raise UserError(f"the action makes a prompt of {n} tokens; this VLLM takes at most {limit}: "
                      "shorten it")

  def describe(self, frame: np.ndarray, action: str):
    return describe_lib.describe(self.cfg, self.vllm, self.tok, frame, action, self.mesh)

  def generate(self, model: Model, frame: np.ndarray, described, action: str,
               settings: Settings) -> np.ndarray:
    """-> (S, S, 3) uint8. Scales as arrays: traced, so new values do not recompile."""
    out = single.generate_frame(
        model.cfg, model.models, model.text_ids, frame, described, action,
        jax.random.key(settings.seed), text_scale=jnp.float32(settings.text_scale),
        image_scale=jnp.float32(settings.image_scale), num_steps=settings.num_steps)
    self.compiled.add((model.label, settings.num_steps))
    return out

  @property
  def compiled_steps(self) -> list[int]:
    """Step counts every LDM has compiled."""
    return sorted({s for _, s in self.compiled
                   if all((m.label, s) in self.compiled for m in self.ldms)})

  def warm_up(self, log: Callable[[str], None] = print) -> None:
    """Compiles the description and every LDM's sampler at the configured steps."""
    frame = (images.decode_rgb(self.examples[0]["jpeg"]) if self.examples
             else np.full((self.cfg.data.image_size,) * 2 + (3,), 128, np.uint8))
    action = self.examples[0]["action"] if self.examples else "pick up the cup"
    settings = Settings(float(self.cfg.sampler.text_guidance),
                        float(self.cfg.sampler.image_guidance), self.default_steps, 0)
    for key in (("describe", -1), ("describe", 0)):  # compile + run, then run
      t0 = time.perf_counter()
      described = self.describe(frame, action)
      self.seconds[key] = time.perf_counter() - t0
    for model in self.ldms:
      t0 = time.perf_counter()
      self.generate(model, frame, described, action, settings)
      self.seconds[(model.label, -1)] = time.perf_counter() - t0  # compile + run
      t0 = time.perf_counter()
      self.generate(model, frame, described, action, settings)
      self.seconds[(model.label, self.default_steps)] = time.perf_counter() - t0
    log(f"serve: compiled the description and {len(self.ldms)} sampler(s) at "
        f"{self.default_steps} steps; a request takes about "
        f"{self.expected('describe', 0) + sum(self.expected(m.label, self.default_steps) for m in self.ldms):.1f} s")

  def expected(self, stage: str, steps: int) -> float:
    """Seconds a stage ("describe" or an LDM's label) is expected to take: its last run at this
    step count, else the configured count's scaled, plus the compile time when this LDM has not
    run this step count yet."""
    if (stage, steps) in self.seconds:
      return self.seconds[(stage, steps)]
    base = self.seconds.get((stage, self.default_steps), 1.0)
    run = base * steps / max(self.default_steps, 1)
    if stage != "describe" and (stage, steps) not in self.compiled:
      run += max(self.seconds.get((stage, -1), 0.0) - base, 0.0)
    return run

  def record(self, stage: str, steps: int, seconds: float, compiled: bool) -> None:
    """A stage's time: compile + run (key steps -1) when it compiled, else its run time."""
    self.seconds[(stage, -1) if compiled else (stage, steps)] = seconds


def to_png(frame: np.ndarray, size: tuple[int, int]) -> bytes:
  """uint8 frame -> PNG bytes at `size` (width, height), bicubic."""
  img = Image.fromarray(frame)
  if img.size != size:
    img = img.resize(size, Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def output_size(frame: np.ndarray) -> tuple[int, int]:
  """(width, height) of a result: the input's, scaled down to at most OUTPUT_MAX_SIDE a side."""
  h, w = frame.shape[:2]
  scale = min(1.0, OUTPUT_MAX_SIDE / max(h, w))
  return max(1, round(w * scale)), max(1, round(h * scale))
