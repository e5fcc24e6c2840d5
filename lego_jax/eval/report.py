"""The demo's report: one self-contained HTML page (images as relative PNG paths beside it), loss
curves drawn with PIL (no plotting library needed), and a PNG grid of examples.

`write_html(path, data)` takes the dict `lego_jax.demo.report_data` assembles: metrics per method,
the example rows (image paths relative to the page, action, descriptions), plot paths, timings.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _font(size: int):
  return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round numbers (1, 2, 5 x 10^k steps) covering [lo, hi]."""
  if not hi > lo:
    return [lo]
  raw = (hi - lo) / max(count - 1, 1)
  mag = 10 ** math.floor(math.log10(raw))

  def ticks(step: float) -> list[float]:
    out, v = [], math.ceil(lo / step - 1e-9) * step
    while v <= hi + 1e-9 * step:
      out.append(round(v, 12))
      v += step
    return out

  # The round step whose tick count comes closest to `count` (the larger step on a tie): the
  # first step >= raw can leave a single tick when the range starts off a round number.
  candidates = [ticks(m * mag) for m in (10, 5, 2, 1)]
  return min(candidates, key=lambda t: abs(len(t) - count))


def _log_ticks(lo: float, hi: float) -> list[float]:
  """Powers of ten in [lo, hi], with 2x and 5x when fewer than three fit."""
  out = []
  for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
    for m in ((1,) if math.log10(hi / lo) > 2 else (1, 2, 5)):
      v = m * 10.0 ** e
      if lo <= v <= hi:
        out.append(v)
  return out or [lo, hi]


def _fmt_tick(v: float) -> str:
  return f"{v:.4g}"


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
              title: str, xlabel: str, ylabel: str, log_y: bool = False,
              size: tuple[int, int] = (640, 360)) -> Path:
  """One PNG line chart: {label: (xs, ys)}; a legend when there are several series. Non-finite
  (and, on a log axis, non-positive) values are left out."""
  w, h = size
  left, right, top, bottom = 70, 20, 36, 48
  img = Image.new("RGB", size, "white")
  d = ImageDraw.Draw(img)
  clean = {}
  for label, (xs, ys) in series.items():
    pts = [(float(x), float(y)) for x, y in zip(xs, ys)
           if math.isfinite(y) and (y > 0 or not log_y)]
    if pts:
      clean[label] = pts
  d.text((w / 2, 8), title, fill="black", font=_font(15), anchor="mt")
  if not clean:
    d.text((w / 2, h / 2), "no data", fill="gray", font=_font(14), anchor="mm")
    img.save(path)
    return Path(path)
  xs = [x for pts in clean.values() for x, _ in pts]
  ys = [y for pts in clean.values() for _, y in pts]
  x0, x1 = min(xs), max(xs)
  if x1 == x0:
    x0, x1 = x0 - 1, x1 + 1
  fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
  y0, y1 = fy(min(ys)), fy(max(ys))
  if y1 == y0:
    y0, y1 = y0 - 0.5, y1 + 0.5
  pad = 0.05 * (y1 - y0)
  y0, y1 = y0 - pad, y1 + pad
  px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
  py = lambda y: top + (1 - (fy(y) - y0) / (y1 - y0)) * (h - top - bottom)
  small = _font(11)
  d.rectangle([left, top, w - right, h - bottom], outline="black")
  for t in nice_ticks(x0, x1):
    d.line([(px(t), h - bottom), (px(t), h - bottom + 4)], fill="black")
    d.text((px(t), h - bottom + 6), _fmt_tick(t), fill="black", font=small, anchor="mt")
  yticks = _log_ticks(10 ** y0, 10 ** y1) if log_y else nice_ticks(y0, y1)
  for t in yticks:
    y = py(t)
    d.line([(left + 1, y), (w - right - 1, y)], fill=(228, 228, 228))
    d.line([(left - 4, y), (left, y)], fill="black")
    d.text((left - 6, y), _fmt_tick(t), fill="black", font=small, anchor="rm")
  d.text(((left + w - right) / 2, h - 16), xlabel, fill="black", font=_font(12), anchor="mm")
  d.text((12, (top + h - bottom) / 2), ylabel + (" (log)" if log_y else ""), fill="black",
         font=_font(12), anchor="lm")
  for k, (label, pts) in enumerate(clean.items()):
    colour = PALETTE[k % len(PALETTE)]
    line = [(px(x), py(y)) for x, y in pts]
    if len(line) > 1:
      d.line(line, fill=colour, width=2)
    for x, y in line if len(line) < 40 else line[-1:]:
      d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    if len(clean) > 1:
      ly = top + 8 + 16 * k
      d.line([(w - right - 150, ly), (w - right - 130, ly)], fill=colour, width=3)
      d.text((w - right - 125, ly), label, fill="black", font=small, anchor="lm")
  img.save(path)
  return Path(path)


