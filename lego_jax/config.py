"""Config files are ml_collections ConfigDicts in small Python files under configs/.

`load(path, overrides)` reads one and applies `section.key=value` overrides (unknown keys are an
error naming the key); `save(cfg, workdir)` writes the resolved config as JSON next to the run's
outputs so a result can always be traced back to the exact settings.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
  pass


def resolve_path(path: str | os.PathLike) -> Path:
  """A config given as a path, or as a bare name of a file in configs/ ("tiny")."""
  p = Path(path)
  if p.exists():
    return p
  for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.py"):
    if cand.exists():
      return cand
  raise ConfigError(f"config file not found: {path} (looked in . and {CONFIG_DIR})")


def load(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`path` may carry an argument for get_config after a colon, as config_flags allows:
  "configs/ablations/ip2p_action.py:tiny"."""
  path, _, arg = str(path).partition(":")
  p = resolve_path(path)
  spec = importlib.util.spec_from_file_location(f"_lego_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    apply_override(cfg, item)
  return cfg


def _parse_value(text: str, old):
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(old, bool) and isinstance(value, str):
    value = {"true": True, "false": False}.get(value.lower(), value)
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `a.b.c=value` override; the key must already exist in the config."""
  if "=" not in item:
    raise ConfigError(f"override {item!r} is not of the form section.key=value")
  dotted, text = item.split("=", 1)
  node = cfg
  parts = dotted.split(".")
  for i, part in enumerate(parts[:-1]):
    if part not in node:
      raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r} (in override {item!r})")
    node = node[part]
  last = parts[-1]
  if last not in node:
    raise ConfigError(f"unknown config key {dotted!r}")
  old = node[last]
  value = _parse_value(text, old)
  try:
    with node.unlocked() if hasattr(node, "unlocked") else _null():
      node[last] = value
  except TypeError as e:
    raise ConfigError(f"config key {dotted!r}: {e}") from None


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def to_dict(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else dict(cfg)


def save(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike,
         name: str = "config.json") -> Path:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  out = workdir / name
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, out)
  return out


def differences(base: ml_collections.ConfigDict,
                derived: ml_collections.ConfigDict) -> dict[tuple[str, ...], object]:
  """The leaves `derived` sets differently from `base` (or adds), by key path: what a config file
  built on another one changes, so the change can be applied to a third config."""
  out = {}

  def walk(a, b, path):
    for key in b.keys():
      if isinstance(b[key], ml_collections.ConfigDict) and key in a and isinstance(
          a[key], ml_collections.ConfigDict):
        walk(a[key], b[key], path + (key,))
      elif key not in a or a[key] != b[key]:
        out[path + (key,)] = b[key]

  walk(base, derived, ())
  return out
