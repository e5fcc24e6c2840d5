"""Reading and writing PyTorch-side weight files without ever running pickled code.

safetensors is read first (single files and sharded `*.index.json` directories); PyTorch pickles
(.bin/.ckpt/.pth/.pt) only through `torch.load(weights_only=True)`, which refuses any object that
is not plain tensors/containers. A refused file raises `UnsafeCheckpointError`, it is never executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pth", ".pt")


class WeightFileError(ValueError):
  """A weight file is missing, unreadable or of an unknown kind."""


class WeightPathError(WeightFileError):
  """The path given for a weights file names none: a usage error (exit 2), where a file that is
  there but unreadable, unsafe or malformed is a data fault (exit 1)."""


class UnsafeCheckpointError(WeightFileError):
  """A pickle that needs arbitrary code to load: refused, never executed."""


def _to_numpy(t) -> np.ndarray:
  # bf16 has no numpy dtype in torch's .numpy(); go through fp32 and keep the values exact.
  import torch  # optional (the torch extra): only PyTorch pickles and bf16 tensors need it

  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.detach().cpu().numpy()


def _flatten(tree, prefix="") -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # bf16 safetensors cannot be read by the numpy backend of old versions
    if "bfloat16" not in str(e) and "BF16" not in str(e):
      raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from None
    from safetensors.torch import load_file as load_torch  # optional: needs torch

    return {k: _to_numpy(v) for k, v in load_torch(str(path)).items()}


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # optional (the torch extra): reading pickles needs it, safetensors do not
  except ImportError:
    raise WeightFileError(
        f"{path}: reading PyTorch pickles needs torch (pip install 'lego-jax[torch]'), "
        "or convert the file to .safetensors first") from None
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    if "weights_only" in str(e) or "Unsupported global" in str(e) or "WeightsUnpickler" in str(e):
      first = str(e).strip().splitlines()[0][:200]
      raise UnsafeCheckpointError(
          f"{path}: refused, loading it would run arbitrary pickled code ({first}). "
          "Re-save it as safetensors from a trusted environment.") from None
    raise WeightFileError(f"{path}: not a readable PyTorch file ({e})") from None
  # Lightning checkpoints nest the weights under "state_dict"; plain state dicts are flat.
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise WeightFileError(f"{path}: expected a state dict, found {type(obj).__name__}")
  flat = _flatten(obj)
  return {k: _to_numpy(v) for k, v in flat.items() if isinstance(v, torch.Tensor)}


def _index_shards(index: Path) -> list[str]:
  """The shard files a sharded checkpoint's `*.index.json` names (its "weight_map" values)."""
  try:
    shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    if not shards or not all(isinstance(s, str) and s for s in shards):
      raise ValueError(f"shard names {shards[:3]}")
  except (ValueError, KeyError, TypeError, AttributeError) as e:   # JSONDecodeError is a ValueError
    raise WeightFileError(
        f"{index}: not a weight index (expected JSON {{\"weight_map\": {{tensor: shard file}}}}; "
        f"{type(e).__name__}: {e})") from None
  return shards


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch-named state dict from a file or a directory, as numpy arrays.

  A directory is searched for (in this order) a sharded safetensors index, single safetensors
  files, a sharded pickle index, then pickles; all shards are merged.
  """
  path = Path(path)
  if not path.exists():
    raise WeightPathError(f"weight file or directory not found: {path}")
  if path.is_dir():
    for index_name in ("*.safetensors.index.json", "*.bin.index.json"):
      for index in sorted(path.glob(index_name)):
        shards = _index_shards(index)
        out = {}
        for s in shards:
          out.update(read_state_dict(path / s))
        return out
    for suffixes in (SAFE_SUFFIXES, PICKLE_SUFFIXES):
      files = sorted(p for p in path.iterdir() if p.suffix in suffixes)
      if files:
        out = {}
        for f in files:
          out.update(read_state_dict(f))
        return out
    raise WeightPathError(
        f"{path}: no weight files (*.safetensors, *.bin, *.ckpt, *.pth) in this directory")
  if path.suffix in SAFE_SUFFIXES:
    return _read_safetensors(path)
  if path.suffix in PICKLE_SUFFIXES:
    return _read_pickle(path)
  raise WeightPathError(
      f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, .bin, .ckpt, .pth or .pt")


def as_state_dict(source) -> tuple[Mapping[str, np.ndarray], str]:
  """Every loader's one input: a state dict as it is, or a file / directory read from disk.
  Returns (the state dict, a name for error messages)."""
  if isinstance(source, Mapping):
    return source, "(state dict)"
  if isinstance(source, (str, os.PathLike)):
    return read_state_dict(source), str(source)
  raise TypeError(f"expected a state dict or a path, got {type(source).__name__}")


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> Path:
  """Writes `tensors` atomically: a crash never leaves a half-written file at `path`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
            metadata=dict(metadata or {}))
  os.replace(tmp, path)
  return path