def example_grid_png(rows: Sequence[Sequence[Path]], captions: Sequence[str],
                     headers: Sequence[str], path: str | Path, cell: int = 128,
                     upscale: int | None = None) -> Path:
  """Rows of image files (each scaled to cell x cell, nearest: small frames stay sharp) under a
  header row, each row captioned (cut to the grid's width). With `upscale`, the cell is that
  multiple of the first frame's width instead (64-px frames are too small to judge at 1x)."""
  if upscale and rows and rows[0]:
    with Image.open(rows[0][0]) as im:
      cell = im.width * upscale
  cols = max((len(r) for r in rows), default=len(headers))
  head, cap = 22, 20
  img = Image.new("RGB", (cols * cell, head + len(rows) * (cell + cap)), "white")
  d = ImageDraw.Draw(img)
  font = _font(13)

  def fit(text: str) -> str:
    while text and d.textlength(text, font=font) > cols * cell - 8:
      text = text[:max(0, min(len(text) - 2, int(len(text) * 0.9)))]
    return text
  for c, name in enumerate(headers):
    d.text((c * cell + cell / 2, head / 2), name, fill="black", font=font, anchor="mm")
  for r, (files, caption) in enumerate(zip(rows, captions)):
    y = head + r * (cell + cap)
    for c, f in enumerate(files):
      with Image.open(f) as im:
        img.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (c * cell, y))
    d.text((4, y + cell + cap / 2), fit(caption), fill="black", font=font, anchor="lm")
  img.save(path)
  return Path(path)


# ---------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1320px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.win { background: #e3f4e1; } td.loss { background: #fbe3e1; }
img.frame { width: 256px; height: 256px; image-rendering: pixelated; display: block; }
.caption { max-width: 256px; font-size: 0.85em; margin-top: 3px; }
.split { display: inline-block; font-size: 0.8em; font-weight: bold; padding: 1px 6px;
         border-radius: 3px; margin-bottom: 4px; }
