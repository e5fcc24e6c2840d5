"""LPIPS (Zhang et al. 2018, v0.1) with its AlexNet, VGG16 and SqueezeNet 1.1 backbones.

d(x0, x1) = sum_l mean_hw( w_l . (n(f_l(x0)) - n(f_l(x1)))^2 ), with f_l the backbone's ReLU
outputs at the LPIPS taps, n() unit-normalisation over channels (eps 1e-10) and w_l the learned
non-negative 1x1 heads. Inputs are expected in [-1, 1]; the LEGO release fed [0, 1] images
(`release_range=True` in `lpips_distance` reproduces that).

Weights: the backbones come in torchvision's ImageNet layout (`features.N.weight`, SqueezeNet
`features.N.squeeze/expand1x1/expand3x3`) or inside a saved lpips/torchmetrics module
(`net.sliceK.N.weight`, same N); the heads as the lpips package ships them (`linK.model.1.weight`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.eval.weight_files import find_weights
from lego_jax.weights import io as weights_io
from lego_jax.weights import state as weights_state
from lego_jax.weights.mapping import Kind, Rule, torch_to_jax

NETS = ("alex", "vgg", "squeeze")

# The lpips ScalingLayer: ImageNet statistics expressed for [-1, 1] inputs.
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)

# Backbone layer lists: ("conv", torch index, out channels, kernel, stride, padding),
# ("fire", torch index, squeeze, expand), ("pool", kernel, stride, ceil_mode), ("tap",).
# The torch index names the parameters (features.<index>.*), so the lists ARE the key layout.
_ALEX = [("conv", 0, 64, 11, 4, 2), ("tap",), ("pool", 3, 2, False),
         ("conv", 3, 192, 5, 1, 2), ("tap",), ("pool", 3, 2, False),
         ("conv", 6, 384, 3, 1, 1), ("tap",),
         ("conv", 8, 256, 3, 1, 1), ("tap",),
         ("conv", 10, 256, 3, 1, 1), ("tap",)]


def _vgg16():
  layers, idx = [], 0
  for block, (width, n) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
    if block:
      layers.append(("pool", 2, 2, False))
      idx += 1
    for _ in range(n):
      layers.append(("conv", idx, width, 3, 1, 1))
      idx += 2  # conv + ReLU
    layers.append(("tap",))
  return layers


_SQUEEZE = [("conv", 0, 64, 3, 2, 0), ("tap",),
            ("pool", 3, 2, True), ("fire", 3, 16, 64), ("fire", 4, 16, 64), ("tap",),
            ("pool", 3, 2, True), ("fire", 6, 32, 128), ("fire", 7, 32, 128), ("tap",),
            ("pool", 3, 2, True), ("fire", 9, 48, 192), ("tap",),
            ("fire", 10, 48, 192), ("tap",),
            ("fire", 11, 64, 256), ("tap",),
            ("fire", 12, 64, 256), ("tap",)]

ARCHS = {"alex": _ALEX, "vgg": _vgg16(), "squeeze": _SQUEEZE}


def tap_channels(net: str) -> list[int]:
  chans, c = [], 3
  for layer in ARCHS[net]:
    if layer[0] == "conv":
      c = layer[2]
    elif layer[0] == "fire":
      c = 2 * layer[3]
    elif layer[0] == "tap":
      chans.append(c)
  return chans


def max_pool(x: jnp.ndarray, k: int, s: int, ceil_mode: bool = False) -> jnp.ndarray:
  """torch MaxPool2d(k, s) on NHWC; ceil_mode keeps a last partial window that starts inside."""
  pads = []
  for n in x.shape[1:3]:
    out = -(-(n - k) // s) + 1 if ceil_mode else (n - k) // s + 1
    if ceil_mode and (out - 1) * s >= n:
      out -= 1
    pads.append((0, max(0, (out - 1) * s + k - n)))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                               ((0, 0), pads[0], pads[1], (0, 0)))


def _conv(cin, cout, k, s, p, rngs):
  return nnx.Conv(cin, cout, (k, k), strides=(s, s), padding=((p, p), (p, p)), rngs=rngs)


class Fire(nnx.Module):
  """SqueezeNet Fire: 1x1 squeeze, then concat(1x1 expand, 3x3 expand), ReLU after each."""

  def __init__(self, cin: int, squeeze: int, expand: int, *, rngs: nnx.Rngs):
    self.squeeze = _conv(cin, squeeze, 1, 1, 0, rngs)
    self.expand1x1 = _conv(squeeze, expand, 1, 1, 0, rngs)
    self.expand3x3 = _conv(squeeze, expand, 3, 1, 1, rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.squeeze(x))
    return jnp.concatenate([jax.nn.relu(self.expand1x1(x)), jax.nn.relu(self.expand3x3(x))], -1)


class Backbone(nnx.Module):
  """The feature part of AlexNet / VGG16 / SqueezeNet 1.1; returns the LPIPS taps."""

  def __init__(self, net: str, *, rngs: nnx.Rngs):
    self.net = net
    c = 3
    for layer in ARCHS[net]:
      if layer[0] == "conv":
        _, idx, cout, k, s, p = layer
        setattr(self, f"conv{idx}", _conv(c, cout, k, s, p, rngs))
        c = cout
      elif layer[0] == "fire":
        _, idx, sq, ex = layer
        setattr(self, f"fire{idx}", Fire(c, sq, ex, rngs=rngs))
        c = 2 * ex

  def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    """x: (B, H, W, 3) scaled input -> list of (B, h_l, w_l, C_l) ReLU features."""
    taps = []
    for layer in ARCHS[self.net]:
      if layer[0] == "conv":
        x = jax.nn.relu(getattr(self, f"conv{layer[1]}")(x))
      elif layer[0] == "fire":
        x = getattr(self, f"fire{layer[1]}")(x)
      elif layer[0] == "pool":
        x = max_pool(x, *layer[1:])
      else:
        taps.append(x)
    return taps


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
  net: str = "alex"                # alex | vgg | squeeze
  dtype: str = "float32"
  param_dtype: str = "float32"


class LPIPS(nnx.Module):
  """Backbone + one non-negative 1x1 head per tap (`lin{k}`, no bias)."""

  def __init__(self, config: LPIPSConfig, *, rngs: nnx.Rngs):
    if config.net not in NETS:
      raise ValueError(f"LPIPS net must be one of {NETS}, got {config.net!r}")
    self.config = config
    self.net = Backbone(config.net, rngs=rngs)
    for k, c in enumerate(tap_channels(config.net)):
      setattr(self, f"lin{k}", nnx.Linear(c, 1, use_bias=False, rngs=rngs))

  def features(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    """x: (B, H, W, 3) in [-1, 1] -> the backbone taps (after the lpips ScalingLayer)."""
    x = (x.astype(jnp.float32) - _SHIFT) / _SCALE
    return self.net(x.astype(self.config.dtype))

  def __call__(self, x0: jnp.ndarray, x1: jnp.ndarray) -> jnp.ndarray:
    """x0, x1: (B, H, W, 3) in [-1, 1] -> (B,) LPIPS distance."""
    total = 0.0
    for k, (f0, f1) in enumerate(zip(self.features(x0), self.features(x1))):
      f0, f1 = f0.astype(jnp.float32), f1.astype(jnp.float32)
      n0 = f0 / (jnp.sqrt(jnp.sum(f0 * f0, -1, keepdims=True)) + 1e-10)
      n1 = f1 / (jnp.sqrt(jnp.sum(f1 * f1, -1, keepdims=True)) + 1e-10)
      d = getattr(self, f"lin{k}")(jnp.square(n0 - n1))  # (B, h, w, 1)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


@nnx.jit(static_argnames=("release_range",))
def lpips_distance(model: LPIPS, generated: jnp.ndarray, reference: jnp.ndarray,
                   release_range: bool = False) -> jnp.ndarray:
  """LPIPS between [0, 1] images (B, H, W, 3) -> (B,).

  release_range=False maps [0, 1] to the [-1, 1] the network expects; True feeds [0, 1] as the
  LEGO release did (torchmetrics' LPIPS without normalisation).
  """
  if not release_range:
    generated, reference = 2.0 * generated - 1.0, 2.0 * reference - 1.0
  return model(reference, generated)


# ---- PyTorch key layouts ----

def lpips_rules(net: str) -> list[Rule]:
  rules = [
      Rule("features.{i}.weight", "net.conv{i}.kernel", Kind.CONV2D),
      Rule("features.{i}.bias", "net.conv{i}.bias"),
      # A saved lpips.LPIPS module keeps torchvision's indices inside its slices.
      Rule("net.slice{s}.{i}.weight", "net.conv{i}.kernel", Kind.CONV2D),
      Rule("net.slice{s}.{i}.bias", "net.conv{i}.bias"),
      Rule("lin{k}.model.1.weight", "lin{k}.kernel", Kind.CONV1X1_LINEAR),
  ]
  if net == "squeeze":
    for part in ("squeeze", "expand1x1", "expand3x3"):
      rules += [Rule(f"features.{{i}}.{part}.weight", f"net.fire{{i}}.{part}.kernel", Kind.CONV2D),
                Rule(f"features.{{i}}.{part}.bias", f"net.fire{{i}}.{part}.bias"),
                Rule(f"net.slice{{s}}.{{i}}.{part}.weight", f"net.fire{{i}}.{part}.kernel",
                     Kind.CONV2D),
                Rule(f"net.slice{{s}}.{{i}}.{part}.bias", f"net.fire{{i}}.{part}.bias")]
  return rules


# Classifier layers of the torchvision files and the ScalingLayer buffers of saved lpips modules.
LPIPS_IGNORE = (r"^classifier\.", r"^scaling_layer\.", r"^lin\d+\.model\.0\.")


def _strip_wrappers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops DataParallel's `module.` and torchmetrics' outer `net.` (around `net.`/`lin`)."""
  out = {}
  for k, v in sd.items():
    if k.startswith("module."):
      k = k[len("module."):]
    if k.startswith("net.") and (k.startswith("net.net.") or k.startswith("net.lin")
                                 or k.startswith("net.scaling_layer.")):
      k = k[len("net."):]
    out[k] = v
  return out


def load_lpips(model: LPIPS, backbone: Mapping[str, np.ndarray],
               heads: Mapping[str, np.ndarray] | None = None, source: str = "LPIPS weights") -> LPIPS:
  """Loads a backbone state dict and the heads (or one saved lpips module holding both)."""
  sd = _strip_wrappers(backbone)
  if heads is not None:
    sd.update(_strip_wrappers(heads))
  arrays = torch_to_jax(sd, lpips_rules(model.config.net), weights_state.param_shapes(model),
                        ignore=LPIPS_IGNORE, source=source)
  return weights_state.load_params(model, arrays)


def installed_heads_dir() -> Path | None:
  """lpips/weights/v0.1 of an installed `lpips` package, found without importing it (its
  import pulls torchvision)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    return None
  d = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1"
  return d if d.is_dir() else None


def abstract_lpips(net: str) -> LPIPS:
  """The model without materialised parameters (random init of VGG takes tens of seconds on a
  CPU); `load_lpips` fills it."""
  return nnx.eval_shape(lambda: LPIPS(LPIPSConfig(net=net), rngs=nnx.Rngs(0)))


def build_lpips(net: str, weights_dir: str) -> LPIPS:
  """The network with real weights from `weights_dir` (heads also from an installed lpips)."""
  backbone_path = find_weights(weights_dir, f"lpips_{net}")
  extra = [d for d in [installed_heads_dir()] if d is not None]
  head_path = find_weights(weights_dir, f"lpips_{net}_head", extra_dirs=extra)
  return load_lpips(abstract_lpips(net), weights_io.read_state_dict(backbone_path),
                    weights_io.read_state_dict(head_path),
                    source=f"{backbone_path.name} + {head_path.name}")
