"""The paper's results table (Table 1 layout) for several runs, as Markdown and an HTML fragment.

Rows are methods or checkpoints; columns EgoVLP, EgoVLP+, CLIP, FID, PSNR, LPIPS (and BLIP-B,
BLIP-L when a run has them), scaled as in the paper (similarities and LPIPS x100; FID and PSNR as
they are). The paper's Ego4D rows can be shown beside a run; they are marked as quoted, not
measured.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# (metrics.json key, header, display scale, higher is better)
COLUMNS: tuple[tuple[str, str, float, bool], ...] = (
    ("egovlp", "EgoVLP", 100.0, True),
    ("egovlp_plus", "EgoVLP+", 100.0, True),
    ("clip", "CLIP", 100.0, True),
    ("fid", "FID", 1.0, False),
    ("psnr", "PSNR", 1.0, True),
    ("lpips", "LPIPS", 100.0, False),
)
# The release's caption scores (lego_jax/eval/blip.py), x100 like the similarities; shown only when
# some row has them (no paper numbers are quoted for them here).
OPTIONAL_COLUMNS: tuple[tuple[str, str, float, bool], ...] = (
    ("blip_b", "BLIP-B", 100.0, True),
    ("blip_l", "BLIP-L", 100.0, True),
)


def columns(rows: Sequence["Row"]) -> tuple[tuple[str, str, float, bool], ...]:
  """COLUMNS plus the optional ones some row has a number for."""
  return COLUMNS + tuple(c for c in OPTIONAL_COLUMNS
                         if any(isinstance(r.metrics.get(c[0]), (int, float)) for r in rows))

# Ego4D, the paper's Table 1, in metric units (x100 columns divided back).
PAPER_EGO4D: dict[str, dict[str, float]] = {
    "ProxEdit": dict(egovlp=.4451, egovlp_plus=.7268, clip=.6817, fid=33.01, psnr=11.88, lpips=.4090),
    "SDEdit": dict(egovlp=.5007, egovlp_plus=.7290, clip=.7335, fid=33.35, psnr=11.81, lpips=.4160),
    "InstructPix2Pix (fine-tuned)": dict(egovlp=.6219, egovlp_plus=.7884, clip=.7875, fid=24.73,
                                         psnr=12.16, lpips=.3716),
    "LEGO": dict(egovlp=.6565, egovlp_plus=.8044, clip=.8061, fid=23.83, psnr=12.29, lpips=.3643),
}
# The paper's ablation on Ego4D (EgoVLP / EgoVLP+ / CLIP only).
PAPER_EGO4D_ABLATION: dict[str, dict[str, float]] = {
    "action label only": dict(egovlp=.6219, egovlp_plus=.7884, clip=.7875),
    "enriched description": dict(egovlp=.6291, egovlp_plus=.7909, clip=.7918),
    "+ image embedding": dict(egovlp=.6535, egovlp_plus=.8013, clip=.8057),
    "+ text embedding": dict(egovlp=.6329, egovlp_plus=.7940, clip=.7921),
    "+ both (LEGO)": dict(egovlp=.6565, egovlp_plus=.8044, clip=.8061),
}


# Cells computed otherwise than the release computed the paper's column carry this mark.
VARIANT_MARK = "†"


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  metrics: Mapping[str, float]
  quoted: bool = False            # numbers from the paper, not measured here
  note: str = ""                  # e.g. the number of pairs, skipped metrics
  variants: Mapping[str, str] = dataclasses.field(default_factory=dict)  # column -> how it differs


def lpips_variant(settings: Mapping) -> str:
  """"" when a run's LPIPS is the release's ([0, 1] inputs, all_metrics_in_one.py), else how it
  differs. Runs written before the setting was recorded count as the [-1, 1] variant."""
  if settings.get("lpips_release_range", False):
    return ""
  return "LPIPS on [-1, 1] inputs (the lpips package's convention), not the release's [0, 1]"


def paper_rows(dataset: str = "ego4d", ablation: bool = False) -> list[Row]:
  """The paper's rows for `dataset` (only Ego4D numbers are known to this package)."""
  if not dataset.startswith("ego4d"):
    return []
  table = PAPER_EGO4D_ABLATION if ablation else PAPER_EGO4D
  suffix = " [paper ablation]" if ablation else " [paper]"
  return [Row(name + suffix, m, quoted=True) for name, m in table.items()]


def read_run(path: str | os.PathLike, name: str | None = None) -> Row:
  """A row from a metrics.json written by `lego-jax evaluate` (or the directory holding one)."""
  p = Path(path)
  if p.is_dir():
    p = p / "metrics.json"
  if not p.exists():
    raise FileNotFoundError(f"no metrics.json at {path}")
  data = json.loads(p.read_text())
  notes = []
  if data.get("num_pairs") is not None:
    notes.append(f"{data['num_pairs']} pairs")
  if data.get("skipped"):
    notes.append("skipped: " + ", ".join(sorted(data["skipped"])))
  variants = {}
  if "lpips" in data.get("metrics", {}):
    why = lpips_variant(data.get("settings", {}))
    if why:
      variants["lpips"] = why
      notes.append(f"{VARIANT_MARK} {why}")
  return Row(name or data.get("name") or p.parent.name, data.get("metrics", {}),
             note="; ".join(notes), variants=variants)


