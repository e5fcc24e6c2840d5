"""The results of `lego-jax bench` runs as one Markdown table, each line against its target.

    python -m lego_jax.bench.table DIR      # every DIR/*.json written by `lego-jax bench --out=`

launch/gpu_bench.sh prints this last. A run that failed or timed out has no JSON and no line;
its log beside the JSONs says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (bench, test on the result, the target in words). Batch and size conditions are part of the
# test: a target holds for the shapes it names only.
TARGETS = (
    ("unet-train", lambda r: r["batch"] == 32 and r["shapes"]["latent"][1] == 32
     and r["shapes"]["context"][1] == 410, "samples_per_s", ">=", 600.0,
     "UNet step b32 256px ctx 410: >= 600 samples/s"),
    ("vllm-decode", lambda r: r["batch"] == 1 and r["shapes"]["params"] > 1e10, "tokens_per_s",
     ">=", 140.0, "13B decode b1: >= 140 tok/s (H200)"),
    ("vllm-decode", lambda r: r["batch"] == 16 and r["shapes"]["params"] > 1e10, "tokens_per_s",
     ">=", 2000.0, "13B decode b16 with H_t: >= 2000 tok/s (H200)"),
    ("sample", lambda r: r["batch"] == 32 and r["shapes"]["steps"] == 100
     and r["shapes"]["frames"][1] == 256, "s_per_step", "<=", 8.0,
     "100-step sampling 32 frames 256px: <= 8 s"),
    ("vllm-train", lambda r: 1e9 <= r["shapes"]["trained_params"] <= 4e9, "mfu", ">=", 0.40,
     "VLLM tuning step, 1-3B LLaMA: MFU >= 40%"),
)


def target_of(r: dict) -> str:
  for bench, applies, key, op, bound, words in TARGETS:
    if r.get("bench") != bench:
      continue
    try:
      if not applies(r):
        continue
    except (KeyError, IndexError, TypeError):
      continue
    value = r["ms_per_step"] / 1000.0 if key == "s_per_step" else r.get(key)
    if value is None:
      return f"{words}: n/a"
    ok = value >= bound if op == ">=" else value <= bound
    return f"{words}: {'MET' if ok else 'missed'}"
  return ""


def _fmt(x, digits: int = 1) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:,.{digits}f}"
  return str(x)


def rows(results: list[tuple[str, dict]]) -> list[str]:
  head = ("| run | bench | device | dtype | batch | ms/step | throughput | TFLOP/s | MFU | "
          "compile s | peak GiB | vs torch eager | vs torch.compile | target |")
  out = [head, "|" + " --- |" * (head.count("|") - 1)]
  for name, r in results:
    unit = next((u for u in ("samples", "tokens", "frames") if f"{u}_per_s" in r), None)
    throughput = f"{r[f'{unit}_per_s']:,.1f} {unit}/s" if unit else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    peak = r.get("peak_memory_bytes")
    out.append("| " + " | ".join([
        name, r.get("bench", "?"), f"{r.get('num_devices', 1)}x {r.get('device_kind', '?')}",
        r.get("dtype", "?"), str(r.get("batch", "?")), _fmt(r.get("ms_per_step")), throughput,
        _fmt(r.get("tflops")), mfu, _fmt(r.get("compile_s")),
        _fmt(peak / 2 ** 30 if peak else None), _fmt(r.get("speedup_vs_torch_eager"), 2) + "x"
        if r.get("speedup_vs_torch_eager") else "-",
        _fmt(r.get("speedup_vs_torch_compile"), 2) + "x"
        if r.get("speedup_vs_torch_compile") else "-", target_of(r)]) + " |")
  return out


def load(directory: Path) -> list[tuple[str, dict]]:
  results = []
  for path in sorted(Path(directory).glob("*.json")):
    try:
      results.append((path.stem, json.loads(path.read_text())))
    except (OSError, ValueError) as e:
      print(f"skipping {path}: {e}", file=sys.stderr)
  return results


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__, file=sys.stderr)
    return 2
  results = load(Path(argv[1]))
  if not results:
    print(f"no bench results in {argv[1]}", file=sys.stderr)
    return 1
  print("\n".join(rows(results)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
