"""Synthetic egocentric table-top scenes in the LEGO release's file formats (the embedded default).

A first-person view of a work surface with 2-4 objects (the `objects` setting; 7 kinds x 6
colours at 3 column locations, near or far), hands resting at the bottom edge. One scene (a
"clip") carries one or two actions; each action gives
  input frame    the scene;
  action prompt  "pick up the red cup" (half of them written as Ego4D narrations, "#C C picks up
                 the red cup", so the converter's normalisation is exercised);
  description    what the frame shows about HOW the action is done: location, which hand (the
                 side of the object, or in the middle the side its handle points to), the grip
                 (a cup is held "by its handle" only when the handle faces that hand);
  target frame   the action happening: the hand holding the lifted object, the carrot cut in two,
                 the drawer pulled open, a spoon stirring, the sponge wiping a wet streak;
  action mask    the pixels the action changes (PNG), and a metadata dict (target kind, colour
                 and its RGB, bbox in input and target, hand side, RGB and bbox, location).
Nothing but the image tells where the object is or which way its handle points, so a model must
look at the frame to write the description or draw the target.

The held-out-combinations world (`Options`; every option off by default, and then the files are
byte for byte what they were before the options existed). It tests the paper's claim where the
paper makes it: the VLLM brings knowledge (how an action is done, learned from instruction data)
that the diffusion model's training pairs do not teach.
  combination_rules  the effect depends on facts only the description states: each verb-kind
                     combination ("stir bowl") has its own hand (RULES), and "pick up" carries
                     the object to its combination's destination ("... lifting it off the table
                     to put it down on the left side of the table"). The frame does not show
                     them and no other combination implies them (the hands of one kind's verbs
                     differ), so a model that never saw a combination's pairs can only guess.
  holdout            combinations ("stir bowl", ...) kept out of the train and val pairs; the
                     test split keeps them. Every record's meta then says its "combination" and
                     whether it was "combination_seen" in training pairs.
  num_instruction    extra scenes for the VLLM only (llava_train.json: frame, action,
                     description, no target frame), cycling through EVERY combination, held-out
                     ones included: clips synth_instruct_*.
  hand_swap          the fraction of TRAIN pairs done against the rule: the other hand, and
                     for "pick up" another destination, which their descriptions state. Then the
                     action label alone does not fix the effect in the LDM's pairs (the issue's
                     "facts the descriptions state and the label does not"), so an LDM that
                     draws the right hand must read the description. The val and test pairs and
                     the instruction frames keep the rules, and the swapped pairs' conversations
                     are left out of llava_train.json: the VLLM learns how an action is properly
                     done, and no frame shows a swap, so no VLLM could predict one. Drawn from a
                     stream of its own: the other pairs are those of hand_swap=0.
  push               (needs combination_rules) every kind but the drawer can also be pushed along
                     the table to its combination's destination ("push the red pan"), so the
                     LDM's pairs show every kind carried somewhere, also the kinds whose pick-up
                     is held out (docs/experiments/heldout-combinations.md, Run 7).
  balance_poses      (acts on hand_swap's pairs; without them it changes nothing) a swapped
                     "pick up" is done in any (hand, destination) pose but its rule's, drawn
                     with weight 1 / (1 + the number of held-in pick-up rules with that pose),
                     instead of the other hand and one of the two other destinations. The rules of the held-in pick-ups use the crossing and middle
                     poses, so without it the same-side poses (the left hand lifting to the left,
                     the right to the right: the held-out pick-ups' rules) come only from a few
                     swaps, ~1.5% of the pairs; with it every pose is about as common. The
                     held-out test then asks the LDM to compose a seen pose with a kind, not to
                     draw a pose it has barely seen (docs/experiments/heldout-combinations.md,
                     Run 8). Only swapped pick-ups change: the other pairs are those without it.

Written like the real release so the real converters run on it:
  frames/<clip>/<action>/<frame>.jpg (+ mask.png), lego_<split>.json
  {clip: {action: {image_0, image_1, action, llava_forecast_finetune}}}, llava_<split>.json
  (LLaVA conversations), metadata.json
  {clip: {height, width, fps, actions: {action: {mask, meta}}}}.
Everything is a pure function of (seed, split, scene index): same seed -> same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lego_jax.data import images
from lego_jax.data.prompts import human_turn

SPLITS = ("train", "val", "test")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 38, 38), "orange": (240, 128, 24), "yellow": (238, 206, 40),
    "green": (46, 158, 72), "blue": (44, 92, 206), "purple": (132, 58, 176),
}
# kind -> verbs it affords; every verb has a distinct look in the target frame.
VERBS: dict[str, tuple[str, ...]] = {
    "cup": ("pick up",), "bowl": ("pick up", "stir"), "knife": ("pick up",),
    "carrot": ("pick up", "cut"), "pan": ("pick up", "stir"), "sponge": ("pick up", "wipe"),
    "drawer": ("open",),
}
KINDS = tuple(VERBS)
KIND_COLOURS = {"carrot": ("orange", "yellow", "purple", "red")}  # carrots come in these
HANDLED = ("cup", "pan", "knife")  # kinds drawn with a handle pointing left or right
LOCATIONS = ("left", "middle", "right")
COLUMN_X = (0.2, 0.5, 0.8)
ROW_Y = (0.47, 0.67)  # base line of far / near objects
ROW_SCALE = (0.84, 1.0)
HORIZON = 0.3
SKIN = ((224, 172, 138), (198, 140, 102), (160, 106, 72), (236, 190, 160))
SLEEVES = ((70, 70, 78), (225, 225, 220), (40, 40, 44), (150, 150, 160), (118, 96, 74))
NARRATED = {"pick up": "picks up", "cut": "cuts", "open": "opens", "stir": "stirs",
            "wipe": "wipes", "push": "pushes"}
COMBINATIONS = tuple(f"{v} {k}" for k, verbs in VERBS.items() for v in verbs)  # "pick up cup"
PUSHED = tuple(k for k in KINDS if k != "drawer")  # Options.push: the kinds that slide
PUSH_COMBINATIONS = tuple(f"push {k}" for k in PUSHED)
# combination -> (hand, where "pick up" puts the object down) under Options.combination_rules.
# Written so that no other combination gives a combination's rule away: each kind's verbs use
# different hands, and each verb's kinds are split between the hands and destinations.
RULES: dict[str, tuple[str, str | None]] = {
    "pick up cup": ("left", "right"), "pick up bowl": ("right", "left"),
    "pick up knife": ("left", "middle"), "pick up carrot": ("right", "right"),
    "pick up pan": ("left", "left"), "pick up sponge": ("right", "middle"),
    "stir bowl": ("left", None), "stir pan": ("right", None), "cut carrot": ("left", None),
    "wipe sponge": ("left", None), "open drawer": ("right", None),
    # Options.push. The kinds whose pick-up or stir the demo holds out push with the other hand
    # than that combination's (and pans / carrots to another destination), so their pushes do not
    # give the held-out rules away.
    "push cup": ("right", "left"), "push bowl": ("right", "middle"),
    "push knife": ("right", "right"), "push carrot": ("left", "middle"),
    "push pan": ("right", "right"), "push sponge": ("left", "left"),
}


@dataclasses.dataclass
class Obj:
  kind: str
  colour: str
  column: int
  row: int
  x: float          # centre x (fraction of width)
  y: float          # base line y (fraction of height)
  scale: float      # object size (fraction of width)
  facing: int       # -1: handle / carrot top / blade on the left, +1 on the right

  @property
  def location(self) -> str:
    return LOCATIONS[self.column]

  @property
  def rgb(self) -> tuple[int, int, int]:
    return COLOURS[self.colour]


@dataclasses.dataclass
class Scene:
  objects: list[Obj]
  table: tuple[int, int, int]
  wall: tuple[int, int, int]
  skin: tuple[int, int, int]
  sleeve: tuple[int, int, int]
  resting: tuple[bool, bool]  # left / right hand visible at the bottom edge in the input
  brightness: float
  noise_seed: int


@dataclasses.dataclass
class Action:
  verb: str
  target: int       # index into scene.objects
  hand: str         # "left" / "right"
  narrated: bool    # written as an Ego4D narration
  destination: str | None = None  # "pick up" under combination rules: where it is put down


@dataclasses.dataclass(frozen=True)
class Options:
  """The held-out-combinations world (module doc); the defaults are the plain world."""
  combination_rules: bool = False
  holdout: tuple[str, ...] = ()
  num_instruction: int = 0
  hand_swap: float = 0.0
  push: bool = False
  balance_poses: bool = False

  def __post_init__(self):
    combos = combinations(self)
    unknown = [c for c in self.holdout if c not in combos]
    if unknown:
      raise ValueError(f"holdout combination {unknown[0]!r} is not one of {combos}")
    if len(set(self.holdout)) == len(combos):
      raise ValueError("holdout lists every combination: no training pair would be left")
    if self.num_instruction < 0:
      raise ValueError(f"num_instruction={self.num_instruction} must be >= 0")
    if not 0.0 <= self.hand_swap <= 1.0:
      raise ValueError(f"hand_swap={self.hand_swap} must be in [0, 1]")
    if self.hand_swap and not self.combination_rules:
      raise ValueError("hand_swap needs combination_rules (it swaps against the rules)")
    if self.push and not self.combination_rules:
      raise ValueError("push needs combination_rules (they say where each kind is pushed)")

  def stamp(self) -> dict:
    """The settings that differ from the plain world (what write_release's stamp records)."""
    out: dict = {}
    if self.combination_rules:
      out["combination_rules"] = True
    if self.holdout:
      out["holdout"] = sorted(self.holdout)
    if self.num_instruction:
      out["num_instruction"] = int(self.num_instruction)
    if self.hand_swap:
      out["hand_swap"] = float(self.hand_swap)
    if self.push:
      out["push"] = True
    if self.balance_poses and self.hand_swap:  # without swaps it changes nothing
      out["balance_poses"] = True
    return out


def combinations(options: Options) -> tuple[str, ...]:
  """Every verb-kind combination of the world `options` make."""
  return COMBINATIONS + (PUSH_COMBINATIONS if options.push else ())


def verbs_of(kind: str, options: Options) -> tuple[str, ...]:
  return VERBS[kind] + (("push",) if options.push and kind in PUSHED else ())


def combination(verb: str, o: "Obj") -> str:
  return f"{verb} {o.kind}"


@dataclasses.dataclass
class Example:
  input: np.ndarray    # (S, S, 3) uint8
  target: np.ndarray   # (S, S, 3) uint8
  mask: np.ndarray     # (S, S) uint8, 255 where the action changed the frame
  action: str
  raw_action: str
  description: str
  meta: dict


def _shade(rgb, f: float) -> tuple[int, int, int]:
  return tuple(int(max(0, min(255, round(c * f)))) for c in rgb)


def _mix(a, b, t: float) -> tuple[int, int, int]:
  return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


class _Canvas:
  """ImageDraw in fractions of the frame; every primitive grows the current bbox (fractions)."""

  def __init__(self, img: Image.Image):
    self.img = img
    self.r = img.width
    self.d = ImageDraw.Draw(img)
    self.box: list[float] | None = None

  def _grow(self, xs, ys):
    b = [min(xs), min(ys), max(xs), max(ys)]
    self.box = b if self.box is None else [min(self.box[0], b[0]), min(self.box[1], b[1]),
                                           max(self.box[2], b[2]), max(self.box[3], b[3])]

  def take_box(self) -> list[float]:
    box, self.box = self.box, None
    return box

  def ellipse(self, cx, cy, rx, ry, fill=None, outline=None, width=0.0, track=True):
    r = self.r
    self.d.ellipse([(cx - rx) * r, (cy - ry) * r, (cx + rx) * r, (cy + ry) * r], fill=fill,
                   outline=outline, width=max(1, round(width * r)) if outline else 0)
    if track:
      self._grow([cx - rx, cx + rx], [cy - ry, cy + ry])

  def pieslice(self, cx, cy, rx, ry, start, end, fill):
    r = self.r
    self.d.pieslice([(cx - rx) * r, (cy - ry) * r, (cx + rx) * r, (cy + ry) * r], start, end,
                    fill=fill)
    self._grow([cx - rx, cx + rx], [cy, cy + ry])

  def poly(self, pts, fill, track=True):
    self.d.polygon([(x * self.r, y * self.r) for x, y in pts], fill=fill)
    if track:
      self._grow([p[0] for p in pts], [p[1] for p in pts])

  def line(self, pts, fill, width, track=True):
    self.d.line([(x * self.r, y * self.r) for x, y in pts], fill=fill,
                width=max(1, round(width * self.r)), joint="curve")
    if track:
      self._grow([p[0] for p in pts], [p[1] for p in pts])

  def rect(self, x0, y0, x1, y1, fill, radius=0.0, track=True):
    r = self.r
    self.d.rounded_rectangle([x0 * r, y0 * r, x1 * r, y1 * r], radius=radius * r, fill=fill)
    if track:
      self._grow([x0, x1], [y0, y1])

  def capsule(self, a, b, width, fill, track=True):
    """A thick segment with round ends from a to b."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    n = math.hypot(dx, dy) or 1.0
    px, py = -dy / n * width / 2, dx / n * width / 2
    self.poly([(ax + px, ay + py), (bx + px, by + py), (bx - px, by - py), (ax - px, ay - py)],
              fill, track)
    self.ellipse(ax, ay, width / 2, width / 2, fill=fill, track=track)
    self.ellipse(bx, by, width / 2, width / 2, fill=fill, track=track)


# ---------------------------------------------------------------------------- objects
# Each draws at base line (x, y) with size s and returns where a hand grips it: a dict of
# named points (fractions of the frame).

def _shadow(c: _Canvas, table, x, y, s, strength=0.72):
  c.ellipse(x, y, 0.55 * s, 0.12 * s, fill=_shade(table, strength), track=False)


def _draw_cup(c, o: Obj, x, y, s, state):
  rgb, f = o.rgb, o.facing
  top, bottom = y - 0.82 * s, y
  c.poly([(x - 0.31 * s, top), (x + 0.31 * s, top), (x + 0.25 * s, bottom),
          (x - 0.25 * s, bottom)], fill=rgb)
  c.ellipse(x + f * 0.36 * s, y - 0.45 * s, 0.13 * s, 0.2 * s, outline=_shade(rgb, 0.8),
            width=0.07 * s)
  c.ellipse(x, top, 0.31 * s, 0.09 * s, fill=_shade(rgb, 1.25))
  c.ellipse(x, top + 0.01 * s, 0.25 * s, 0.06 * s, fill=(92, 56, 34))  # coffee
  return {"handle": (x + f * 0.42 * s, y - 0.45 * s), "body": (x, y - 0.45 * s),
          "side_l": (x - 0.3 * s, y - 0.45 * s), "side_r": (x + 0.3 * s, y - 0.45 * s)}


def _draw_bowl(c, o: Obj, x, y, s, state):
  rgb = o.rgb
  rim = y - 0.42 * s
  c.pieslice(x, rim, 0.55 * s, 0.42 * s, 0, 180, fill=rgb)
  c.ellipse(x, rim, 0.55 * s, 0.14 * s, fill=_shade(rgb, 1.25))
  c.ellipse(x, rim, 0.46 * s, 0.1 * s, fill=(236, 214, 160))  # soup
  if state == "stirred":
    c.ellipse(x, rim, 0.3 * s, 0.06 * s, outline=(196, 160, 98), width=0.03 * s)
    c.ellipse(x, rim, 0.15 * s, 0.03 * s, outline=(196, 160, 98), width=0.03 * s)
  return {"body": (x, rim), "food": (x, rim), "side_l": (x - 0.5 * s, rim),
          "side_r": (x + 0.5 * s, rim)}


def _draw_pan(c, o: Obj, x, y, s, state):
  rgb, f = o.rgb, o.facing
  cy = y - 0.14 * s
  c.capsule((x + f * 0.45 * s, cy), (x + f * 0.98 * s, cy - 0.06 * s), 0.09 * s, (40, 40, 44))
  c.ellipse(x, cy, 0.52 * s, 0.22 * s, fill=rgb)
  c.ellipse(x, cy - 0.02 * s, 0.43 * s, 0.16 * s, fill=(58, 58, 62))
  c.ellipse(x + 0.05 * s, cy - 0.02 * s, 0.2 * s, 0.08 * s, fill=(214, 170, 60))  # omelette
  if state == "stirred":
    c.ellipse(x, cy - 0.02 * s, 0.3 * s, 0.1 * s, outline=(150, 112, 40), width=0.03 * s)
  return {"handle": (x + f * 0.9 * s, cy - 0.05 * s), "body": (x, cy),
          "food": (x, cy - 0.02 * s), "side_l": (x - 0.48 * s, cy), "side_r": (x + 0.48 * s, cy)}


def _draw_knife(c, o: Obj, x, y, s, state):
  rgb, f = o.rgb, o.facing
  cy = y - 0.07 * s
  c.poly([(x, cy - 0.07 * s), (x - f * 0.62 * s, cy + 0.02 * s), (x, cy + 0.06 * s)],
         fill=(200, 204, 212))  # blade
  c.rect(min(x, x + f * 0.45 * s), cy - 0.06 * s, max(x, x + f * 0.45 * s), cy + 0.06 * s,
         fill=rgb, radius=0.04 * s)
  return {"handle": (x + f * 0.25 * s, cy), "body": (x, cy)}


def _draw_carrot(c, o: Obj, x, y, s, state):
  rgb, f = o.rgb, o.facing  # the leafy top points to `facing`
  cy = y - 0.1 * s
  top, tip = x + f * 0.45 * s, x - f * 0.5 * s
  def piece(a, b, ra, rb, dx):
    c.poly([(a + dx, cy - ra), (b + dx, cy - rb), (b + dx, cy + rb), (a + dx, cy + ra)], fill=rgb)
  if state == "cut":
    mid = x - f * 0.02 * s
    gap = 0.16 * s
    piece(top, mid, 0.12 * s, 0.075 * s, f * gap)
    piece(mid, tip, 0.075 * s, 0.015 * s, -f * gap)
    c.ellipse(mid + f * gap, cy, 0.025 * s, 0.075 * s, fill=_shade(rgb, 1.25))
    c.ellipse(mid - f * gap, cy, 0.025 * s, 0.075 * s, fill=_shade(rgb, 1.25))
    leaf_dx = f * gap
  else:
    piece(top, tip, 0.12 * s, 0.015 * s, 0.0)
    leaf_dx = 0.0
  for k, dy in enumerate((-0.1, 0.0, 0.1)):
    c.line([(top + leaf_dx, cy), (top + leaf_dx + f * (0.2 + 0.03 * k) * s, cy + dy * s)],
           fill=(60, 140, 50), width=0.05 * s)
  return {"body": (x, cy - 0.06 * s), "cut": (x - f * 0.02 * s, cy)}


def _draw_sponge(c, o: Obj, x, y, s, state):
  rgb = o.rgb
  c.rect(x - 0.32 * s, y - 0.12 * s, x + 0.32 * s, y, fill=(40, 110, 60), radius=0.03 * s)
  c.rect(x - 0.32 * s, y - 0.36 * s, x + 0.32 * s, y - 0.1 * s, fill=rgb, radius=0.05 * s)
  for i, (px, py) in enumerate(((-0.18, -0.27), (0.02, -0.2), (0.2, -0.28), (-0.05, -0.3),
                                (0.14, -0.17), (-0.2, -0.17))):
    c.ellipse(x + px * s, y + py * s, 0.025 * s, 0.02 * s, fill=_shade(rgb, 0.78), track=False)
  return {"body": (x, y - 0.3 * s)}


def _draw_drawer(c, o: Obj, x, y, s, state):
  rgb = o.rgb
  w, h, depth = 0.5 * s, 0.78 * s, 0.16 * s
  c.poly([(x - w, y - h), (x + w, y - h), (x + w - 0.1 * s, y - h - depth),
          (x - w + 0.1 * s, y - h - depth)], fill=_shade(rgb, 1.22))       # top face
  c.rect(x - w, y - h, x + w, y, fill=rgb)                                 # front
  px0, py0, px1, py1 = x - 0.38 * s, y - 0.58 * s, x + 0.38 * s, y - 0.22 * s
  if state == "open":
    c.rect(px0, py0, px1, py1, fill=(30, 24, 20))                          # dark opening
    dy = 0.22 * s
    c.poly([(px0, py0), (px1, py0), (px1 + 0.05 * s, py0 + dy), (px0 - 0.05 * s, py0 + dy)],
           fill=(120, 92, 64))                                             # drawer bottom
    c.rect(px0 - 0.05 * s, py0 + dy, px1 + 0.05 * s, py1 + dy + 0.04 * s, fill=_shade(rgb, 0.85))
    hy = (py0 + py1) / 2 + dy + 0.02 * s
  else:
    c.rect(px0, py0, px1, py1, fill=_shade(rgb, 0.85))
    hy = (py0 + py1) / 2
  c.rect(x - 0.14 * s, hy - 0.035 * s, x + 0.14 * s, hy + 0.035 * s, fill=(210, 210, 214),
         radius=0.03 * s)
  return {"handle": (x, hy)}


DRAW: dict[str, Callable] = {"cup": _draw_cup, "bowl": _draw_bowl, "pan": _draw_pan,
                             "knife": _draw_knife, "carrot": _draw_carrot,
                             "sponge": _draw_sponge, "drawer": _draw_drawer}


def _hand_start(side: str) -> tuple[float, float]:
  return (0.06, 1.3) if side == "left" else (0.94, 1.3)


def _draw_arm(c: _Canvas, side: str, end, skin, sleeve, holding=False) -> list[float]:
  """Forearm from below the frame to a hand whose palm centre is `end`; returns the hand bbox."""
  sx, sy = _hand_start(side)
  ex, ey = end
  dx, dy = ex - sx, ey - sy
  n = math.hypot(dx, dy) or 1.0
  ux, uy = dx / n, dy / n
  px, py = -uy, ux                       # perpendicular
  thumb = 1.0 if side == "left" else -1.0
  if px * thumb < 0:                     # the thumb points toward the body's middle
    px, py = -px, -py
  # The fingertips, not the palm, reach `end`: the gripped object stays visible.
  ex, ey = ex - 0.05 * ux, ey - 0.05 * uy
  c.capsule((sx, sy), (sx + 0.62 * dx, sy + 0.62 * dy), 0.15, sleeve, track=False)
  c.capsule((sx + 0.6 * dx, sy + 0.6 * dy), (ex - 0.03 * ux, ey - 0.03 * uy), 0.1, skin,
            track=False)
  c.take_box()
  c.ellipse(ex, ey, 0.058, 0.058, fill=skin, outline=_shade(skin, 0.8), width=0.006)
  reach = 0.04 if holding else 0.058
  for k in (-1.5, -0.5, 0.5, 1.5):
    fx = ex + ux * reach + px * k * 0.024
    fy = ey + uy * reach + py * k * 0.024
    c.capsule((ex + px * k * 0.02, ey + py * k * 0.02), (fx, fy), 0.024, _shade(skin, 0.95))
  c.capsule((ex, ey), (ex + px * 0.065 - ux * 0.01, ey + py * 0.065 - uy * 0.01), 0.028,
            _shade(skin, 0.9))
  return c.take_box()


def _rest_point(side: str) -> tuple[float, float]:
  return (0.2, 0.92) if side == "left" else (0.8, 0.92)


# ---------------------------------------------------------------------------- scenes

OBJECTS = (2, 4)  # objects per scene, inclusive range (the default; configurable per dataset)


def sample_scene(rng: np.random.Generator, objects: tuple[int, int] = OBJECTS) -> Scene:
  n = int(rng.integers(objects[0], objects[1] + 1))
  slots = [(col, row) for col in range(3) for row in range(2)]
  chosen = rng.permutation(len(slots))
  objects: list[Obj] = []
  used: set[tuple[str, str]] = set()
  for slot_index in chosen:
    if len(objects) == n:
      break
    col, row = slots[slot_index]
    kinds = [k for k in KINDS if not (k == "drawer" and row == 1)]  # drawers stand at the back
    for _ in range(20):
      kind = kinds[int(rng.integers(len(kinds)))]
      palette = KIND_COLOURS.get(kind, tuple(COLOURS))
      colour = palette[int(rng.integers(len(palette)))]
      if (kind, colour) not in used:  # the action text must name exactly one object
        break
    else:
      continue
    used.add((kind, colour))
    objects.append(Obj(kind, colour, col, row, x=COLUMN_X[col] + rng.uniform(-0.03, 0.03),
                       y=ROW_Y[row] + rng.uniform(-0.015, 0.015),
                       scale=0.24 * ROW_SCALE[row] * rng.uniform(0.92, 1.08),
                       facing=int(rng.choice([-1, 1]))))
  # Far objects first: nearer ones overlap them, as they would in a photograph.
  objects.sort(key=lambda o: (o.row, o.column))
  table = _mix((150, 104, 66), tuple(int(v) for v in rng.integers(90, 230, 3)), 0.25)
  wall = _mix((214, 218, 212), tuple(int(v) for v in rng.integers(120, 250, 3)), 0.35)
  return Scene(objects=objects, table=table, wall=wall,
               skin=SKIN[int(rng.integers(len(SKIN)))],
               sleeve=SLEEVES[int(rng.integers(len(SLEEVES)))],
               resting=(bool(rng.random() < 0.6), bool(rng.random() < 0.6)),
               brightness=float(rng.uniform(0.88, 1.08)), noise_seed=int(rng.integers(2**31)))


def handle_toward(o: Obj, hand: str) -> bool:
  """Whether the object's handle points to the side of `hand`."""
  return (o.facing < 0) == (hand == "left")


def choose_hand(o: Obj) -> str:
  """The hand on the object's side; in the middle, the side its handle points to (else right)."""
  if o.column != 1:
    return o.location
  if o.kind in HANDLED:
    return "left" if o.facing < 0 else "right"
  return "right"


def make_action(verb: str, target: int, scene: Scene, narrated: bool,
                options: Options = Options()) -> Action:
  """The hand (and destination) of an action: read off the frame, or the combination's rule."""
  o = scene.objects[target]
  if options.combination_rules:
    hand, destination = RULES[combination(verb, o)]
    return Action(verb, target, hand, narrated, destination)
  return Action(verb, target, choose_hand(o), narrated)


def swap(action: Action, rng: np.random.Generator, options: Options = Options()) -> Action:
  """The action done against its combination's rule: the other hand and, for "pick up",
  one of the two other destinations; with options.balance_poses a "pick up" takes any other
  (hand, destination) pose, the poses fewer held-in rules show drawn more often (module doc)."""
  destination = action.destination
  if destination is not None and options.balance_poses and action.verb == "pick up":
    rule = (action.hand, destination)
    shown = [RULES[c] for c in combinations(options)
             if c.startswith("pick up ") and c not in options.holdout]
    poses = [(h, d) for h in ("left", "right") for d in LOCATIONS if (h, d) != rule]
    weights = np.asarray([1.0 / (1 + shown.count(p)) for p in poses])
    hand, destination = poses[int(rng.choice(len(poses), p=weights / weights.sum()))]
    return dataclasses.replace(action, hand=hand, destination=destination)
  if destination is not None:
    others = [d for d in LOCATIONS if d != destination]
    destination = others[int(rng.integers(len(others)))]
  return dataclasses.replace(action, hand="right" if action.hand == "left" else "left",
                             destination=destination)


def sample_actions(scene: Scene, rng: np.random.Generator, count: int,
                   options: Options = Options(), banned: Sequence[str] = ()) -> list[Action]:
  """Up to `count` actions on distinct objects, none of a `banned` combination (fewer when the
  scene affords no more). The verb is drawn first, uniformly over what the scene affords, so
  "pick up" (which most kinds afford) does not crowd out the rarer verbs."""
  out: list[Action] = []
  free = list(range(len(scene.objects)))
  fits_verb = lambda v, i: (v in verbs_of(scene.objects[i].kind, options)
                            and combination(v, scene.objects[i]) not in banned)
  for _ in range(count):
    verbs = sorted({v for i in free for v in verbs_of(scene.objects[i].kind, options)
                    if fits_verb(v, i)})
    if not verbs:
      break
    verb = verbs[int(rng.integers(len(verbs)))]
    fits = [i for i in free if fits_verb(verb, i)]
    t = fits[int(rng.integers(len(fits)))]
    free.remove(t)
    out.append(make_action(verb, t, scene, bool(rng.random() < 0.5), options))
  return out


def action_text(verb: str, o: Obj) -> str:
  thing = f"the {o.colour} {o.kind}"
  return {"pick up": f"pick up {thing}", "cut": f"cut {thing}", "open": f"open {thing}",
          "stir": f"stir the food in {thing}", "wipe": f"wipe the table with {thing}",
          "push": f"push {thing}"}[verb]


def _wipe_direction(o: Obj, hand: str) -> int:
  if o.column == 0:
    return 1
  if o.column == 2:
    return -1
  return -1 if hand == "right" else 1


SIDE_WORDS = {"left": "left side", "middle": "middle", "right": "right side"}
ON_WORDS = {"left": "on the left side", "middle": "in the middle", "right": "on the right side"}


def describe(verb: str, o: Obj, hand: str, destination: str | None = None) -> str:
  """The enriched description: read off the input frame, except under combination rules the
  hand and the destination, which only the description states."""
  where = SIDE_WORDS[o.location]
  on_where = ON_WORDS[o.location]
  thing = f"{o.colour} {o.kind}"
  hand_word = f"The {hand} hand"
  if verb == "pick up":
    toward = handle_toward(o, hand)
    how = {"cup": "by its handle" if toward else "around its body",
           "pan": "by its handle" if toward else "by its rim",
           "knife": "by its handle", "bowl": "by its rim", "carrot": "around its middle",
           "sponge": "from above"}[o.kind]
    lift = "lifting it off the table"
    if destination is not None:
      lift += f" to put it down {ON_WORDS[destination]} of the table"
    return f"{hand_word} reaches to the {where} of the table and grasps the {thing} {how}, {lift}."
  if verb == "cut":
    return (f"{hand_word} brings a knife down on the {thing} {on_where} of the table and cuts "
            "it into two pieces.")
  if verb == "open":
    return (f"{hand_word} pulls the handle of the {thing} {on_where} of the table and slides "
            "the drawer open.")
  if verb == "stir":
    return (f"{hand_word} holds a spoon in the {thing} {on_where} of the table and stirs the "
            "food in circles.")
  if verb == "wipe":
    direction = "right" if _wipe_direction(o, hand) > 0 else "left"
    return (f"{hand_word} presses the {thing} {on_where} of the table and wipes toward the "
            f"{direction}, leaving a wet streak.")
  if verb == "push":
    return (f"{hand_word} presses against the {thing} {on_where} of the table and slides it "
            f"along the table until it stands {ON_WORDS[destination]} of the table.")
  raise ValueError(f"unknown verb {verb!r}")


def _background(c: _Canvas, scene: Scene) -> None:
  c.rect(0, 0, 1, HORIZON, fill=scene.wall, track=False)
  for i in range(1, 6):  # backsplash tiles
    c.line([(i / 6, 0), (i / 6, HORIZON)], fill=_shade(scene.wall, 0.9), width=0.006, track=False)
  for yy in (0.1, 0.2):
    c.line([(0, yy), (1, yy)], fill=_shade(scene.wall, 0.9), width=0.006, track=False)
  c.rect(0, HORIZON, 1, 1, fill=scene.table, track=False)
  c.rect(0, HORIZON, 1, HORIZON + 0.018, fill=_shade(scene.table, 1.18), track=False)
  y, gap = HORIZON + 0.06, 0.05
  while y < 1:  # planks, further apart toward the viewer
    c.line([(0, y), (1, y)], fill=_shade(scene.table, 0.9), width=0.005, track=False)
    gap *= 1.35
    y += gap


def _finish(img: Image.Image, size: int, scene: Scene) -> np.ndarray:
  arr = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), np.float32)
  # Same light and sensor noise in input and target: they differ only where the action acts.
  noise = np.random.default_rng(scene.noise_seed).normal(0, 2.0, arr.shape[:2])[..., None]
  ramp = np.linspace(1.04, 0.94, size, dtype=np.float32)[:, None, None]  # light from above
  return np.clip(np.rint(arr * scene.brightness * ramp + noise), 0, 255).astype(np.uint8)