def parse_runs(spec: str) -> list[tuple[str | None, str]]:
  """"a=dir1,b=dir2,dir3" -> [("a", "dir1"), ("b", "dir2"), (None, "dir3")]."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    out.append((name, path) if sep else (None, item))
  return out


def _display(value, scale: float) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  if isinstance(value, float) and math.isinf(value):
    return "inf"
  return f"{value * scale:.2f}"


def _best(rows: Sequence[Row]) -> dict[str, float]:
  """Per column the best measured-or-quoted value (for bold)."""
  best = {}
  for key, _, _, higher in columns(rows):
    vals = [r.metrics[key] for r in rows if isinstance(r.metrics.get(key), (int, float))
            and math.isfinite(r.metrics[key])]
    if len(vals) > 1:
      best[key] = max(vals) if higher else min(vals)
  return best


def _header(cols=COLUMNS) -> list[str]:
  return ["method"] + [f"{h} {'↑' if hi else '↓'}" for _, h, _, hi in cols]


def markdown(rows: Sequence[Row], title: str = "") -> str:
  best, cols = _best(rows), columns(rows)
  lines = [f"### {title}", ""] if title else []
  lines.append("| " + " | ".join(_header(cols)) + " |")
  lines.append("| --- " + "| ---: " * len(cols) + "|")
  for r in rows:
    cells = [r.name.replace("|", "\\|")]
    for key, _, scale, _ in cols:
      text = _display(r.metrics.get(key), scale)
      text = f"**{text}**" if key in best and r.metrics.get(key) == best[key] else text
      cells.append(text + (VARIANT_MARK if key in r.variants else ""))
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  blip_note = ", BLIP scores" if len(cols) > len(COLUMNS) else ""
  lines.append(f"EgoVLP, EgoVLP+, CLIP{blip_note} and LPIPS x100. [paper] rows are quoted from the "
               "paper (Ego4D), not measured. LPIPS as the release computed it ([0, 1] inputs); "
               f"{VARIANT_MARK} marks a number computed otherwise (see the row's note).")
  notes = [f"- {r.name}: {r.note}" for r in rows if r.note]
  if notes:
    lines += [""] + notes
  return "\n".join(lines) + "\n"


def html_fragment(rows: Sequence[Row], title: str = "") -> str:
  """A self-contained <table> (inline styles only) that a report page can embed."""
  best, cols = _best(rows), columns(rows)
  e = html.escape
  out = ['<div class="lego-results">']
  if title:
    out.append(f"<h3>{e(title)}</h3>")
  out.append('<table style="border-collapse:collapse;font-family:sans-serif;font-size:14px">')
  th = 'style="border-bottom:2px solid #444;padding:4px 10px;text-align:{}"'
  out.append("<thead><tr>" + "".join(
      f"<th {th.format('left' if i == 0 else 'right')}>{e(h)}</th>"
      for i, h in enumerate(_header(cols))) + "</tr></thead><tbody>")
  for r in rows:
    style = "color:#777;font-style:italic" if r.quoted else ""
    cells = [f'<td style="padding:4px 10px;text-align:left" title="{e(r.note)}">{e(r.name)}</td>']
    for key, _, scale, _ in cols:
      text = e(_display(r.metrics.get(key), scale))
      if key in best and r.metrics.get(key) == best[key]:
        text = f"<b>{text}</b>"
      if key in r.variants:
        text += f'<span title="{e(r.variants[key])}">{VARIANT_MARK}</span>'
      cells.append(f'<td style="padding:4px 10px;text-align:right">{text}</td>')
    out.append(f'<tr style="{style}">' + "".join(cells) + "</tr>")
  out.append("</tbody></table>")
  out.append('<p style="font-size:12px;color:#555">EgoVLP, EgoVLP+, CLIP and LPIPS x100; '
             "grey rows are quoted from the paper (Ego4D), not measured. LPIPS as the release "
             f"computed it ([0, 1] inputs); {VARIANT_MARK} marks a number computed otherwise.</p>"
             "</div>")
  return "\n".join(out) + "\n"


def write_tables(rows: Sequence[Row], out_dir: str | os.PathLike, title: str = "") -> tuple[Path, Path]:
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  md, ht = out_dir / "results.md", out_dir / "results.html"
  for path, text in ((md, markdown(rows, title)), (ht, html_fragment(rows, title))):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
  return md, ht


def collect_runs(dirs: Iterable[str | os.PathLike]) -> list[Row]:
  """Rows for every `<dir>/*/metrics.json`, sorted by run name."""
  rows = []
  for d in dirs:
    for p in sorted(Path(d).glob("*/metrics.json")):
      rows.append(read_run(p))
  return rows
