"""InceptionV3 as pytorch-fid uses it for FID: the TF "2015-12-05" graph ported to PyTorch.

It is torchvision's Inception3 (1008 classes, no aux head) with pytorch-fid's patches:
FIDInceptionA/C/E_1 average-pool without counting the padding, and the last block (FIDInceptionE_2)
max-pools in its pool branch. The feature is the 2048-d global average after Mixed_7c ("pool3").
Input handling follows `pytorch_fid.inception.InceptionV3(resize_input=True,
normalize_input=True)`: bilinear resize to 299x299 (align_corners=False, no antialias), then
[0, 1] -> [-1, 1].

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, torchvision names
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...; `fc.*` unused).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.eval.images import resize
from lego_jax.eval.weight_files import find_weights
from lego_jax.weights import io as weights_io
from lego_jax.weights import state as weights_state
from lego_jax.weights.mapping import Kind, Rule, torch_to_jax

BN_EPS = 1e-3  # torchvision's BasicConv2d


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm with frozen statistics -> ReLU.

  The running statistics are nnx.Params here: this network is only ever evaluated, and keeping
  them Params lets the one key map and loader handle them like the weights.
  """

  def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(cin, cout, (kh, kw), strides=(stride, stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, rngs=rngs)
    self.bn = FrozenBatchNorm(cout)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


class FrozenBatchNorm(nnx.Module):
  def __init__(self, c: int):
    self.scale = nnx.Param(jnp.ones((c,)))
    self.bias = nnx.Param(jnp.zeros((c,)))
    self.mean = nnx.Param(jnp.zeros((c,)))
    self.var = nnx.Param(jnp.ones((c,)))

  def __call__(self, x):
    inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return (x - self.mean[...]) * inv + self.bias[...]


def max_pool(x, k, s, p=0):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                               ((0, 0), (p, p), (p, p), (0, 0)))


def avg_pool_3x3_exclude_pad(x):
  """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return total / count


class InceptionA(nnx.Module):
  CONVS = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
           "branch3x3dbl_3", "branch_pool")

  def __init__(self, cin: int, pool_features: int, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], -1)


class InceptionB(nnx.Module):
  CONVS = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")

  def __init__(self, cin: int, *, rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 3, 2)], -1)


class InceptionC(nnx.Module):
  CONVS = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
           "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")

  def __init__(self, cin: int, c7: int, *, rngs):
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, **row, rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, **col, rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, bd, bp], -1)


class InceptionD(nnx.Module):
  CONVS = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
           "branch7x7x3_4")

  def __init__(self, cin: int, *, rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], -1)


class InceptionE(nnx.Module):
  """`pool="avg"`: FIDInceptionE_1 (padding not counted); `pool="max"`: FIDInceptionE_2."""
  CONVS = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
           "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")

  def __init__(self, cin: int, pool: str, *, rngs):
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], -1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], -1)
    pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], -1)


# (torch name, block class, constructor args after cin, out channels): the network in one table.
MIXED = (("Mixed_5b", InceptionA, (32,), 256), ("Mixed_5c", InceptionA, (64,), 288),
         ("Mixed_5d", InceptionA, (64,), 288), ("Mixed_6a", InceptionB, (), 768),
         ("Mixed_6b", InceptionC, (128,), 768), ("Mixed_6c", InceptionC, (160,), 768),
         ("Mixed_6d", InceptionC, (160,), 768), ("Mixed_6e", InceptionC, (192,), 768),
         ("Mixed_7a", InceptionD, (), 1280), ("Mixed_7b", InceptionE, ("avg",), 2048),
         ("Mixed_7c", InceptionE, ("max",), 2048))
STEM = (("Conv2d_1a_3x3", 3, 32, 3, 2, 0), ("Conv2d_2a_3x3", 32, 32, 3, 1, 0),
        ("Conv2d_2b_3x3", 32, 64, 3, 1, 1), ("pool",),
        ("Conv2d_3b_1x1", 64, 80, 1, 1, 0), ("Conv2d_4a_3x3", 80, 192, 3, 1, 0), ("pool",))


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  dtype: str = "float32"
  param_dtype: str = "float32"


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's InceptionV3 up to pool3: (B, H, W, 3) in [-1, 1] -> (B, 2048)."""

  def __init__(self, config: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs):
    self.config = config
    for layer in STEM:
      if layer[0] != "pool":
        name, cin, cout, k, s, p = layer
        setattr(self, name, BasicConv2d(cin, cout, k, stride=s, padding=p, rngs=rngs))
    cin = 192
    for name, cls, args, cout in MIXED:
      setattr(self, name, cls(cin, *args, rngs=rngs))
      cin = cout

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(self.config.dtype)
    for layer in STEM:
      x = max_pool(x, 3, 2) if layer[0] == "pool" else getattr(self, layer[0])(x)
    for name, *_ in MIXED:
      x = getattr(self, name)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def conv_names() -> list[str]:
  names = [layer[0] for layer in STEM if layer[0] != "pool"]
  for block, cls, _, _ in MIXED:
    names += [f"{block}.{conv}" for conv in cls.CONVS]
  return names


def inception_rules() -> list[Rule]:
  """Generated from the architecture table above, so it covers every conv exactly once."""
  rules = []
  for n in conv_names():
    rules += [Rule(f"{n}.conv.weight", f"{n}.conv.kernel", Kind.CONV2D),
              Rule(f"{n}.bn.weight", f"{n}.bn.scale"), Rule(f"{n}.bn.bias", f"{n}.bn.bias"),
              Rule(f"{n}.bn.running_mean", f"{n}.bn.mean"),
              Rule(f"{n}.bn.running_var", f"{n}.bn.var")]
  return rules


# The 1008-way classifier and BN step counters are not part of the pool3 feature.
INCEPTION_IGNORE = (r"^fc\.", r"\.num_batches_tracked$", r"^AuxLogits\.")


def abstract_inception() -> FIDInceptionV3:
  return nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))


def load_inception(model: FIDInceptionV3, state_dict, source: str = "FID Inception weights"):
  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
  arrays = torch_to_jax(sd, inception_rules(), weights_state.param_shapes(model),
                        ignore=INCEPTION_IGNORE, source=source)
  return weights_state.load_params(model, arrays)


def build_inception(weights_dir: str) -> FIDInceptionV3:
  path = find_weights(weights_dir, "fid")
  return load_inception(abstract_inception(), weights_io.read_state_dict(path), source=path.name)


@nnx.jit
def pool3_features(model: FIDInceptionV3, images: jnp.ndarray) -> jnp.ndarray:
  """images: (B, H, W, 3) in [0, 1] -> (B, 2048) float32, exactly pytorch-fid's preprocessing."""
  x = resize(images.astype(jnp.float32), (299, 299), "bilinear")
  return model(2.0 * x - 1.0)


def pool3_features_np(model: FIDInceptionV3, images: np.ndarray) -> np.ndarray:
  return np.asarray(jax.device_get(pool3_features(model, jnp.asarray(images))))
