"""Key maps built from tables, and the load / export steps every model's loader shares.

A block table row is (jax suffix, {layout: torch suffix}, {layout: Kind}); a model's loader walks
its blocks from its config, giving (jax prefix, {layout: torch prefix}, table, stack placeholder),
and `block_rules` joins them into `Rule`s (lego_jax.weights.mapping) for one layout. The layouts
are the two that Stable Diffusion checkpoints come in: diffusers folders and CompVis single files.
Each model keeps its own tables beside it (models/vae.py, models/unet.py).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from flax import nnx

from lego_jax.weights.mapping import Kind, KeyMappingError, Rule, jax_to_torch, torch_to_jax
from lego_jax.weights.state import flat_params, param_shapes

LAYOUTS = ("diffusers", "compvis")

TableRow = tuple[str, dict[str, str], Kind | dict[str, Kind]]
Block = tuple[str, dict[str, str], list[TableRow], str | None]


def param_rows(jax_name: str, torch_names: dict[str, str], kind: Kind | dict[str, Kind],
               weight: str = "kernel", bias: bool = True) -> list[TableRow]:
  """Rows for one layer: its weight (`kernel`/`scale`) and, if it has one, its bias."""
  rows = [(f"{jax_name}.{weight}", {k: f"{v}.weight" for k, v in torch_names.items()}, kind)]
  if bias:
    rows.append((f"{jax_name}.bias", {k: f"{v}.bias" for k, v in torch_names.items()},
                 Kind.IDENTITY))
  return rows


def same(name: str) -> dict[str, str]:
  return {layout: name for layout in LAYOUTS}


def norm_rows(jax_name: str, torch_names: dict[str, str]) -> list[TableRow]:
  return param_rows(jax_name, torch_names, Kind.IDENTITY, weight="scale")


CONV_TABLE: list[TableRow] = param_rows("", same(""), Kind.CONV2D)
NORM_TABLE: list[TableRow] = norm_rows("", same(""))


def _join(prefix: str, suffix: str) -> str:
  return ".".join(p.strip(".") for p in (prefix, suffix) if p.strip("."))


def block_rules(blocks: Sequence[Block], layout: str) -> list[Rule]:
  """`Rule`s for `layout` from the walked blocks (see the module docstring)."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  rules = []
  for jax_prefix, torch_prefixes, table, stack in blocks:
    for jax_suffix, torch_suffixes, kind in table:
      kind = kind[layout] if isinstance(kind, dict) else kind
      rules.append(Rule(_join(torch_prefixes[layout], torch_suffixes[layout]),
                        _join(jax_prefix, jax_suffix), kind, stack=stack))
  return rules


def find_prefix(state_dict: Mapping[str, Any], anchors: Mapping[str, str],
                prefix: str | None, what: str) -> tuple[str, str]:
  """(layout, prefix) of `what` in `state_dict`, found from each layout's anchor key.

  `anchors` maps layout -> a key that only that layout has (relative to the model's prefix).
  With `prefix` given only that prefix is considered.
  """
  found = []
  for layout, anchor in anchors.items():
    for key in state_dict:
      if key.endswith(anchor) and (prefix is None or key == prefix + anchor):
        found.append((layout, key[: len(key) - len(anchor)]))
  if len(found) != 1:
    hint = "none" if not found else ", ".join(f"{lay} at {p!r}" for lay, p in found)
    raise KeyMappingError(
        f"cannot tell where the {what} is in this checkpoint (candidates: {hint}); "
        "pass layout= and prefix=")
  return found[0]


def load_mapped(model: nnx.Module, state_dict: Mapping[str, Any], rules: Sequence[Rule],
                prefix: str, ignore: Sequence[str], source: str,
                shape_overrides: Mapping[str, tuple[int, ...]] | None = None,
                ) -> dict[str, np.ndarray]:
  """Maps the keys under `prefix` of `state_dict` onto `model`'s parameter paths (checked)."""
  sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  shapes = dict(param_shapes(model))
  shapes.update(shape_overrides or {})
  return torch_to_jax(sub, rules, shapes, ignore=ignore, source=source)


def export_mapped(model: nnx.Module, rules: Sequence[Rule], prefix: str) -> dict[str, np.ndarray]:
  """The model's parameters under the PyTorch names of `rules`, each key led by `prefix`."""
  return {prefix + k: v for k, v in jax_to_torch(flat_params(model), rules).items()}
