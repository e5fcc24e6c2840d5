"""Measured memory of `lego-jax bench` runs against `lego-jax plan`'s row for the same program.

    python -m lego_jax.bench.vs_plan DIR PLAN_JSON [TARGET]

DIR holds `lego-jax bench --out=` JSONs (launch/gpu_bench.sh writes them); PLAN_JSON is a
WORKDIR/plan.json of `lego-jax plan` (TARGET: which of its targets' rows, default every GPU
target's). A bench run and a plan row are the same program per device when they are the same
stage of the same config at the same micro-batch per device: ldm-train <-> ldm (batch /
grad_accum / devices), sample <-> sample (frames per device), vllm-train <-> vllm. For each pair
it prints what the plan's compiler said (arguments + outputs - aliased + temporaries, from a
deviceless compile) beside what the device's compiler said for the same step
(`compiled.memory_analysis()` in the bench) and the allocator's peak while it ran
(`memory_stats()["peak_bytes_in_use"]`: the buffers of the step plus whatever else the process
holds, e.g. the batch and the state's first copy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lego_jax.bench import table

STAGE_OF = {"ldm-train": "ldm", "sample": "sample", "vllm-train": "vllm"}
GIB = 2**30


def per_device_batch(result: dict) -> float:
  accum = max(int(result.get("shapes", {}).get("grad_accum", 1) or 1), 1)
  return result["batch"] / accum / max(int(result.get("num_devices", 1)), 1)


def pairs(results: list[tuple[str, dict]], plan: dict, target: str | None = None
          ) -> list[tuple[str, dict, dict]]:
  """(run name, bench result, plan row) for every bench run the plan has a row of."""
  out = []
  for name, r in results:
    stage = STAGE_OF.get(r.get("bench"))
    if stage is None or r.get("config") != plan.get("config"):
      continue
    for row in plan.get("rows", []):
      # Rows without a compiled program: a compile error, or the target compiler's refusal for
      # want of HBM (plan's does-not-fit rows): no bytes to compare with.
      if ("error" in row or "refused" in row or row.get("stage") != stage
          or (target and row.get("target") != target)
          or (not target and not str(row.get("compiler", "")).startswith("gpu"))):
        continue
      if abs(row["micro_batch_per_device"] - per_device_batch(r)) < 1e-9:
        out.append((name, r, row))
  return out


def _gib(x) -> str:
  return "-" if x is None else f"{x / GIB:.2f}"


def lines(matched: list[tuple[str, dict, dict]]) -> list[str]:
  head = ("| run | stage | per-device batch | plan: target, mesh | plan GiB (args + temps) | "
          "device compiler GiB (args + temps) | allocator peak GiB | device / plan |")
  out = [head, "|" + " --- |" * (head.count("|") - 1)]
  for name, r, row in matched:
    b = row["bytes_per_device"]
    m = r.get("compiled_memory") or {}
    total = m.get("total_bytes")
    out.append("| " + " | ".join([
        name, row["stage"], f"{per_device_batch(r):g}",
        f"{row['target']} {tuple(row['mesh'].values())}"
        + (f" {row['compiler_options']}" if row.get("compiler_options") else ""),
        f"{_gib(b['peak'])} ({_gib(b['arguments'])} + {_gib(b['temporaries'])})",
        f"{_gib(total)} ({_gib(m.get('argument_bytes'))} + {_gib(m.get('temp_bytes'))})"
        if m else "-",
        _gib(r.get("peak_memory_bytes")),
        f"{total / b['peak']:.2f}" if total and b["peak"] else "-"]) + " |")
  return out


def main(argv: list[str]) -> int:
  if len(argv) not in (3, 4):
    print(__doc__, file=sys.stderr)
    return 2
  results = table.load(Path(argv[1]))
  try:
    plan = json.loads(Path(argv[2]).read_text())
  except (OSError, ValueError) as e:
    print(f"vs_plan: cannot read the plan {argv[2]}: {e}", file=sys.stderr)
    return 1
  matched = pairs(results, plan, argv[3] if len(argv) == 4 else None)
  if not matched:
    print(f"vs_plan: no bench run in {argv[1]} has a row in {argv[2]} (same config, stage and "
          "micro-batch per device)", file=sys.stderr)
    return 1
  print("\n".join(lines(matched)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