.split.seen { background: #dde8f6; color: #1f4e8c; }
.split.held-out { background: #fde7c8; color: #8a4b00; }
.small { font-size: 0.88em; color: #555; }
.plots img { max-width: 100%; margin: 0.3em 0; border: 1px solid #ddd; }
"""


def _e(text) -> str:
  return html.escape(str(text))


def _num(v, digits: int = 3) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return f"{v:.{digits}f}"


def _se(v) -> str:
  """' ± SE' in small print, nothing when there is no standard error."""
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return ""
  return f"<span class='small'> ± {v:.3f}</span>"


def outcome(diff: float, higher_better: bool) -> str:
  """'wins' / 'loses' / 'ties' for LEGO minus a baseline."""
  if diff == 0:
    return "ties"
  return "wins" if (diff > 0) == higher_better else "loses"


def comparison_sentences(metrics: dict, headline: Mapping[str, tuple[str, bool, str]],
                         methods: Mapping[str, str]) -> list[str]:
  """One sentence per baseline and headline metric, with both values and the difference."""
  out = []
  m = metrics["methods"]
  for base in ("copy_input", "action_label"):
    parts = []
    for key, (label, higher, unit) in headline.items():
      a, b = m["lego"].get(key), m[base].get(key)
      if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        continue
      diff = a - b
      u = f" {unit}" if unit else ""
      parts.append(f"{label}: {outcome(diff, higher)} by {abs(diff):.3f}{u} "
                   f"({a:.3f} vs {b:.3f})")
    if parts:
      out.append(f"<b>LEGO vs {_e(methods[base])}</b> — " + "; ".join(_e(p) for p in parts) + ".")
  return out


def _metrics_table(metrics: dict, headline, methods) -> str:
  m = metrics["methods"]
  names = [k for k in methods if k in m]
  rows = ["<tr><th>metric</th>" + "".join(f"<th>{_e(methods[n])}</th>" for n in names)
          + "<th>LEGO − label only</th><th>LEGO − copy input</th><th>examples</th></tr>"]
  for key, (label, higher, unit) in headline.items():
    if not any(key in m[n] for n in names):
      continue
    arrow = "↑" if higher else "↓"
    cells = "".join(f'<td class="num">{_num(m[n].get(key))}{_se(m[n].get(key + "_se"))}</td>'
                    for n in names)
    for base in ("action_label", "copy_input"):
      a, b = m["lego"].get(key), m.get(base, {}).get(key)
      if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        cells += '<td class="num">n/a</td>'
      else:
        cls = {"wins": "win", "loses": "loss", "ties": ""}[outcome(a - b, higher)]
        cells += f'<td class="num {cls}">{a - b:+.3f}</td>'
    count = m["lego"].get(f"{key}_count", metrics.get("num_test"))
    u = f" ({unit})" if unit else ""
    rows.append(f"<tr><td>{_e(label)}{_e(u)} {arrow}</td>{cells}"
                f'<td class="num">{_e(count)}</td></tr>')
  return "<table>" + "\n".join(rows) + "</table>"


def _combination_table(split: dict, headline) -> str:
  """LEGO vs the label-only LDM on the seen and the held-out verb-kind combinations."""
  groups = [g for g in ("seen", "held_out") if g in split]
  head = "".join(f"<th colspan='3'>{_e(g.replace('_', '-'))} combinations "
                 f"({_e(split[g]['num_test'])} frames)</th>" for g in groups)
  sub = "".join("<th>LEGO</th><th>label only</th><th>LEGO − label only</th>" for _ in groups)
  rows = [f"<tr><th rowspan='2'>metric</th>{head}</tr>", f"<tr>{sub}</tr>"]
  for key, (label, higher, unit) in headline.items():
    if not any(key in split[g]["methods"].get("lego", {}) for g in groups):
      continue
    cells = ""
    for g in groups:
      m, d = split[g]["methods"], split[g]["lego_minus_action_label"]
      for n in ("lego", "action_label"):
        cells += f'<td class="num">{_num(m.get(n, {}).get(key))}{_se(m.get(n, {}).get(key + "_se"))}</td>'
      diff = d.get(key)
      ok = diff is not None and math.isfinite(diff)
      cls = {"wins": "win", "loses": "loss", "ties": ""}[outcome(diff, higher)] if ok else ""
      cells += (f'<td class="num {cls}">{diff:+.3f}{_se(d.get(key + "_se"))}</td>' if ok
                else '<td class="num">n/a</td>')
    u = f" ({unit})" if unit else ""
    rows.append(f"<tr><td>{_e(label)}{_e(u)} {'↑' if higher else '↓'}</td>{cells}</tr>")
  facts = []
  for g in groups:
    st = split[g].get("vllm_states", {})
    facts.append(f"{g.replace('_', '-')}: hand {_num(st.get('hand'))} of {st.get('hand_count', 0)}, "
                 f"destination {_num(st.get('destination'))} of {st.get('destination_count', 0)}")
  rows.append(f"<tr><td colspan='{1 + 3 * len(groups)}' class='small'>How often the VLLM's "
              f"description states the ground truth's hand and destination — {_e('; '.join(facts))}"
              "</td></tr>")
  held = ", ".join(split.get("held_out", {}).get("combinations", []))
  return ("<h3>Seen and held-out combinations</h3><p>The LDM's training pairs never showed the "
          f"held-out verb-kind combinations ({_e(held)}); the VLLM's instruction data covers "
          "every combination, and only the descriptions say which hand acts and where a picked-up "
          "object goes. LEGO ahead on the held-out combinations is the paper's claim. "
          "± one standard error; the differences are paired per frame.</p><table>"
          + "\n".join(rows) + "</table>")


def _frame_style(page_dir: Path | None, src: str, upscale: int) -> str:
  """The frame's size on the page: `upscale` x its own, drawn nearest (CSS pixelated), so a
  64-px frame shows as 256 px of sharp pixels; the CSS default when the file cannot be read."""
  if page_dir is None:
    return ""
  try:
    with Image.open(page_dir / src) as im:
      w, h = im.size
  except OSError:
    return ""
  return f' style="width:{w * upscale}px;height:{h * upscale}px"'


SPLIT_LABELS = {"seen": "seen combination", "held-out": "held-out combination"}


def _examples_table(data: dict, page_dir: Path | None = None) -> str:
  """One row per example: the frames at `upscale` (4x) nearest, the VLLM's description under
  the LEGO frame and the ground truth's under the ground-truth frame, the action, and whether
  the example's verb-kind combination was among the LDM's training pairs (row["split"]:
  "seen" / "held-out", marked when the data has held-out combinations)."""
  columns = data["columns"]
  upscale = int(data.get("upscale", 4))
  under = {data.get("described_column", "LEGO"): ("description", "the VLLM: "),
           data.get("reference_column", "ground truth"): ("reference_description",
                                                          "ground truth: ")}
  head = "".join(f"<th>{_e(c)}</th>" for c in columns)
  rows = [f"<tr>{head}<th>action</th></tr>"]
  for r in data["rows"]:
    cells = []
    for p, c in zip(r["images"], columns):
      key, prefix = under.get(c, (None, ""))
      caption = (f"<div class='caption'>{_e(prefix)}{_e(r[key])}</div>"
                 if key and r.get(key) else "")
      cells.append(f'<td><img class="frame" src="{_e(p)}" alt="{_e(c)}"'
                   f'{_frame_style(page_dir, p, upscale)}>{caption}</td>')
    split = r.get("split")
    badge = (f"<div class='split {_e(split)}'>{_e(SPLIT_LABELS[split])}</div>"
             if split in SPLIT_LABELS else "")
    rows.append(f"<tr class='example'>{''.join(cells)}<td>{badge}{_e(r['action'])}"
                f"<div class='small'>{_e(r['id'])}</div></td></tr>")
  return "<table class='examples'>" + "\n".join(rows) + "</table>"


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
  return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def write_html(path: str | Path, data: dict) -> Path:
  """The report page; image paths in `data` are relative to `path`'s directory."""
  metrics = data["metrics"]
  methods, headline = data["methods"], data["headline"]
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(data['title'])}</title>"
           f"<style>{_CSS}</style></head><body><h1>{_e(data['title'])}</h1>"]
  sizes = data.get("sizes", {})
  steps = metrics.get("steps", {})
  parts.append(
      f"<p>One command ran the whole pipeline on config <code>{_e(data['config_name'])}</code>: "
      "synthetic egocentric scenes → ArrayRecord → train the VAE → instruction-tune the VLLM → "
      "extract its descriptions and H_i / H_t → train the latent diffusion model (LEGO) and, "
      "for comparison, the same model conditioned on the action label only → generate the "
      f"held-out test frames ({_e(metrics.get('num_test'))}) → score. "
      f"Steps: VAE {_e(steps.get('vae'))}, VLLM {_e(steps.get('vllm'))}, LDM "
      f"{_e(steps.get('ldm'))} each, sampler {_e(steps.get('sampler'))}; demo scale "
      f"{_e(metrics.get('scale'))}. Frames {_e(sizes.get('image'))} px, UNet widths "
      f"{_e(sizes.get('unet'))}, LLaMA {_e(sizes.get('llama'))}, "
      f"{_e(sizes.get('train_examples'))} training pairs.</p>")
  parts.append("<h2>Did the model learn the action?</h2>")
  parts.append(_metrics_table(metrics, headline, methods))
  parts.append("<p class='small'>↑ higher is better, ↓ lower is better; green: LEGO better, red: "
               "LEGO worse; ± one standard error of the mean over the held-out frames. ‘examples’: held-out frames where the score is defined (the "
               "placement scores need the ground truth to add at least a few pixels of the "
               "hand's or the object's colour).</p>")
  parts.append("<ul>" + "".join(f"<li>{s}</li>" for s in
                                comparison_sentences(metrics, headline, methods)) + "</ul>")
  parts.append(
      "<p>Whole-frame PSNR favours copying the input frame: the action changes only a small "
      "part of the frame (the mask), and a copy gets every other pixel exactly right, while a "
      "generated frame passes through the VAE and the sampler everywhere. The scores inside the "
      "action region, and where the hand and the moved object end up, are the ones copying "
      "cannot win.</p>")
  if metrics.get("by_combination"):
    parts.append(_combination_table(metrics["by_combination"], headline))
  shipped = metrics.get("shipped") or {}   # lego_jax/demo.py's second block of rows
  if shipped.get("methods"):
    parts.append("<h2>The shipped checkpoints on the same held-out frames</h2>"
                 f"<p>{_e(shipped.get('note', ''))}</p>" + _metrics_table(shipped, headline, methods))
    if shipped.get("by_combination"):
      parts.append(_combination_table(shipped["by_combination"], headline)
                   .replace("<h3>Seen and held-out combinations</h3>",
                            "<h3>Seen and held-out combinations (shipped checkpoints)</h3>"))
    if shipped.get("grid"):
      parts.append(f"<p><img src='{_e(shipped['grid'])}' alt='shipped checkpoints: examples'></p>")
  elif shipped.get("skipped"):
    parts.append(f"<p class='small'>Shipped checkpoints not scored: {_e(shipped['skipped'])}</p>")
  if metrics.get("skipped"):
    parts.append("<h3>Skipped</h3><ul>" + "".join(
        f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in metrics["skipped"].items()) + "</ul>")
  parts.append("<h2>Held-out examples</h2>")
  if data["plots"].get("examples"):
    parts.append(f"<p class='small'>Also as one PNG: <a href='{_e(data['plots']['examples'])}'>"
                 f"{_e(data['plots']['examples'])}</a>.</p>")
  parts.append(_examples_table(data, Path(path).parent))
  curves = [(k, v) for k, v in data["plots"].items() if k != "examples"]
  if curves:
    parts.append("<h2>Loss curves</h2><div class='plots'>" + "".join(
        f"<img src='{_e(v)}' alt='{_e(k)} loss'>" for k, v in curves) + "</div>")
  parts.append("<h2>Stage results</h2>")
  desc = metrics.get("descriptions") or {}
  if desc:
    rows = ["<tr><th>split</th><th>right location</th><th>right hand</th><th>right object</th>"
            "<th>exactly the ground truth</th><th>examples</th></tr>"]
    for split, a in desc.items():
      rows.append(f"<tr><td>{_e(split)}</td>" + "".join(
          f'<td class="num">{_num(a.get(k), 3)}</td>' for k in ("location", "hand", "object",
                                                                "exact"))
                  + f'<td class="num">{_e(a.get("num"))}</td></tr>')
    parts.append("<p>How often the VLLM's descriptions name the scene's facts (lego-jax extract):"
                 "</p><table>" + "".join(rows) + "</table>")
  kv = []
  vae = metrics.get("vae_check") or {}
  if "val_psnr_db" in vae:
    kv.append(("VAE reconstruction PSNR (val)", f"{vae['val_psnr_db']:.2f} dB"))
  for k, v in (metrics.get("final_losses") or {}).items():
    kv.append((f"final loss, {k}", _num(v, 4)))
  if kv:
    parts.append(_kv_table(kv))
  parts.append(f"<p>{_e(metrics.get('encoders', ''))}</p>")
  timings = metrics.get("timings") or {}
  if timings:
    rows = ["<tr><th>stage</th><th>wall s</th><th>CPU s</th></tr>"]
    rows += [f"<tr><td>{_e(k)}</td><td class='num'>{v['wall_s']:.0f}</td>"
             f"<td class='num'>{v['cpu_s']:.0f}</td></tr>" for k, v in timings.items()]
    total = metrics.get("total")
    if total:
      rows.append(f"<tr><th>total</th><th class='num'>{total['wall_s']:.0f}</th>"
                  f"<th class='num'>{total['cpu_s']:.0f}</th></tr>")
    parts.append("<h2>Time</h2><table>" + "".join(rows) + "</table><p class='small'>CPU: this "
                 "process's threads plus its finished child processes (data-loader workers).</p>")
  parts.append(
      "<h2>What the scores mean</h2><ul class='small'>"
      "<li><b>PSNR in the action region</b>: PSNR (data range 1) over the pixels the action "
      "changes (the generator's mask), generated vs ground-truth action frame.</li>"
      "<li><b>placement IoU</b>: pixels that have the hand's skin colour or the acted-on object's "
      "colour (brightness-invariant match) and differ from the input frame are the ‘new’ hand "
      "and object pixels; IoU of the generated frame's with the ground truth's.</li>"
      "<li><b>hand centroid</b>: distance between the centroids of the new hand pixels, in frame "
      "widths (√2 when the generated frame has none); ‘within 1/8 frame’ is the share of "
      "examples closer than 0.125.</li>"
      "<li><b>LPIPS</b> needs the AlexNet/VGG/SqueezeNet backbone weights "
      "(cfg.eval.weights_dir); without them it is listed as skipped.</li></ul>")
  parts.append("</body></html>")
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("\n".join(parts), encoding="utf-8")
  os.replace(tmp, path)
  return path