def _render(scene: Scene, size: int, action: Action | None):
  """Draws the scene (action=None: the input frame) -> (frame, target bbox, hand bbox)."""
  factor = max(2, math.ceil(256 / size))
  img = Image.new("RGB", (size * factor, size * factor))
  c = _Canvas(img)
  _background(c, scene)
  target_box = hand_box = None
  grip = None
  extra: list[Callable[[], None]] = []
  order = list(range(len(scene.objects)))
  if action is not None and action.destination is not None:
    order.remove(action.target)  # carried over the table: in front of everything
    order.append(action.target)
  for i in order:
    o = scene.objects[i]
    x, y, s, state = o.x, o.y, o.scale, "rest"
    is_target = action is not None and i == action.target
    if is_target and action.verb == "wipe":
      shift = 0.1 * _wipe_direction(o, action.hand)
      lo, hi = sorted((x, x + shift))
      c.rect(lo - 0.28 * s, y - 0.16 * s, hi + 0.28 * s, y + 0.04 * s,
             fill=_shade(scene.table, 0.8), radius=0.06 * s, track=False)   # wet streak
      x += shift
    if is_target and action.verb == "push":  # slid along its row to the destination column
      x = COLUMN_X[LOCATIONS.index(action.destination)]
    if is_target and action.verb == "pick up":
      if action.destination is not None:  # carried to the near row of its destination column
        x, y = COLUMN_X[LOCATIONS.index(action.destination)], ROW_Y[1]
      _shadow(c, scene.table, x, y, s * 0.8, strength=0.85)
      y -= 0.13
      s *= 1.1
    else:
      _shadow(c, scene.table, x, y, s)
    if is_target:
      state = {"cut": "cut", "open": "open", "stir": "stirred"}.get(action.verb, "rest")
    c.take_box()
    points = DRAW[o.kind](c, o, x, y, s, state)
    box = c.take_box()
    if is_target:
      target_box = box
      if action.verb == "pick up":
        if o.kind == "knife" or (o.kind in ("cup", "pan") and handle_toward(o, action.hand)):
          grip = points["handle"]
        else:  # from the side of the hand
          grip = points.get("side_l" if action.hand == "left" else "side_r", points["body"])
      elif action.verb == "cut":
        # The hand stays beside the carrot (an arm from below would hide it); the knife reaches
        # from the hand into the cut.
        cx, cy = points["cut"]
        side = -1.0 if action.hand == "left" else 1.0
        grip = (cx + side * 0.13, cy + 0.03)
        extra.append(lambda cx=cx, cy=cy, g=grip, side=side: (
            c.poly([(cx, cy + 0.012), (cx, cy - 0.03), (g[0] - side * 0.07, cy - 0.035),
                    (g[0] - side * 0.07, cy + 0.005)], fill=(214, 218, 226), track=False),
            c.capsule((g[0] - side * 0.07, cy - 0.012), g, 0.03, (30, 30, 34), track=False)))
      elif action.verb == "open":
        grip = points["handle"]
      elif action.verb == "stir":
        fx, fy = points["food"]
        side = -1.0 if action.hand == "left" else 1.0
        grip = (fx + side * 0.13, fy - 0.07)
        extra.append(lambda fx=fx, fy=fy, g=grip: (  # the spoon
            c.line([(fx, fy), g], fill=(176, 180, 188), width=0.02, track=False),
            c.ellipse(fx, fy, 0.028, 0.014, fill=(176, 180, 188), track=False)))
      elif action.verb in ("wipe", "push"):
        grip = points["body"]
  for draw in extra:
    draw()
  hands = []
  for side, resting in zip(("left", "right"), scene.resting):
    if action is not None and side == action.hand:
      continue
    if resting:
      hands.append((side, _rest_point(side), False))
  if action is not None:
    hands.append((action.hand, grip, action.verb in ("cut", "stir")))
  for side, end, holding in hands:
    box = _draw_arm(c, side, end, scene.skin, scene.sleeve, holding)
    if action is not None and side == action.hand:
      hand_box = box
  return _finish(img, size, scene), target_box, hand_box


