"""The synthetic scene generator: deterministic, release-format, and image-dependent."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.ego4d_text import normalise_narration
from lego_jax.data import synthetic
from lego_jax.data.prompts import human_turn
from lego_jax.data.synthetic import Action, Obj, Scene

SIZE = 48


def _scene(*objects: Obj) -> Scene:
  return Scene(objects=list(objects), table=(150, 104, 66), wall=(214, 218, 212),
               skin=(224, 172, 138), sleeve=(70, 70, 78), resting=(False, False),
               brightness=1.0, noise_seed=1)


def _obj(kind, colour, column, row=1, facing=1) -> Obj:
  return Obj(kind, colour, column, row, x=synthetic.COLUMN_X[column], y=synthetic.ROW_Y[row],
             scale=0.24 * synthetic.ROW_SCALE[row], facing=facing)


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes(tmp_path):
  counts = {"train": 6, "val": 0, "test": 3}
  a = synthetic.write_release(tmp_path / "a", counts, seed=5, size=32, progress=False)
  b = synthetic.write_release(tmp_path / "b", counts, seed=5, size=32, progress=False)
  c = synthetic.write_release(tmp_path / "c", counts, seed=6, size=32, progress=False)
  fa, fb, fc = _files(a.root), _files(b.root), _files(c.root)
  assert len(fa) > 20 and fa == fb
  jpegs = [k for k in fa if k.endswith(".jpg")]
  assert any(fa[k] != fc.get(k) for k in jpegs)
  assert not (tmp_path / "a.incomplete").exists()
  # A second call with the same settings keeps the files; other settings are refused.
  synthetic.write_release(tmp_path / "a", counts, seed=5, size=32, progress=False)
  assert _files(a.root) == fa
  try:
    synthetic.write_release(tmp_path / "a", counts, seed=7, size=32, progress=False)
  except FileExistsError as e:
    assert "other settings" in str(e)
  else:
    raise AssertionError("changed settings were not detected")


def test_release_format_files(tmp_path):
  files = synthetic.write_release(tmp_path / "raw", {"train": 7, "test": 2}, seed=0, size=32,
                                  progress=False)
  assert sorted(files.annotations) == ["test", "train"]
  ann = json.loads(files.annotations["train"].read_text())
  entries = [(clip, aid, e) for clip, acts in ann.items() for aid, e in acts.items()]
  assert len(entries) == 7
  meta = json.loads(files.metadata.read_text())
  llava = json.loads(files.llava["train"].read_text())
  assert [r["id"] for r in llava] == [f"{c}/{a}" for c, a, _ in entries]
  for (clip, aid, e), conv in zip(entries, llava):
    assert set(e) == {"image_0", "image_1", "action", "llava_forecast_finetune"}
    assert e["image_0"].startswith(f"{clip}/{aid}/") and e["image_0"].endswith(".jpg")
    for key in ("image_0", "image_1"):
      img = Image.open(files.frames_dir / e[key])
      assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    assert meta[clip]["height"] == meta[clip]["width"] == 32
    mask = Image.open(files.frames_dir / meta[clip]["actions"][aid]["mask"])
    assert mask.mode == "L" and mask.size == (32, 32)
    action = normalise_narration(e["action"])
    assert conv["image"] == e["image_0"]
    assert conv["conversations"] == [{"from": "human", "value": human_turn(action)},
                                     {"from": "gpt", "value": e["llava_forecast_finetune"]}]
    assert conv["conversations"][0]["value"].startswith(
        "<image>\nHow does the person properly ")


def test_narrations_normalise_to_the_action_text():
  exs = [e for _, _, e in synthetic.generate_split("train", 40, 0, 32)]
  narrated = [e for e in exs if e.raw_action.startswith("#C C ")]
  assert 5 < len(narrated) < 35
  for e in exs:
    assert normalise_narration(e.raw_action) == e.action


def test_vocabulary_is_covered_and_small():
  exs = [e for _, _, e in synthetic.generate_split("train", 300, 1, 16)]
  verbs = collections.Counter(e.meta["verb"] for e in exs)
  assert set(verbs) == {"pick up", "cut", "open", "stir", "wipe"}
  assert {e.meta["target"] for e in exs} == set(synthetic.KINDS)
  assert {e.meta["location"] for e in exs} == set(synthetic.LOCATIONS)
  assert {e.meta["hand"] for e in exs} == {"left", "right"}
  words = {w for e in exs for w in (e.action + " " + e.description).lower().split()}
  assert len(words) < 120


def test_same_action_at_other_locations_gets_other_descriptions_and_targets():
  outs = []
  for column in range(3):
    scene = _scene(_obj("cup", "red", column, facing=1), _obj("bowl", "blue", (column + 1) % 3))
    hand = synthetic.choose_hand(scene.objects[0])
    outs.append(synthetic.render_example(scene, Action("pick up", 0, hand, False), SIZE))
  assert {o.action for o in outs} == {"pick up the red cup"}
  assert len({o.description for o in outs}) == 3
  assert "left side" in outs[0].description and "The left hand" in outs[0].description
  assert "middle" in outs[1].description and "The right hand" in outs[1].description
  assert "right side" in outs[2].description and "The right hand" in outs[2].description
  # A handle facing away from the hand changes the grip the description reports.
  assert "around its body" in outs[0].description and "by its handle" in outs[2].description
  assert not np.array_equal(outs[0].target, outs[2].target)
  # Mirror image of the middle case: the handle decides the hand.
  left_handle = _scene(_obj("cup", "red", 1, facing=-1))
  assert synthetic.choose_hand(left_handle.objects[0]) == "left"


def _near(img: np.ndarray, rgb, tol: float) -> np.ndarray:
  return np.linalg.norm(img.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1) < tol


def _crop(img, box):
  x0, y0, x1, y1 = box
  return img[y0:y1, x0:x1]


def test_target_frame_shows_the_action_and_the_metadata_locates_it():
  cases = [("pick up", _obj("sponge", "blue", 0)), ("cut", _obj("carrot", "orange", 2)),
           ("open", _obj("drawer", "green", 1, row=0)), ("stir", _obj("bowl", "purple", 0)),
           ("wipe", _obj("sponge", "red", 2))]
  for verb, target in cases:
    other = _obj("cup", "yellow", (target.column + 1) % 3)
    scene = _scene(target, other)
    ex = synthetic.render_example(
        scene, Action(verb, 0, synthetic.choose_hand(target), False), SIZE)
    m = ex.meta
    assert (m["verb"], m["target"], m["colour"], m["location"]) == (
        verb, target.kind, target.colour, target.location)
    mask = ex.mask > 0
    assert 0.02 < mask.mean() < 0.6, verb
    # The action changes the target object's region and the acting hand is where meta says.
    assert _crop(mask, m["bbox_input"]).mean() > 0.15, verb
    assert _near(_crop(ex.target, m["hand_bbox"]), m["hand_rgb"], 40).mean() > 0.25, verb
    assert _near(_crop(ex.input, m["hand_bbox"]), m["hand_rgb"], 40).mean() < 0.1, verb
    # The object's colour is inside its input bbox; the other object is untouched.
    assert _near(_crop(ex.input, m["bbox_input"]), m["colour_rgb"], 60).mean() > 0.2, verb
    ob = m["objects"][1]["bbox"]
    assert _crop(mask, ob).mean() < 0.5 * _crop(mask, m["bbox_input"]).mean() + 0.05, verb


def test_two_actions_of_one_clip_share_the_input_frame():
  clips = collections.defaultdict(list)
  for clip, aid, ex in synthetic.generate_split("val", 30, 2, 32):
    clips[clip].append(ex)
  pairs = [v for v in clips.values() if len(v) == 2]
  assert pairs, "no scene with two actions"
  for a, b in pairs:
    assert np.array_equal(a.input, b.input)
    assert a.action != b.action and not np.array_equal(a.target, b.target)
  assert sum(len(v) for v in clips.values()) == 30


def test_objects_per_scene_is_a_setting():
  """`objects=(lo, hi)` bounds the objects of every scene; the default stream is unchanged."""
  seen = set()
  for i in range(40):
    scene = synthetic.sample_scene(synthetic.scene_rng(0, "train", i), (1, 2))
    seen.add(len(scene.objects))
  assert seen == {1, 2}
  for i in range(10):  # the default range draws exactly what the generator always drew
    a = synthetic.sample_scene(synthetic.scene_rng(3, "val", i))
    b = synthetic.sample_scene(synthetic.scene_rng(3, "val", i), (2, 4))
    assert [(o.kind, o.colour, o.column) for o in a.objects] == \
        [(o.kind, o.colour, o.column) for o in b.objects]
  exs = [e for _, _, e in synthetic.generate_split("test", 12, 0, 16, objects=(1, 1))]
  assert all(len(e.meta["objects"]) == 1 for e in exs)
  with pytest.raises(ValueError, match="objects"):
    list(synthetic.generate_split("test", 1, 0, 16, objects=(0, 2)))
