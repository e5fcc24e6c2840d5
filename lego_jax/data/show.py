"""`lego-jax show-data [--split=train --num=16 --out=PATH]`: a contact sheet of the records.

One row per example: input frame | target (action) frame | action text | enriched description,
read straight from the ArrayRecord files (what every later stage sees), written as a PNG
(default WORKDIR/show_data.png).
"""

from __future__ import annotations

import io
from pathlib import Path

from absl import flags
from PIL import Image, ImageDraw, ImageFont

from lego_jax.data import records
from lego_jax.errors import UserError
from lego_jax.data.pipeline import records_dir_of

# Listed by `lego-jax <command> --help` (lego_jax/cli.py): config sections read, shared flags.
CONFIG_SECTIONS = ("data",)
CLI_FLAGS = ("split", "out")


_NUM = flags.DEFINE_integer("num", 16, "show-data: how many examples")

CELL = 168          # image height in the sheet
ACTION_W = 230
DESC_W = 430
PAD = 10
HEADER_H = 30
BG, ROW_ALT, INK = (250, 250, 248), (238, 240, 244), (24, 24, 28)
GREY, ACCENT = (110, 110, 120), (30, 90, 170)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
  """Greedy word wrap by rendered width (the default font is not monospaced)."""
  lines: list[str] = []
  for para in text.split("\n"):
    line = ""
    for word in para.split():
      trial = f"{line} {word}".strip()
      if draw.textlength(trial, font=font) <= width or not line:
        line = trial
      else:
        lines.append(line)
        line = word
    lines.append(line)
  return lines


def _frame(data: bytes, height: int) -> Image.Image:
  img = Image.open(io.BytesIO(data)).convert("RGB")
  width = max(1, round(img.width * height / img.height))
  return img.resize((width, height), Image.Resampling.BICUBIC)


def contact_sheet(records_dir: str | Path, split: str = "train", num: int = 16) -> Image.Image:
  src = records.open_split(records_dir, split, records.PAIRS)
  num = min(num, len(src))
  if num < 1:
    raise ValueError(f"--num={num}: nothing to show")
  rows = [records.to_python(src[i]) for i in range(num)]
  frames = [(_frame(r["input_jpeg"], CELL), _frame(r["target_jpeg"], CELL)) for r in rows]
  img_w = max(max(a.width, b.width) for a, b in frames)
  font, small, bold = _font(15), _font(12), _font(16)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line_h = 19
  heights = []
  for r in rows:
    desc = _wrap(probe, r["description"] or "(no description)", font, DESC_W - 2 * PAD)
    heights.append(max(CELL + 28, len(desc) * line_h + 2 * PAD))
  width = 2 * (img_w + PAD) + ACTION_W + DESC_W + PAD
  sheet = Image.new("RGB", (width, HEADER_H + sum(heights) + PAD), BG)
  d = ImageDraw.Draw(sheet)
  cols = [PAD, 2 * PAD + img_w, 2 * (PAD + img_w) + PAD, 2 * (PAD + img_w) + PAD + ACTION_W]
  for x, title in zip(cols, ("input frame", "target (action) frame", "action", "description")):
    d.text((x, 8), title, fill=ACCENT, font=bold)
  y = HEADER_H
  for i, (r, (a, b), h) in enumerate(zip(rows, frames, heights)):
    if i % 2:
      d.rectangle([0, y, width, y + h], fill=ROW_ALT)
    top = y + PAD // 2
    sheet.paste(a, (cols[0], top))
    sheet.paste(b, (cols[1], top))
    d.text((cols[0], top + CELL + 2), f"{r['id']}  ({r['width']}x{r['height']})", fill=GREY,
           font=small)
    ty = top
    for line in _wrap(d, r["action"], bold, ACTION_W - 2 * PAD):
      d.text((cols[2], ty), line, fill=INK, font=bold)
      ty += line_h + 2
    if r["raw_action"] != r["action"]:
      ty += 4
      for line in _wrap(d, f"raw: {r['raw_action']}", small, ACTION_W - 2 * PAD):
        d.text((cols[2], ty), line, fill=GREY, font=small)
        ty += 15
    desc = _wrap(d, r["description"] or "(no description)", font, DESC_W - 2 * PAD)
    for k, line in enumerate(desc):
      d.text((cols[3], top + k * line_h), line, fill=INK if r["description"] else GREY, font=font)
    y += h
  return sheet


def main(cfg, workdir: Path) -> int:
  # --split and --out are shared by several commands and defined in lego_jax/cli.py.
  out = Path(flags.FLAGS.out) if flags.FLAGS.out else Path(workdir) / "show_data.png"
  split = flags.FLAGS.split or "train"
  try:
    sheet = contact_sheet(records_dir_of(cfg.data, workdir), split, _NUM.value)
  except ValueError as e:
    raise UserError(str(e)) from None
  out.parent.mkdir(parents=True, exist_ok=True)
  sheet.save(out)
  print(f"wrote {out} ({_NUM.value} examples of split {split!r})")
  return 0