def _pixels(box, size: int) -> list[int]:
  x0, y0, x1, y1 = box
  clamp = lambda v: int(min(size, max(0, round(v * size))))
  return [clamp(x0), clamp(y0), clamp(x1), clamp(y1)]


def render_example(scene: Scene, action: Action, size: int,
                   frame: np.ndarray | None = None, holdout: Sequence[str] | None = None) -> Example:
  """One action of a scene -> frames, texts, mask and metadata (`frame`: the input frame, if
  already rendered for another action of the scene; `holdout`: the combinations held out of
  the training pairs, when the world holds some out, for the meta's seen / held-out mark)."""
  if frame is None:
    frame = _render(scene, size, None)[0]
  target, target_box, hand_box = _render(scene, size, action)
  o = scene.objects[action.target]
  input_boxes = _input_boxes(scene)
  mask = (np.abs(frame.astype(np.int16) - target.astype(np.int16)).max(-1) > 12)
  text = action_text(action.verb, o)
  raw = f"#C C {NARRATED[action.verb]}{text[len(action.verb):]}" if action.narrated else text
  meta = {
      "verb": action.verb, "target": o.kind, "colour": o.colour, "colour_rgb": list(o.rgb),
      "location": o.location, "hand": action.hand, "hand_rgb": list(scene.skin),
      "sleeve_rgb": list(scene.sleeve),
      "bbox_input": _pixels(input_boxes[action.target], size),
      "bbox_target": _pixels(target_box, size), "hand_bbox": _pixels(hand_box, size),
      "objects": [{"kind": x.kind, "colour": x.colour, "location": x.location,
                   "bbox": _pixels(b, size)} for x, b in zip(scene.objects, input_boxes)],
  }
  if action.destination is not None:
    meta["destination"] = action.destination
  if holdout:
    meta["combination"] = combination(action.verb, o)
    meta["combination_seen"] = meta["combination"] not in holdout
  return Example(input=frame, target=target, mask=mask.astype(np.uint8) * 255, action=text,
                 raw_action=raw, description=describe(action.verb, o, action.hand,
                                                      action.destination), meta=meta)


