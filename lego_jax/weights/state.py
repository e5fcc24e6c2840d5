"""NNX model state <-> flat {dotted.path: array} dicts, the form the key maps speak."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Every parameter path -> shape; works on abstract models from `nnx.eval_shape` too."""
  return {_dotted(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def abstract_param_shapes(make: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
  return param_shapes(nnx.eval_shape(make))


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  return {_dotted(p): np.asarray(jax.device_get(v.get_value()))
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_params(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> nnx.Module:
  """Writes `arrays` (dotted path -> array) into the model's parameters, keeping their dtypes."""
  state = nnx.state(model, nnx.Param)
  missing = []
  for path, var in nnx.to_flat_state(state):
    key = _dotted(path)
    if key not in arrays:
      missing.append(key)
      continue
    old = var.get_value()
    new = np.asarray(arrays[key])
    if tuple(new.shape) != tuple(old.shape):
      raise ValueError(f"{key}: shape {new.shape} != model {old.shape}")
    var.set_value(jnp.asarray(new, dtype=old.dtype))
  if missing:
    raise KeyError(f"no value for parameters: {missing[:20]}")
  nnx.update(model, state)
  return model


def count_params(model: nnx.Module) -> int:
  return int(sum(int(np.prod(s)) for s in param_shapes(model).values()))
