"""Release files -> ArrayRecord (TFDS, no tensorflow) -> data source: round trips, bad inputs."""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import lego_json, llava_json, tfds_builder
from data_prep.lego_json import ConversionError
from lego_jax.data import records
from lego_jax.data.prompts import human_turn

tfds.display_progress_bar(False)


def _jpeg(rgb=(200, 30, 30), size=(24, 16), mode="RGB") -> bytes:
  buf = io.BytesIO()
  Image.new(mode, size, rgb).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def _palette_png(rgb) -> bytes:
  img = Image.new("P", (12, 8), 0)
  img.putpalette(list(rgb) + [0] * 765)
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def _convert(tmp_path, annotation, *, metadata=None, max_bad=0.0, shards=2, workers=1,
             splits=("train",), out="rec", dataset="ego4d"):
  frames = tmp_path / "frames"
  entries = lego_json.pair_entries(annotation, "ann.json")
  inp = tfds_builder.SplitInput(
      entries, lambda e: lego_json.load_pair(e, frames, metadata or {}, dataset), "ann.json")
  return tfds_builder.convert(tmp_path / out, records.PAIRS, {s: inp for s in splits},
                              num_shards=shards, workers=workers, max_bad_fraction=max_bad,
                              fingerprint={"test": 1})


def _write(tmp_path, rel, data: bytes):
  p = tmp_path / "frames" / rel
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data)
  return rel


def _entry(i0, i1, action="#C C opens the drawer", desc="The left hand pulls."):
  return {"image_0": i0, "image_1": i1, "action": action, "llava_forecast_finetune": desc}


def _read_all(records_dir, split="train", kind=records.PAIRS):
  src = records.open_split(records_dir, split, kind)
  return [records.to_python(src[i]) for i in range(len(src))]


def test_round_trip_keeps_bytes_strings_and_order(tmp_path):
  ann, expected = {}, []
  for k in range(5):
    a = _write(tmp_path, f"clip{k}/0/0001.jpg", _jpeg((40 * k, 100, 200), size=(30 + k, 20)))
    b = _write(tmp_path, f"clip{k}/0/0031.jpg", _jpeg((10, 40 * k, 90)))
    ann[f"clip{k}"] = {"0": _entry(a, b, f"#C C cuts the carrot {k}", f"desc {k}")}
    expected.append((f"clip{k}/0", a, b, k))
  mask = np.zeros((20, 30), np.uint8)
  mask[2:5, 3:9] = 255
  _write(tmp_path, "clip1/0/mask.png", _png(mask))
  metadata = {"clip1": {"height": 1080, "width": 1620,
                        "actions": {"0": {"mask": "clip1/0/mask.png", "meta": {"verb": "cut"}}}}}
  result = _convert(tmp_path, ann, metadata=metadata, shards=3, workers=2)
  assert not result.skipped and result.num_records == {"train": 5}
  assert len(list(result.path.glob("lego-train.array_record-*"))) == 3
  recs = _read_all(tmp_path / "rec")
  assert [r["id"] for r in recs] == [e[0] for e in expected]  # annotation order
  for r, (rid, a, b, k) in zip(recs, expected):
    assert r["input_jpeg"] == (tmp_path / "frames" / a).read_bytes()  # RGB JPEG kept as is
    assert r["target_jpeg"] == (tmp_path / "frames" / b).read_bytes()
    assert r["raw_action"] == f"#C C cuts the carrot {k}"
    assert r["action"] == f"cut the carrot {k}"
    assert r["description"] == f"desc {k}"
    if k == 1:
      assert (r["height"], r["width"]) == (1080, 1620)  # from the metadata JSON
      assert r["mask_png"] == (tmp_path / "frames/clip1/0/mask.png").read_bytes()
      assert json.loads(r["meta"]) == {"verb": "cut"}
    else:
      assert (r["height"], r["width"]) == (20, 30 + k)  # from the frame itself
      assert r["mask_png"] == b"" and r["meta"] == "{}"
  # The registered builder name reads the same files.
  ds = tfds.data_source("lego/pairs", data_dir=str(tmp_path / "rec"), split="train")
  assert len(ds) == 5 and ds[3]["id"] == b"clip3/0"