def _input_boxes(scene: Scene) -> list[list[float]]:
  c = _Canvas(Image.new("RGB", (64, 64)))
  boxes = []
  for o in scene.objects:
    DRAW[o.kind](c, o, o.x, o.y, o.scale, "rest")
    boxes.append(c.take_box())
  return boxes


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), index])


def check_objects(objects) -> tuple[int, int]:
  lo, hi = (int(v) for v in objects)
  if not 1 <= lo <= hi <= 6:
    raise ValueError(f"synthetic objects={tuple(objects)} must be (min, max) with "
                     "1 <= min <= max <= 6 (a scene has 6 slots)")
  return lo, hi


def generate_split(split: str, num: int, seed: int, size: int,
                   objects: tuple[int, int] = OBJECTS, options: Options = Options()):
  """Yields (clip_id, action_id, Example) until `num` actions; 1-2 actions per scene, on
  scenes of objects[0]..objects[1] objects. With options.holdout, the train and val splits
  have none of its combinations, and the test split's scenes alternate between held-out and
  seen combinations, so half its pairs are held out (a scene affording no allowed combination
  is skipped)."""
  objects = check_objects(objects)
  held_in = tuple(c for c in combinations(options) if c not in options.holdout)
  made, scene_index = 0, 0
  while made < num:
    rng = scene_rng(seed, split, scene_index)
    scene = sample_scene(rng, objects)
    banned = (() if not options.holdout else options.holdout if split != "test"
              else held_in if made % 2 == 0 else options.holdout)
    count = min(num - made, 2 if rng.random() < 0.35 else 1, len(scene.objects))
    actions = sample_actions(scene, rng, count, options, banned)
    clip = f"synth_{split}_{scene_index:05d}"
    scene_index += 1
    if not actions:
      continue
    frame = _render(scene, size, None)[0]
    for k, action in enumerate(actions):
      swapped = False
      if split == "train" and options.hand_swap:
        swap_rng = np.random.default_rng([seed, SPLITS.index(split), scene_index - 1, k, 7])
        if swap_rng.random() < options.hand_swap:
          action, swapped = swap(action, swap_rng, options), True
      ex = render_example(scene, action, size, frame, options.holdout)
      if options.hand_swap:
        ex.meta["swapped"] = swapped
      yield clip, str(k), ex
    made += len(actions)


