"""PyTorch-name <-> NNX-path key maps, written as data and applied in both directions.

A key map is a list of `Rule`s. Each rule pairs a PyTorch key template with an NNX path template;
`{name}` placeholders match layer indices (digits) and carry over between the two names. A rule
with `stack="l"` sends PyTorch's per-layer tensors `...layers.{l}...` into one stacked parameter
with a leading layer axis (what `nnx.scan` over identical layers wants), and back.

Every source key is either mapped, matched by an explicit ignore pattern, or reported; every
model parameter is either filled or reported; shapes are checked. Nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Iterable, Mapping, Sequence

import numpy as np


class Kind(enum.Enum):
  """How a PyTorch tensor becomes a JAX one."""
  IDENTITY = "identity"
  LINEAR = "linear"          # torch Linear (out, in) -> kernel (in, out)
  CONV2D = "conv2d"          # torch Conv2d (O, I, kh, kw) -> kernel (kh, kw, I, O)
  CONV1X1_LINEAR = "conv1x1"  # torch 1x1 Conv2d (O, I, 1, 1) -> dense kernel (I, O)


def to_jax(x: np.ndarray, kind: Kind) -> np.ndarray:
  if kind is Kind.IDENTITY:
    return x
  if kind is Kind.LINEAR:
    return x.T
  if kind is Kind.CONV2D:
    return x.transpose(2, 3, 1, 0)
  if kind is Kind.CONV1X1_LINEAR:
    return x.reshape(x.shape[0], x.shape[1]).T
  raise ValueError(kind)


def to_torch(x: np.ndarray, kind: Kind) -> np.ndarray:
  if kind is Kind.IDENTITY:
    return x
  if kind is Kind.LINEAR:
    return x.T
  if kind is Kind.CONV2D:
    return x.transpose(3, 2, 0, 1)
  if kind is Kind.CONV1X1_LINEAR:
    return x.T[:, :, None, None]
  raise ValueError(kind)


@dataclasses.dataclass(frozen=True)
class Rule:
  torch: str
  jax: str
  kind: Kind = Kind.IDENTITY
  stack: str | None = None  # placeholder that indexes the leading axis of a scanned parameter

  def _regex(self, template: str, drop: str | None = None) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for p in parts:
      m = re.fullmatch(r"\{(\w+)\}", p)
      if m:
        out.append(f"(?P<{m.group(1)}>\\d+)")
      else:
        out.append(re.escape(p))
    return re.compile("".join(out) + r"\Z")

  @property
  def torch_re(self) -> re.Pattern:
    return self._regex(self.torch)

  @property
  def jax_re(self) -> re.Pattern:
    return self._regex(self.jax)


class KeyMappingError(KeyError):
  """Source keys and model parameters that do not line up; lists every culprit."""

  def __str__(self):  # KeyError quotes its message; keep it readable.
    return str(self.args[0])


def _listing(title: str, keys: Sequence[str], limit: int = 30) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return f"{title} ({len(keys)}): {shown}{more}"


def torch_to_jax(
    state_dict: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, np.ndarray]:
  """Maps a PyTorch state dict onto NNX parameter paths (dotted strings).

  Args:
    state_dict: PyTorch key -> array.
    rules: the model's key map.
    target_shapes: every NNX parameter path of the model -> its shape.
    ignore: regexes of source keys known to be unused (buffers, other towers).
    source: a name for error messages.
  Returns:
    NNX path -> array, covering every entry of `target_shapes`.
  Raises:
    KeyMappingError listing unexpected, missing and mis-shaped keys, and keys whose tensors are
    not floating point.
  """
  compiled = [(r, r.torch_re) for r in rules]
  ignore_re = [re.compile(p) for p in ignore]
  out: dict[str, np.ndarray] = {}
  stacks: dict[str, dict[int, np.ndarray]] = {}
  unexpected, bad_shape, bad_dtype = [], [], []
  for key, value in state_dict.items():
    for rule, rx in compiled:
      m = rx.match(key)
      if m is None:
        continue
      groups = m.groupdict()
      layer = int(groups.pop(rule.stack)) if rule.stack else None
      target = rule.jax.format(**groups)
      arr = to_jax(np.asarray(value), rule.kind)
      if arr.dtype.kind in "biuc":   # every parameter is real floating point
        bad_dtype.append(f"{key} ({arr.dtype})")
      if layer is None:
        out[target] = arr
      else:
        stacks.setdefault(target, {})[layer] = arr
      break
    else:
      if not any(p.search(key) for p in ignore_re):
        unexpected.append(key)
  for target, layers in stacks.items():
    n = target_shapes[target][0] if target in target_shapes else len(layers)
    if sorted(layers) != list(range(n)):
      bad_shape.append(f"{target} (layers {sorted(layers)[:5]}..., model has {n})")
      continue
    out[target] = np.stack([layers[i] for i in range(n)])
  missing = [k for k in target_shapes if k not in out]
  unexpected += [k for k in out if k not in target_shapes]
  for k, v in out.items():
    if k in target_shapes and tuple(v.shape) != tuple(target_shapes[k]):
      bad_shape.append(f"{k} {tuple(v.shape)} != model {tuple(target_shapes[k])}")
  if unexpected or missing or bad_shape or bad_dtype:
    lines = [f"{source} does not match the model:"]
    if bad_dtype:
      # A cast would invent weights (an int32 tensor is an index table or a damaged file).
      lines.append(_listing("integer / bool / complex tensors for floating-point parameters",
                            bad_dtype))
    if unexpected:
      lines.append(_listing("unexpected keys", unexpected))
    if missing:
      lines.append(_listing("missing parameters", missing))
    if bad_shape:
      lines.append(_listing("mis-shaped", bad_shape))
    raise KeyMappingError("\n  ".join(lines))
  return {k: v for k, v in out.items() if k in target_shapes}


def jax_to_torch(params: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """The inverse of `torch_to_jax`: NNX path -> array back to PyTorch names."""
  compiled = [(r, r.jax_re) for r in rules]
  out: dict[str, np.ndarray] = {}
  unmapped = []
  for path, value in params.items():
    value = np.asarray(value)
    for rule, rx in compiled:
      m = rx.match(path)
      if m is None:
        continue
      groups = m.groupdict()
      if rule.stack:
        for layer in range(value.shape[0]):
          out[rule.torch.format(**groups, **{rule.stack: layer})] = to_torch(value[layer], rule.kind)
      else:
        out[rule.torch.format(**groups)] = to_torch(value, rule.kind)
      break
    else:
      unmapped.append(path)
  if unmapped:
    raise KeyMappingError(_listing("parameters with no PyTorch name", unmapped))
  return out


def rename_prefix(state_dict: Mapping[str, np.ndarray], old: str, new: str,
                  keep_others: bool = False) -> dict[str, np.ndarray]:
  """Keys starting with `old` get `new` instead; others are dropped unless `keep_others`."""
  out = {}
  for k, v in state_dict.items():
    if k.startswith(old):
      out[new + k[len(old):]] = v
    elif keep_others:
      out[k] = v
  return out
