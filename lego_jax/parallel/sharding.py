"""The one place where logical axis names meet the device mesh.

Models name their parameter and activation axes logically (batch, embed, heads, mlp, ...);
`LOGICAL_RULES` says which mesh axis each name is split over. Changing the parallelism of every
model is an edit of this table or of the mesh shape in the config, never of model code.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lego_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("kv_length", None),
    ("layers", None),          # the stacked (scanned) layer axis stays whole on every device
    ("embed", "fsdp"),         # FSDP: weights split along their model dimension
    ("heads", "tensor"),       # tensor parallelism over attention heads ...
    ("kv", None),
    ("mlp", "tensor"),         # ... and over MLP hidden units
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("height", None),
    ("width", None),
    ("norm", None),
)

_RULES = dict(LOGICAL_RULES)
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("lego_mesh", default=None)


def logical_to_spec(names: Sequence[str | None] | None) -> P:
  """Logical axis names -> PartitionSpec of mesh axes; a mesh axis is used at most once."""
  if names is None:
    return P()
  used: set[str] = set()
  out = []
  for n in names:
    axes = _RULES.get(n) if n is not None else None
    if n is not None and n not in _RULES:
      raise KeyError(f"logical axis {n!r} has no entry in LOGICAL_RULES")
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def make_mesh(shape: Sequence[int] | dict[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; -1 in one place takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  if shape is None:
    shape = (-1, 1, 1)
  if isinstance(shape, dict):
    shape = tuple(shape.get(a, 1) for a in MESH_AXES)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices) or min(shape) < 1:
    # A ConfigError (a ValueError): the config asks for other devices than there are.
    raise ConfigError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                      f"{len(devices)} available: set --config.mesh.shape to axes whose product "
                      f"is {len(devices)} (or -1 in one place, e.g. (-1,1,1))")
  arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Activation constraints inside this block shard over `mesh`."""
  token = _MESH.set(mesh)
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _MESH.reset(token)


def current_mesh() -> Mesh | None:
  return _MESH.get()


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` with every dimension its mesh axes do not divide left whole (replicated).

  The rule table is written for the full-size models; at other sizes a few small arrays (an RGB
  output bias of 3, a norm over 4 channels) cannot split over an axis of 2. They stay replicated,
  which costs nothing, instead of every such size needing its own rule."""
  out = []
  for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if entry is None:
      out.append(None)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    out.append(entry if shape[i] % size == 0 else None)
  return P(*out)


def named_sharding(mesh: Mesh, names: Sequence[str | None] | None,
                   shape: Sequence[int] | None = None) -> NamedSharding:
  """The sharding of logical `names` on `mesh`; with `shape`, indivisible dimensions whole."""
  spec = logical_to_spec(names)
  return NamedSharding(mesh, spec if shape is None else fit_spec(spec, shape, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout by logical names; a no-op outside `use_mesh`."""
  mesh = _MESH.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))


def state_shardings(mesh: Mesh, state):
  """NamedShardings for an NNX state whose variables carry logical `out_sharding` names
  (dimensions the mesh cannot divide stay whole, see `fit_spec`)."""
  specs, treedef = jax.tree.flatten(nnx.get_partition_spec(state),
                                    is_leaf=lambda x: isinstance(x, P))
  values = jax.tree.leaves(state)
  if len(values) != len(specs):
    raise ValueError(f"{len(specs)} partition specs for {len(values)} arrays")
  return treedef.unflatten([
      NamedSharding(mesh, fit_spec(logical_to_spec(tuple(spec)), value.shape, mesh))
      for spec, value in zip(specs, values)])