def generate_instructions(num: int, seed: int, size: int, objects: tuple[int, int] = OBJECTS,
                          options: Options = Options()):
  """Instruction-only examples (no target frame): yields (clip_id, frame, action text,
  description, combination); example i is of combinations(options)[i % 11 (17 with push)], on
  the first scene of its own random stream that has an object of that kind."""
  objects = check_objects(objects)
  combos = combinations(options)
  for index in range(num):
    combo = combos[index % len(combos)]
    verb, kind = combo.rsplit(" ", 1)
    for attempt in range(10_000):
      rng = np.random.default_rng([seed, len(SPLITS), index, attempt])
      scene = sample_scene(rng, objects)
      targets = [i for i, o in enumerate(scene.objects) if o.kind == kind]
      if targets:
        break
    else:  # a drawer needs a far slot: always there, so only an impossible bug ends here
      raise RuntimeError(f"no scene with a {kind} in 10000 draws")
    action = make_action(verb, targets[0], scene, False, options)
    o = scene.objects[action.target]
    yield (f"synth_instruct_{index:05d}", _render(scene, size, None)[0], action_text(verb, o),
           describe(verb, o, action.hand, action.destination), combo)


@dataclasses.dataclass(frozen=True)
class ReleaseFiles:
  """Paths of a release-format dataset (what cfg.data.annotation_* / frames_dir / ... point to)."""
  root: Path
  frames_dir: Path
  metadata: Path
  annotations: dict[str, Path]
  llava: dict[str, Path]