def test_epic_labels_verbatim(tmp_path):
  a = _write(tmp_path, "c/0/1.jpg", _jpeg())
  _convert(tmp_path, {"c": {"0": _entry(a, a, "open cupboard")}}, dataset="epickitchens")
  assert _read_all(tmp_path / "rec")[0]["action"] == "open cupboard"


def test_odd_image_modes_become_rgb_jpeg(tmp_path):
  grey16 = np.full((8, 12), 32896, np.uint16)  # 0x8080: mid-grey in 16 bits
  rgba = np.zeros((8, 12, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, 255
  rgba[:, :6, 3] = 0  # left half transparent -> black
  cases = {
      "grey.jpg": (_jpeg(90, mode="L", size=(12, 8)), (90, 90, 90)),
      "cmyk.jpg": (_jpeg((0, 255, 255, 0), mode="CMYK", size=(12, 8)), (255, 0, 0)),
      "rgba.png": (_png(rgba), (200, 0, 0)),
      "grey16.png": (_png(grey16), (128, 128, 128)),
      "palette.png": (_palette_png((30, 60, 250)), (30, 60, 250)),
  }
  ann = {}
  for name, (data, _) in cases.items():
    rel = _write(tmp_path, f"{name}/0/x.img", data)
    ann[name] = {"0": _entry(rel, rel)}
  _convert(tmp_path, ann)
  recs = {r["id"].split("/")[0]: r for r in _read_all(tmp_path / "rec")}
  for name, (_, rgb) in cases.items():
    img = Image.open(io.BytesIO(recs[name]["input_jpeg"]))
    assert img.format == "JPEG" and img.mode == "RGB", name
    arr = np.asarray(img).astype(int)
    assert np.abs(arr[:, -3:] - rgb).max() <= 6, (name, arr[0, -1])
    assert (recs[name]["height"], recs[name]["width"]) == (8, 12)
  rgba_arr = np.asarray(Image.open(io.BytesIO(recs["rgba.png"]["input_jpeg"]))).astype(int)
  assert rgba_arr[:, :3].max() <= 12  # transparent pixels composited over black


def test_bad_records_are_counted_skipped_and_named(tmp_path):
  good = _write(tmp_path, "g/0/1.jpg", _jpeg())
  truncated = _write(tmp_path, "t/0/1.jpg", _jpeg()[:200])
  garbage = _write(tmp_path, "x/0/1.jpg", b"not an image at all")
  ann = {
      "g": {str(k): _entry(good, good) for k in range(6)},
      "missing": {"0": _entry("missing/0/nope.jpg", good)},
      "trunc": {"0": _entry(truncated, good)},
      "garbage": {"0": _entry(good, garbage)},
      "nofield": {"0": {"image_0": good, "action": "#C C opens it"}},
      "notdict": ["a", "list"],
      "empty_action": {"0": _entry(good, good, action="   ")},
  }
  result = _convert(tmp_path, ann, max_bad=0.5)
  assert result.num_records == {"train": 6} and result.num_bad == {"train": 6}
  msgs = "\n".join(result.bad["train"])
  assert "missing/0: image_0 file missing" in msgs and "nope.jpg" in msgs
  assert "trunc/0: image_0" in msgs and "cannot decode image" in msgs
  assert "garbage/0: image_1" in msgs
  assert "nofield/0: missing field(s) ['image_1']" in msgs
  assert "notdict/?: expected an object" in msgs
  assert "empty_action/0: field 'action' is empty" in msgs
  assert records.build_metadata(tmp_path / "rec")["num_bad"] == {"train": 6}


def test_too_many_bad_records_fail_without_complete_looking_output(tmp_path):
  good = _write(tmp_path, "g/0/1.jpg", _jpeg())
  ann = {"g": {str(k): _entry(good, good) for k in range(9)},
         "bad": {"0": _entry("gone.jpg", good), "1": _entry("gone2.jpg", good)}}
  with pytest.raises(ConversionError, match=r"2 of 11 records are bad.*max_bad_fraction=0.1") as e:
    _convert(tmp_path, ann, max_bad=0.1, splits=("train", "test"))
  assert "bad/0: image_0 file missing" in str(e.value)
  assert not records.is_complete(tmp_path / "rec", records.PAIRS)
  leftovers = [p for p in (tmp_path / "rec").rglob("*") if p.is_file()]
  assert not [p for p in leftovers if "array_record" in p.name or p.name == "dataset_info.json"]
  # With the allowance raised, the same input converts.
  result = _convert(tmp_path, ann, max_bad=0.2)
  assert result.num_records == {"train": 9}


def test_empty_split_and_broken_json_are_errors(tmp_path):
  with pytest.raises(ConversionError, match="split 'train' is empty: ann.json has no records"):
    _convert(tmp_path, {})
  bad_json = tmp_path / "broken.json"
  bad_json.write_text('{"clip": {"0": ')
  with pytest.raises(ConversionError, match="broken.json is not valid JSON"):
    lego_json.read_json(bad_json, "train annotation JSON")
  with pytest.raises(FileNotFoundError, match="train annotation JSON not found"):
    lego_json.read_json(tmp_path / "nope.json", "train annotation JSON")
  with pytest.raises(ConversionError, match="expected a JSON object"):
    lego_json.pair_entries([1, 2], "list.json")


def test_rerun_is_skipped_and_other_inputs_refused(tmp_path):
  a = _write(tmp_path, "c/0/1.jpg", _jpeg())
  ann = {"c": {"0": _entry(a, a)}}
  first = _convert(tmp_path, ann)
  shard = next(first.path.glob("lego-train.array_record-*"))
  stamp = shard.stat().st_mtime_ns
  second = _convert(tmp_path, ann)
  assert second.skipped and second.num_records == {"train": 1}
  assert shard.stat().st_mtime_ns == stamp
  with pytest.raises(ConversionError, match="written from other inputs"):
    tfds_builder.convert(tmp_path / "rec", records.PAIRS, {}, num_shards=2, workers=1,
                         max_bad_fraction=0.0, fingerprint={"test": 2})


def test_llava_conversations_and_derived_instructions(tmp_path):
  img = _write(tmp_path, "c/0/1.jpg", _jpeg())
  good = {"id": "c/0", "image": img, "conversations": [
      {"from": "human", "value": human_turn("cut the carrot")},
      {"from": "gpt", "value": "The right hand cuts."}]}
  conv = [good,
          {"id": "noimg", "image": img, "conversations": [
              {"from": "human", "value": "How?"}, {"from": "gpt", "value": "x"}]},
          {"id": "threeturns", "image": img, "conversations": good["conversations"] * 2},
          {"id": "c/0", "image": img, "conversations": good["conversations"]},  # duplicate
          {"image": img}]
  frames = tmp_path / "frames"
  inp = tfds_builder.SplitInput(llava_json.instruct_entries(conv, "llava.json"),
                                lambda e: llava_json.load_instruct(e, frames), "llava.json")
  result = tfds_builder.convert(tmp_path / "rec", records.INSTRUCT, {"train": inp}, num_shards=1,
                                workers=1, max_bad_fraction=0.9, fingerprint={})
  assert result.num_records == {"train": 1} and result.num_bad == {"train": 4}
  msgs = "\n".join(result.bad["train"])
  assert "record noimg: human turn has no <image> placeholder" in msgs
  assert "record threeturns: 'conversations' must be one human turn then one gpt turn" in msgs
  assert "c/0: duplicate id" in msgs
  assert "record #4: missing field(s) ['id', 'conversations']" in msgs
  (r,) = _read_all(tmp_path / "rec", kind=records.INSTRUCT)
  assert r == {"id": "c/0", "image_jpeg": (frames / img).read_bytes(),
               "prompt": "<image>\nHow does the person properly cut the carrot that is displayed "
                         "in the video frame?", "answer": "The right hand cuts."}
  # A release without LLaVA files: the same records come from the annotation JSON.
  entries = lego_json.pair_entries(
      {"c": {"0": _entry(img, img, "#C C cuts the carrot", "The right hand cuts."),
             "1": _entry(img, img, "#C C cuts the carrot", "")}}, "ann.json")
  derived = llava_json.from_annotation(entries, "ego4d")
  assert derived == [good]  # the action without a description has no instruction example
