"""NNX model state <-> flat {dotted.path: array} dicts, the form the key maps speak."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lego_jax.weights.mapping import KeyMappingError


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


def _cast(key: str, new: np.ndarray, dtype) -> jax.Array:
  """`new` in the parameter's dtype: widening is exact and narrowing is the dtype the config
  chose, but a value the narrower type cannot hold (inf from a finite float32 in float16) or a
  non-float source (int / bool: no weights) is refused, naming the parameter."""
  if new.dtype.kind in "biuc" and jnp.issubdtype(dtype, jnp.floating):
    raise KeyMappingError(f"{key}: the weights hold {new.dtype} values for a {jnp.dtype(dtype)} "
                          "parameter (refused: casting would invent weights)")
  out = jnp.asarray(new, dtype=dtype)
  if (jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < new.dtype.itemsize
      and not np.array_equal(np.isfinite(new), np.isfinite(np.asarray(out)))):
    raise KeyMappingError(f"{key}: {new.dtype} values beyond the range of the model's "
                          f"{jnp.dtype(dtype)} (largest |x| {np.nanmax(np.abs(new)):.4g})")
  return out


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
    var.set_value(_cast(key, new, old.dtype))
  if missing:
    raise KeyError(f"no value for parameters: {missing[:20]}")
  nnx.update(model, state)
  return model


def count_params(model: nnx.Module) -> int:
  return int(sum(int(np.prod(s)) for s in param_shapes(model).values()))