def release_files(root: str | Path, splits: Sequence[str]) -> ReleaseFiles:
  root = Path(root)
  return ReleaseFiles(root, root / "frames", root / "metadata.json",
                      {s: root / f"lego_{s}.json" for s in splits},
                      {s: root / f"llava_{s}.json" for s in splits})


def _settings(counts: dict[str, int], seed: int, size: int, objects: tuple[int, int],
              options: Options = Options()) -> dict:
  out = {"counts": counts, "seed": seed, "frame_size": size, "generator": 1}
  if tuple(objects) != OBJECTS:  # stamps written before the setting existed stay valid
    out["objects"] = list(objects)
  return {**out, **options.stamp()}


def write_release(root: str | Path, counts: dict[str, int], seed: int, size: int,
                  progress: bool = True, objects: tuple[int, int] = OBJECTS,
                  options: Options = Options()) -> ReleaseFiles:
  """Writes the synthetic dataset in the release's formats under `root` (see module doc).

  Written into a sibling temporary directory that is renamed into place at the end: a run that
  stops half-way never leaves `root` looking complete. An existing `root` written with the same
  settings is kept; with other settings it is an error (delete it to regenerate)."""
  root = Path(root)
  if not 16 <= size <= 1024:
    raise ValueError(f"synthetic frame_size={size} must be in [16, 1024]")
  objects = check_objects(objects)
  splits = [s for s in SPLITS if counts.get(s, 0) > 0]
  settings = _settings({s: counts[s] for s in splits}, seed, size, objects, options)
  files = release_files(root, splits)
  stamp = root / "synthetic.json"
  if stamp.exists():
    old = json.loads(stamp.read_text())
    if old != settings:
      raise FileExistsError(f"{root} holds synthetic data made with other settings ({old} vs "
                            f"{settings}); delete it or choose another workdir")
    return files
  tmp = root.with_name(root.name + ".incomplete")
  shutil.rmtree(tmp, ignore_errors=True)
  (tmp / "frames").mkdir(parents=True)
  metadata: dict = {}
  instructions = options.num_instruction if "train" in splits else 0
  total = sum(counts[s] for s in splits) + instructions
  with tqdm(total=total, desc="synthetic scenes", unit="ex", disable=not progress) as bar:
    for split in splits:
      annotation: dict = {}
      llava: list = []
      for clip, action_id, ex in generate_split(split, counts[split], seed, size, objects,
                                                options):
        d = tmp / "frames" / clip / action_id
        d.mkdir(parents=True, exist_ok=True)
        frame_in = 100 + 37 * int(action_id) + (hash_int(clip) % 5000)
        frame_out = frame_in + 30
        rel_in = f"{clip}/{action_id}/{frame_in:06d}.jpg"
        rel_out = f"{clip}/{action_id}/{frame_out:06d}.jpg"
        (tmp / "frames" / rel_in).write_bytes(images.encode_jpeg(Image.fromarray(ex.input)))
        (tmp / "frames" / rel_out).write_bytes(images.encode_jpeg(Image.fromarray(ex.target)))
        rel_mask = f"{clip}/{action_id}/mask.png"
        (tmp / "frames" / rel_mask).write_bytes(images.encode_png(ex.mask))
        annotation.setdefault(clip, {})[action_id] = {
            "image_0": rel_in, "image_1": rel_out, "action": ex.raw_action,
            "llava_forecast_finetune": ex.description}
        if not ex.meta.get("swapped"):  # the VLLM learns how an action is properly done
          llava.append({"id": f"{clip}/{action_id}", "image": rel_in, "conversations": [
              {"from": "human", "value": human_turn(ex.action)},
              {"from": "gpt", "value": ex.description}]})
        clip_meta = metadata.setdefault(clip, {"height": size, "width": size, "fps": 30,
                                               "actions": {}})
        clip_meta["actions"][action_id] = {"mask": rel_mask, "meta": ex.meta}
        bar.update(1)
      if split == "train":  # the VLLM's extra scenes: frame, action and description only
        for clip, frame, text, description, combo in generate_instructions(
            instructions, seed, size, objects, options):
          rel = f"{clip}/0/{100 + hash_int(clip) % 5000:06d}.jpg"
          (tmp / "frames" / rel).parent.mkdir(parents=True, exist_ok=True)
          (tmp / "frames" / rel).write_bytes(images.encode_jpeg(Image.fromarray(frame)))
          llava.append({"id": f"{clip}/0", "image": rel, "combination": combo, "conversations": [
              {"from": "human", "value": human_turn(text)},
              {"from": "gpt", "value": description}]})
          bar.update(1)
      _write_json(tmp / files.annotations[split].name, annotation)
      _write_json(tmp / files.llava[split].name, llava)
  _write_json(tmp / files.metadata.name, metadata)
  _write_json(tmp / stamp.name, settings)
  if root.exists():  # an interrupted run's leftovers without a stamp
    shutil.rmtree(root)
  os.replace(tmp, root)
  return files


def hash_int(text: str) -> int:
  """A stable small hash (Python's hash() is salted per process)."""
  h = 0
  for ch in text.encode():
    h = (h * 131 + ch) % 1_000_003
  return h


def _write_json(path: Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=1, sort_keys=False))
