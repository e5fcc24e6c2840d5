"""Building a model from the config a checkpoint carries (`from_pretrained`), as data.

Every model module holds one translation table from the PyTorch side's config names to its own
config fields (`HF_CONFIG` in llama.py, clip_vision.py, ... ; `COMPVIS_CONFIG` for the yaml of a
CompVis single file), and a table of settings it does not implement (`HF_REQUIRE`: a checkpoint
asking for another value is refused, naming the field). This module only applies such tables:

    table entry  our_field: "their_key"               required
                 our_field: ("their_key", default)    transformers' / diffusers' default if absent
                 our_field: function(their_config)    anything computed (nested, renamed, legacy)
    require      "their_key": (default, allowed values...)   absent = default

`settle` then joins the stated config with the caller's overrides: an override of a field the
checkpoint states must agree with it; fields the checkpoint does not state (dtype, remat, ...)
take the override. `check_weights` compares the config with the sizes the weights have, so a
config.json that disagrees with its safetensors is refused by field name before any key is mapped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from lego_jax.config import ConfigError


class PretrainedConfigError(ConfigError):
  """A checkpoint's config that we cannot honour, or that disagrees with its weights or with
  an override. One line, naming the field."""


def read_json(path: str | os.PathLike) -> dict:
  path = Path(path)
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise PretrainedConfigError(f"{path}: not a readable JSON config ({e})") from None


def config_file(path: str | os.PathLike, names: tuple[str, ...] = ("config.json",)) -> Path | None:
  """The config beside a checkpoint: in a directory, or next to a single file (same stem, or one
  of `names` in its folder). None when there is none."""
  path = Path(path)
  if path.is_dir():
    return next((path / n for n in names if (path / n).is_file()), None)
  for cand in [path.with_suffix(s) for s in (".json", ".yaml")] + [path.parent / n for n in names]:
    if cand.is_file():
      return cand
  return None


def require_config(path: str | os.PathLike, what: str,
                   names: tuple[str, ...] = ("config.json",)) -> Path:
  """The config file of a checkpoint directory, or an error saying what is missing."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what} checkpoint not found: {path}")
  found = config_file(path, names)
  if found is None:
    raise PretrainedConfigError(
        f"{path}: no {' or '.join(names)} beside the weights, so the {what} sizes are unknown; "
        "use the directory save_pretrained wrote, or build the model from a config and call "
        "its load_* function")
  return found


def _value(config: Mapping[str, Any], spec, field: str, source: str):
  if callable(spec):
    return spec(config)
  key, default = (spec, _REQUIRED) if isinstance(spec, str) else spec
  if config.get(key) is None:
    if default is _REQUIRED:
      raise PretrainedConfigError(f"{source}: no {key!r} (needed for {field})")
    return default
  return config[key]


_REQUIRED = object()


def translate(config: Mapping[str, Any], table: Mapping[str, Any],
              require: Mapping[str, tuple] = (), source: str = "config") -> dict[str, Any]:
  """Our config fields from theirs by `table`, after checking `require` (see the module doc)."""
  for key, (default, *allowed) in dict(require).items():
    value = config.get(key, default)
    value = default if value is None else value
    if value not in (default, *allowed):
      raise PretrainedConfigError(
          f"{source}: {key}={value!r} is not supported (this model implements "
          f"{' or '.join(repr(a) for a in (default, *allowed))})")
  out = {}
  for field, spec in table.items():
    value = _value(config, spec, field, source)
    out[field] = tuple(value) if isinstance(value, list) else value
  return out


def named(their_key: str, fn: Callable[[Mapping[str, Any]], Any]) -> Callable:
  """A computed table entry that still names the key it reads (for error messages)."""
  fn.their_key = their_key
  return fn


def _their_name(spec) -> str | None:
  if isinstance(spec, str):
    return spec
  if isinstance(spec, tuple):
    return spec[0]
  return getattr(spec, "their_key", None)


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return tuple(np.atleast_1d(a).tolist()) == tuple(np.atleast_1d(b).tolist())
  return a == b


def settle(stated: Mapping[str, Any], overrides: Mapping[str, Any], source: str,
           names: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`stated` (from the checkpoint) + `overrides`; an override of a stated field must agree.

  `names` (the translation table) lets the error say which key of the checkpoint's config the
  field came from."""
  for field, value in overrides.items():
    if field in stated and not _same(stated[field], value):
      theirs = _their_name((names or {}).get(field))
      said = f" ({theirs})" if theirs and theirs != field else ""
      raise PretrainedConfigError(
          f"{field}={value!r} was asked for, but {source} says {field}{said}="
          f"{stated[field]!r}; drop the override or use a checkpoint of that size")
  return {**stated, **overrides}


def check_weights(fields: Mapping[str, Any], state_dict: Mapping[str, Any],
                  facts: Mapping[str, Callable[[Mapping[str, Any], Mapping[str, Any]], Any]],
                  source: str) -> None:
  """Each fact computes a field's value from the weights (and the other fields); a value that
  differs from the config's is refused, naming the field. A fact that finds no weight to read
  (KeyError) is skipped: the key map reports missing weights by name afterwards."""
  for field, fact in facts.items():
    try:
      seen = fact(state_dict, fields)
    except (KeyError, IndexError, StopIteration):
      continue
    if not _same(seen, fields[field]):
      raise PretrainedConfigError(
          f"{source}: the config says {field}={fields[field]!r} but the weights have "
          f"{field}={seen!r}")


def dim(key: str, axis: int) -> Callable:
  """A fact: one dimension of one weight."""
  return lambda sd, f: int(np.shape(sd[key])[axis])


def count(prefix: str) -> Callable:
  """A fact: how many `{prefix}{n}.` indices the weights hold (layers, blocks)."""
  def fact(sd, f):
    found = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    found = {int(n) for n in found if n.isdigit()}
    if not found:
      raise KeyError(prefix)
    return len(found)
  return fact
