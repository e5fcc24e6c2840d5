"""The held-out-combinations world (synthetic.Options): off by default without changing a byte;
on, the LDM's training pairs lack the held-out combinations, the VLLM's instruction data covers
every combination, and the descriptions state the hand and destination the targets show."""

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import PIL
import pytest

from data_prep import llava_json
from lego_jax import config as config_lib
from lego_jax.data import prepare, synthetic
from lego_jax.data.synthetic import Obj, Options, Scene
from lego_jax.eval import action_region

SIZE = 64
HOLDOUT = ("stir bowl", "pick up pan", "pick up carrot")
# sha256 of the files written by the generator at commit cb44f77 (before the options existed),
# for the embedded default's objects (1, 1) and the generator's default (2, 4). The JSON files
# (texts, metadata, bboxes) are pure Python and numpy; the JPEG and PNG bytes depend on
# Pillow's drawing and codecs as well, so those are compared on the Pillow they were made with.
BEFORE = {
    "tiny": ("98e7c4921eeef0237cc3fb73f1db285a1b32af1e4663f4b9a9546178ada25d5b",
             "237f5115861d17e90f3f6537e8565b8882f2e9f54c85b06d85e68fb737c82011"),
    "default": ("69b132208d9d686f778196e193315c781a820607c9f0e1686a33ee94cf2f695e",
                "37a60594099994760e6661733e4d1ff4a4e79e04e2c2ddcfe6a6b19e08d248a8"),
}
BEFORE_PILLOW = "13.0.0"


def _digest(root: Path, suffix: str = "") -> str:
  h = hashlib.sha256()
  for p in sorted(root.rglob(f"*{suffix}")):
    if p.is_file():
      h.update(str(p.relative_to(root)).encode())
      h.update(p.read_bytes())
  return h.hexdigest()


@pytest.mark.parametrize("name,counts,objects", [
    ("tiny", {"train": 10, "val": 2, "test": 4}, (1, 1)),
    ("default", {"train": 8, "test": 3}, (2, 4))])
def test_default_settings_write_the_same_bytes_as_before(tmp_path, name, counts, objects):
  files = synthetic.write_release(tmp_path / name, counts, seed=0, size=32, progress=False,
                                  objects=objects, options=Options())
  assert _digest(files.root, ".json") == BEFORE[name][0]
  if PIL.__version__ == BEFORE_PILLOW:
    assert _digest(files.root) == BEFORE[name][1]


def test_the_paper_configs_keep_the_plain_world_and_the_demo_holds_combinations_out():
  for path in ("configs/lego_ego4d.py", "configs/lego_epickitchens.py"):
    assert prepare.synthetic_options(config_lib.load(path).data.synthetic) == Options()
  on = prepare.synthetic_options(config_lib.load("configs/tiny.py").data.synthetic)
  assert on.combination_rules and set(on.holdout) == set(HOLDOUT) and on.num_instruction > 0


def test_bad_options_are_named():
  cfg = config_lib.load("configs/tiny.py")
  cfg.data.synthetic.holdout = ("stir cup",)
  with pytest.raises(prepare.DataConfigError, match="'stir cup'"):
    prepare.check_config(cfg.data)
  with pytest.raises(ValueError, match="every combination"):
    Options(holdout=synthetic.COMBINATIONS)


def test_no_other_combination_gives_a_rule_away():
  by_kind, by_verb = collections.defaultdict(set), collections.defaultdict(list)
  for combo, (hand, destination) in synthetic.RULES.items():
    verb, kind = combo.rsplit(" ", 1)
    if verb != "push":
      by_kind[kind].add(hand)
    by_verb[verb].append((hand, destination))
    assert (destination is not None) == (verb in ("pick up", "push"))
  assert set(synthetic.RULES) == set(synthetic.COMBINATIONS + synthetic.PUSH_COMBINATIONS)
  for kind, verbs in synthetic.VERBS.items():  # each kind's verbs use different hands
    assert len(by_kind[kind]) == min(len(verbs), 2), kind
  for verb, rules in by_verb.items():  # no verb has one hand or one destination for all kinds
    if len(rules) > 1:
      assert len({h for h, _ in rules}) == 2, verb
  assert len({d for _, d in by_verb["pick up"]}) == len({d for _, d in by_verb["push"]}) == 3
  # With pushes, every other combination of a held-out combination's kind uses the other hand,
  # and its push another destination: the kind gives the held-out rule away no more than before.
  for combo in HOLDOUT:
    hand, destination = synthetic.RULES[combo]
    kind = combo.rsplit(" ", 1)[1]
    others = [r for c, r in synthetic.RULES.items() if c.rsplit(" ", 1)[1] == kind and c != combo]
    assert len(others) >= 2 and all(h != hand for h, _ in others), combo
    assert destination is None or synthetic.RULES[f"push {kind}"][1] != destination, combo


