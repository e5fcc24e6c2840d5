"""Does the VLLM learn to look? The table of `launch/vllm_looks.sh`.

The synthetic scenes (lego_jax/data/synthetic.py) say where the target object stands and which
hand acts only through the frame; the action text names neither. `lego-jax extract` scores each
run's descriptions against the scenes' metadata (WORKDIR/<run>/features/<split>/accuracy.json:
location, hand, object rates and the number of examples). This module puts the three runs side by
side: the untrained model, the trained one and the text-only one (image features zeroed), with
the chance levels of a model that guesses: location 1/3 (left, middle, right), hand 1/2.

    python -m lego_jax.eval.looks WORKDIR [--split=test] [--out=DIR] [--wall_s=SECONDS]

writes looks.md and looks.json (default in WORKDIR) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

# (sub-workdir of launch/vllm_looks.sh, row label)
RUNS: tuple[tuple[str, str], ...] = (
    ("untrained", "untrained (random init)"),
    ("trained", "trained"),
    ("text_only", "text-only (zero image)"),
)
RATES = ("location", "hand", "object", "exact")
# A guess among the scene's columns / hands; objects and exact descriptions have no fixed chance.
CHANCE = {"location": 1 / 3, "hand": 1 / 2}
LOOKED_AT = ("location", "hand")  # what only the image can tell


def accuracy_path(workdir: str | Path, run: str, split: str) -> Path:
  return Path(workdir) / run / "features" / split / "accuracy.json"


def read_accuracy(path: Path) -> dict:
  """One accuracy.json, checked: the rates the table needs and their example count."""
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: run `lego-jax extract` for that run first "
                            "(launch/vllm_looks.sh does)")
  acc = json.loads(path.read_text())
  missing = [k for k in ("location", "hand", "object", "num") if k not in acc]
  if missing:
    raise ValueError(f"{path} lacks {', '.join(missing)}: not an accuracy.json of `lego-jax "
                     "extract` on synthetic scenes")
  return acc


def compare(accuracies: Mapping[str, Mapping], split: str = "test") -> dict:
  """{run: accuracy.json contents} (keys of RUNS) -> the comparison: one row per run (label,
  rates, num), the chance levels, and per looked-at rate the trained model's margin over the
  better of the two controls (positive: it names it more often than either)."""
  unknown = sorted(set(accuracies) - {r for r, _ in RUNS})
  if unknown:
    raise ValueError(f"unknown runs {unknown}: expected some of {[r for r, _ in RUNS]}")
  rows = []
  for run, label in RUNS:
    if run in accuracies:
      acc = accuracies[run]
      rows.append({"run": run, "label": label, "num": int(acc["num"]),
                   **{k: float(acc[k]) for k in RATES if k in acc}})
  out = {"split": split, "rows": rows, "chance": dict(CHANCE)}
  by_run = {r["run"]: r for r in rows}
  controls = [by_run[r] for r in ("untrained", "text_only") if r in by_run]
  if "trained" in by_run and controls:
    out["trained_margin"] = {k: by_run["trained"][k] - max(c[k] for c in controls)
                             for k in LOOKED_AT}
  return out


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def markdown(comparison: Mapping, wall_s: float | None = None) -> str:
  """The comparison as a Markdown table (rates in percent) with the chance row and the margin."""
  rows = comparison["rows"]
  header = "| model | location | hand | object | exact | examples |"
  split = comparison["split"]
  seen = "training" if split == "train" else "held-out"
  lines = [f"Descriptions of the {seen} `{split}` split naming the right ...", "", header,
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['label']} | " + " | ".join(_pct(r.get(k)) for k in RATES)
                 + f" | {r['num']} |")
  chance = comparison["chance"]
  lines.append("| chance | " + " | ".join(_pct(chance.get(k)) for k in RATES) + " | |")
  margin = comparison.get("trained_margin")
  if margin:
    lines += ["", "trained minus the better control: " + ", ".join(
        f"{k} {100 * v:+.1f} points" for k, v in margin.items())]
  if wall_s is not None:
    lines += ["", f"wall time: {wall_s / 60:.1f} min"]
  return "\n".join(lines) + "\n"


def build(workdir: str | Path, split: str = "test", runs: Sequence[str] | None = None,
          out: str | Path | None = None, wall_s: float | None = None) -> tuple[dict, str]:
  """Reads WORKDIR/<run>/features/<split>/accuracy.json of every run, writes looks.json and
  looks.md to `out` (default WORKDIR); returns (comparison, markdown)."""
  runs = list(runs or [r for r, _ in RUNS])
  comparison = compare({r: read_accuracy(accuracy_path(workdir, r, split)) for r in runs}, split)
  if wall_s is not None:
    comparison["wall_s"] = float(wall_s)
  text = markdown(comparison, wall_s)
  out = Path(out or workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "looks.json").write_text(json.dumps(comparison, indent=1) + "\n")
  (out / "looks.md").write_text(text)
  return comparison, text


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m lego_jax.eval.looks",
      description="compare the untrained, trained and text-only VLLM runs of launch/vllm_looks.sh")
  parser.add_argument("workdir", help="the WORKDIR of launch/vllm_looks.sh")
  parser.add_argument("--split", default="test", help="which split's accuracy.json (test)")
  parser.add_argument("--out", default=None, help="where looks.md / looks.json go (WORKDIR)")
  parser.add_argument("--wall_s", type=float, default=None, help="wall time to record, seconds")
  args = parser.parse_args(argv)
  try:
    _, text = build(args.workdir, args.split, out=args.out, wall_s=args.wall_s)
  except (FileNotFoundError, ValueError) as e:
    print(f"looks: error: {e}", file=sys.stderr)
    return 2
  print(text, end="")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