def test_training_pairs_hold_out_what_the_instructions_cover(tmp_path):
  options = Options(combination_rules=True, holdout=HOLDOUT, num_instruction=22)
  counts = {"train": 24, "val": 4, "test": 16}
  files = synthetic.write_release(tmp_path / "raw", counts, seed=3, size=32, progress=False,
                                  objects=(1, 1), options=options)
  meta = json.loads(files.metadata.read_text())
  seen = collections.defaultdict(list)
  for clip, m in meta.items():
    for a in m["actions"].values():
      seen[clip.split("_")[1]].append((a["meta"]["combination"], a["meta"]["combination_seen"]))
  for split in ("train", "val"):
    assert len(seen[split]) == counts[split]
    assert all(flag and combo not in HOLDOUT for combo, flag in seen[split])
  test = seen["test"]
  assert len(test) == counts["test"]
  assert all(flag == (combo not in HOLDOUT) for combo, flag in test)
  held = [c for c, flag in test if not flag]
  assert 0.4 <= len(held) / len(test) <= 0.6  # test scenes alternate held-out and seen
  # Instruction data: every training pair's conversation, then 22 frames cycling through all 11
  # combinations, held-out ones included, whose frames the LLaVA converter reads.
  llava = json.loads(files.llava["train"].read_text())
  extra = [r for r in llava if r["id"].startswith("synth_instruct_")]
  assert len(llava) == counts["train"] + 22 and len(extra) == 22
  assert collections.Counter(r["combination"] for r in extra) == {
      c: 2 for c in synthetic.COMBINATIONS}
  for i, r in enumerate(extra[:11]):
    rec = llava_json.load_instruct(llava_json.InstructEntry(i, r), files.frames_dir)
    assert rec["image_jpeg"][:2] == b"\xff\xd8"
    verb, kind = r["combination"].rsplit(" ", 1)
    hand, destination = synthetic.RULES[r["combination"]]
    assert f"The {hand} hand" in rec["answer"] and kind in rec["answer"]
    if destination is None:
      assert "put it down" not in rec["answer"]
    else:
      assert f"put it down {synthetic.ON_WORDS[destination]}" in rec["answer"]
  stamp = json.loads((files.root / "synthetic.json").read_text())
  assert stamp["holdout"] == sorted(HOLDOUT) and stamp["num_instruction"] == 22
  with pytest.raises(FileExistsError):  # the same files under other options are refused
    synthetic.write_release(files.root, counts, seed=3, size=32, progress=False, objects=(1, 1))


def _scene(obj: Obj) -> Scene:
  return Scene(objects=[obj], table=(150, 104, 66), wall=(214, 218, 212), skin=(224, 172, 138),
               sleeve=(70, 70, 78), resting=(False, False), brightness=1.0, noise_seed=1)


def test_targets_put_the_object_and_the_hand_where_the_description_says():
  options = Options(combination_rules=True, push=True)
  plain = {}
  for combo in synthetic.COMBINATIONS + synthetic.PUSH_COMBINATIONS:
    verb, kind = combo.rsplit(" ", 1)
    hand, destination = synthetic.RULES[combo]
    for column in range(3):
      row = 0 if kind == "drawer" else 1
      colour = "orange" if kind == "carrot" else "blue"
      obj = Obj(kind, colour, column, row, x=synthetic.COLUMN_X[column],
                y=synthetic.ROW_Y[row], scale=0.24 * synthetic.ROW_SCALE[row], facing=1)
      scene = _scene(obj)
      action = synthetic.make_action(verb, 0, scene, False, options)
      ex = synthetic.render_example(scene, action, SIZE)
      assert action.hand == hand and action.destination == destination
      assert ex.description.startswith(f"The {hand} hand") and ex.meta["hand"] == hand
      sleeve = action_region.colour_match(ex.target, scene.sleeve, 30.0)
      bottom = sleeve[-SIZE // 6:]  # the arm enters the frame on the acting hand's side
      left, right = bottom[:, :SIZE // 2].sum(), bottom[:, SIZE // 2:].sum()
      assert (left > right) == (hand == "left"), (combo, column)
      if destination is None:
        assert "put it down" not in ex.description and "destination" not in ex.meta
        continue
      phrase = "until it stands" if verb == "push" else "put it down"
      assert f"{phrase} {synthetic.ON_WORDS[destination]} of the table" in ex.description
      assert ex.meta["destination"] == destination
      # The object's pixels are at the destination column in the target, wherever it stood.
      x0, y0, x1, y1 = ex.meta["bbox_target"]
      want = synthetic.COLUMN_X[synthetic.LOCATIONS.index(destination)] * SIZE
      assert abs((x0 + x1) / 2 - want) < 0.1 * SIZE, (combo, column)
      # (A knife's handle is in the hand: its blade's colour instead, on the table.)
      rgb = (200, 204, 212) if kind == "knife" else obj.rgb
      on_table = action_region.colour_match(ex.target, rgb, 30.0)
      on_table[:int(synthetic.HORIZON * SIZE) + 2] = False
      ys, xs = np.nonzero(on_table)
      assert len(xs) >= 3 and abs(xs.mean() - want) < 0.12 * SIZE, (combo, column)
      if verb == "pick up":
        plain[combo, column] = synthetic.render_example(
            scene, synthetic.make_action(verb, 0, scene, False), SIZE)
  # Without the rules the same pick-up lifts the object where it stood.
  for (combo, column), ex in plain.items():
    assert "put it down" not in ex.description
    x0, _, x1, _ = ex.meta["bbox_target"]
    assert abs((x0 + x1) / 2 - synthetic.COLUMN_X[column] * SIZE) < 0.1 * SIZE


def test_hand_swap_does_some_training_pairs_against_the_rule_and_says_so(tmp_path):
  counts = {"train": 40, "val": 4, "test": 8}
  write = lambda name, swap: synthetic.write_release(
      tmp_path / name, counts, seed=3, size=32, progress=False, objects=(1, 1),
      options=Options(combination_rules=True, holdout=HOLDOUT, hand_swap=swap))
  ruled, swapped = write("ruled", 0.0), write("swapped", 0.5)
  meta = json.loads(swapped.metadata.read_text())
  ruled_meta = json.loads(ruled.metadata.read_text())
  notes = json.loads(swapped.annotations["train"].read_text())
  flags = []
  for clip, m in meta.items():
    split = clip.split("_")[1]
    for action_id, a in m["actions"].items():
      mm, rule_hand = a["meta"], synthetic.RULES[a["meta"]["combination"]][0]
      flags.append((split, mm["swapped"]))
      assert (mm["hand"] != rule_hand) == mm["swapped"]
      if mm["swapped"]:
        rule_destination = synthetic.RULES[mm["combination"]][1]
        assert mm.get("destination") != rule_destination or rule_destination is None
        assert notes[clip][action_id]["llava_forecast_finetune"].startswith(
            f"The {mm['hand']} hand")
      else:  # the same pair as in the ruled world, byte for byte
        assert mm == {**ruled_meta[clip]["actions"][action_id]["meta"], "swapped": False}
  train = [f for s, f in flags if s == "train"]
  # The VLLM's conversations: the pairs done by the rule only (no frame shows a swap).
  talked = {r["id"] for r in json.loads(swapped.llava["train"].read_text())}
  assert talked == {f"{clip}/{a}" for clip, m in meta.items() if clip.startswith("synth_train")
                    for a, x in m["actions"].items() if not x["meta"]["swapped"]}
  assert len(train) == counts["train"] and 0.25 <= np.mean(train) <= 0.75
  assert not any(f for s, f in flags if s != "train")  # val and test keep the rules
  for rel in ("test", "val"):  # their files are those of the ruled world
    assert (swapped.annotations[rel].read_bytes() == ruled.annotations[rel].read_bytes())
  inputs = lambda root: {p.relative_to(root): p.read_bytes()
                         for p in sorted(root.glob("frames/synth_train_*/*/*.jpg"))}
  a, b = inputs(ruled.root), inputs(swapped.root)
  assert a.keys() == b.keys() and sum(a[k] != b[k] for k in a) > 0  # only the targets differ
  assert json.loads((swapped.root / "synthetic.json").read_text())["hand_swap"] == 0.5
  with pytest.raises(ValueError, match="needs combination_rules"):
    Options(hand_swap=0.5)
  with pytest.raises(ValueError, match=r"hand_swap=1.5 must be in \[0, 1\]"):
    Options(combination_rules=True, hand_swap=1.5)


def test_a_swapped_action_draws_the_other_hand_and_destination():
  rng = np.random.default_rng(0)
  obj = Obj("cup", "blue", 0, 1, x=synthetic.COLUMN_X[0], y=synthetic.ROW_Y[1],
            scale=0.24, facing=1)
  scene = _scene(obj)
  rule = synthetic.make_action("pick up", 0, scene, False, Options(combination_rules=True))
  action = synthetic.swap(rule, rng)
  assert (rule.hand, action.hand) == ("left", "right")
  assert action.destination in ("left", "middle") and rule.destination == "right"
  ex = synthetic.render_example(scene, action, SIZE)
  assert ex.description.startswith("The right hand") and ex.meta["hand"] == "right"
  assert f"put it down {synthetic.ON_WORDS[action.destination]}" in ex.description
  bottom = action_region.colour_match(ex.target, scene.sleeve, 30.0)[-SIZE // 6:]
  assert bottom[:, SIZE // 2:].sum() > bottom[:, :SIZE // 2].sum()
  x0, _, x1, _ = ex.meta["bbox_target"]
  want = synthetic.COLUMN_X[synthetic.LOCATIONS.index(action.destination)] * SIZE
  assert abs((x0 + x1) / 2 - want) < 0.1 * SIZE


def test_balance_poses_draws_the_poses_no_held_in_rule_shows_more_often():
  """A swapped pick-up under balance_poses takes any (hand, destination) pose but its rule's,
  with weight 1 / (1 + held-in pick-up rules of that pose): for the demo's held-out world the
  two same-side poses (no held-in rule) twice as often as each of the three others."""
  options = Options(combination_rules=True, holdout=HOLDOUT, hand_swap=0.5, balance_poses=True)
  obj = Obj("cup", "blue", 0, 1, x=synthetic.COLUMN_X[0], y=synthetic.ROW_Y[1],
            scale=0.24, facing=1)
  rule = synthetic.make_action("pick up", 0, _scene(obj), False, options)
  assert (rule.hand, rule.destination) == ("left", "right")
  rng = np.random.default_rng(0)
  drawn = collections.Counter((a.hand, a.destination)
                              for a in (synthetic.swap(rule, rng, options) for _ in range(7000)))
  assert ("left", "right") not in drawn and len(drawn) == 5
  for pose, want in {("left", "left"): 2 / 7, ("right", "right"): 2 / 7, ("left", "middle"): 1 / 7,
                     ("right", "left"): 1 / 7, ("right", "middle"): 1 / 7}.items():
    assert abs(drawn[pose] / 7000 - want) < 0.02, (pose, drawn)
  # Other verbs swap as without it: the other hand.
  stir = synthetic.make_action("stir", 0, _scene(Obj("pan", "red", 0, 1, 0.2, 0.67, 0.2, 1)),
                               False, options)
  assert synthetic.swap(stir, rng, options).hand != stir.hand
  # Without swaps it changes nothing, and the plain world's settings stay as they were.
  assert Options(combination_rules=True, balance_poses=True).stamp() == {"combination_rules": True}
  assert prepare.synthetic_options(config_lib.load("configs/tiny.py").data.synthetic).balance_poses


def test_balance_poses_puts_the_held_out_pick_ups_poses_in_the_training_pairs(tmp_path):
  """Only the swapped pick-ups change; in the training pairs the same-side poses go from a few
  percent of the pick-ups to about as many as the others, and the files say so."""
  counts = {"train": 240, "val": 4, "test": 8}
  write = lambda name, balance: synthetic.write_release(
      tmp_path / name, counts, seed=3, size=32, progress=False, objects=(1, 1),
      options=Options(combination_rules=True, holdout=HOLDOUT, hand_swap=0.5,
                      balance_poses=balance))
  before, after = write("before", False), write("after", True)
  metas = [json.loads(f.metadata.read_text()) for f in (before, after)]
  notes = json.loads(after.annotations["train"].read_text())
  poses = [collections.Counter(), collections.Counter()]
  for clip, m in metas[1].items():
    for action_id, a in m["actions"].items():
      mm, old = a["meta"], metas[0][clip]["actions"][action_id]["meta"]
      if not (mm["swapped"] and mm["verb"] == "pick up"):
        assert mm == old  # the same pair, byte for byte
        continue
      assert (mm["hand"], mm["destination"]) != synthetic.RULES[mm["combination"]]
      text = notes[clip][action_id]["llava_forecast_finetune"]
      assert text.startswith(f"The {mm['hand']} hand")
      assert f"put it down {synthetic.ON_WORDS[mm['destination']]}" in text
  for i, meta in enumerate(metas):
    for clip, m in meta.items():
      for a in m["actions"].values():
        if clip.startswith("synth_train") and a["meta"]["verb"] == "pick up":
          poses[i][(a["meta"]["hand"], a["meta"]["destination"])] += 1
  same_side = lambda c: c[("left", "left")] + c[("right", "right")]
  total = sum(poses[0].values())
  assert total == sum(poses[1].values()) > 60
  assert same_side(poses[0]) / total < 0.15 < 0.2 < same_side(poses[1]) / total
  for rel in ("test", "val"):
    assert after.annotations[rel].read_bytes() == before.annotations[rel].read_bytes()
  assert after.llava["train"].read_bytes() == before.llava["train"].read_bytes()
  assert json.loads((after.root / "synthetic.json").read_text())["balance_poses"] is True


def test_push_shows_every_kind_but_the_drawer_carried_in_the_training_pairs(tmp_path):
  """Options.push: pushes of every kind but the drawer join the pairs (the kinds whose pick-up is
  held out included), the instruction frames cycle through all 17 combinations, and the setting
  is stamped; without combination rules it is refused."""
  options = Options(combination_rules=True, holdout=HOLDOUT, num_instruction=17, push=True)
  counts = {"train": 80, "val": 4, "test": 16}
  files = synthetic.write_release(tmp_path / "raw", counts, seed=3, size=32, progress=False,
                                  objects=(1, 1), options=options)
  meta = json.loads(files.metadata.read_text())
  train = collections.Counter(
      a["meta"]["combination"] for clip, m in meta.items() if clip.startswith("synth_train")
      for a in m["actions"].values())
  assert {"push pan", "push carrot"} <= set(train) and not set(HOLDOUT) & set(train)
  extra = [r for r in json.loads(files.llava["train"].read_text())
           if r["id"].startswith("synth_instruct_")]
  assert collections.Counter(r["combination"] for r in extra) == {
      c: 1 for c in synthetic.COMBINATIONS + synthetic.PUSH_COMBINATIONS}
  assert json.loads((files.root / "synthetic.json").read_text())["push"] is True
  with pytest.raises(ValueError, match="push needs combination_rules"):
    Options(push=True)
  with pytest.raises(ValueError, match="'push drawer'"):
    Options(combination_rules=True, push=True, holdout=("push drawer",))


def test_more_test_frames_keep_the_first_ones():
  """The demo's test split can grow (data.synthetic.num_test) without changing the frames it
  had: scenes come from per-(seed, split, index) streams, and a scene cut short at the end of a
  smaller split draws the same first action. The shipped checkpoints rely on this
  (shipped.EVALUATION_ONLY)."""
  on = prepare.synthetic_options(config_lib.load("configs/tiny.py").data.synthetic)
  big = list(synthetic.generate_split("test", 24, 0, 32, (1, 1), on))
  for n in (5, 11, 23):
    small = list(synthetic.generate_split("test", n, 0, 32, (1, 1), on))
    assert len(small) == n
    for (clip_a, k_a, a), (clip_b, k_b, b) in zip(small, big):
      assert (clip_a, k_a, a.action, a.meta) == (clip_b, k_b, b.action, b.meta)
      np.testing.assert_array_equal(a.target, b.target)
