"""Annotation / LLaVA JSON faults: repeated keys and ids are counted by name, never silently
merged; text that cannot be stored (a lone surrogate) makes its record bad, not the conversion.
A clip given twice in the metadata JSON stops prepare-data with one line naming clip and file."""

import io
import json

import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import lego_json, llava_json, tfds_builder, videos
from data_prep.lego_json import ConversionError
from lego_jax.errors import DataError
from lego_jax.data import records

tfds.display_progress_bar(False)


def _frames(tmp_path, names):
  for name in names:
    p = tmp_path / "frames" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (20 * len(name), 90, 40)).save(buf, "JPEG")
    p.write_bytes(buf.getvalue())
  return tmp_path / "frames"


def _entry(n, action="#C C opens the drawer"):
  return (f'{{"image_0": "{n}.jpg", "image_1": "{n}.jpg", "action": "{action}", '
          f'"llava_forecast_finetune": "hand {n}"}}')


# Written as text: a dict cannot hold the repeated keys this file is about.
ANNOTATION = ('{"c1": {"a1": ' + _entry(1) + ', "a2": ' + _entry(2) + ', "a1": ' + _entry(3)
              + '}, "c2": {"b1": ' + _entry(4) + '}, "c2": {"b2": ' + _entry(5)
              + ', "b3": ' + _entry(6, "#C C cuts \\ud800 the onion") + '}, "c3": {"x": '
              + '{"image_0": "7.jpg", "image_1": "7.jpg", "action": "#C C a", "action": "#C C b"}'
              + '}}')


def _convert(tmp_path, kind, entries, load, max_bad):
  inp = tfds_builder.SplitInput(entries, load, "ann.json")
  return tfds_builder.convert(tmp_path / f"rec{max_bad}", kind, {"train": inp}, num_shards=1,
                              workers=1, max_bad_fraction=max_bad, fingerprint={"test": 1})


def test_repeated_action_ids_fields_and_surrogates_are_counted_by_name(tmp_path):
  frames = _frames(tmp_path, [f"{i}.jpg" for i in range(1, 8)])
  path = tmp_path / "ann.json"
  path.write_text(ANNOTATION)
  entries = lego_json.pair_entries(lego_json.read_json(path, "annotation JSON"), str(path))
  # Every copy is an entry: c1/a1 twice, both copies of clip c2 contribute.
  assert [e.id for e in entries] == ["c1/a1", "c1/a1", "c1/a2", "c2/b1", "c2/b2", "c2/b3",
                                     "c3/x"]
  load = lambda e: lego_json.load_pair(e, frames, {}, "ego4d")  # noqa: E731
  with pytest.raises(ConversionError, match="c1/a1: duplicate id"):
    _convert(tmp_path, records.PAIRS, entries, load, 0.0)
  result = _convert(tmp_path, records.PAIRS, entries, load, 0.5)
  assert result.num_records == {"train": 4} and result.num_bad == {"train": 3}
  bad = "\n".join(result.bad["train"])
  assert "c1/a1: duplicate id" in bad
  assert "c2/b3: field 'action' is not valid Unicode text" in bad
  assert "c3/x: field(s) ['action'] given more than once" in bad
  src = records.open_split(tmp_path / "rec0.5", "train")
  got = {r["id"]: r["input_jpeg"] for r in map(records.to_python, (src[i] for i in range(4)))}
  assert sorted(got) == ["c1/a1", "c1/a2", "c2/b1", "c2/b2"]
  assert got["c1/a1"] == (frames / "1.jpg").read_bytes()   # the first copy, not the last

  # Instructions derived from the same annotation are bad for the same records.
  derived = llava_json.from_annotation(entries, "ego4d")
  inst = _convert(tmp_path / "i", records.INSTRUCT, llava_json.instruct_entries(derived, "d"),
                  lambda e: llava_json.load_instruct(e, frames), 0.5)
  assert inst.num_records == {"train": 4} and inst.num_bad == {"train": 3}


def test_llava_repeated_ids_keys_and_surrogates_are_counted_by_name(tmp_path):
  frames = _frames(tmp_path, ["1.jpg"])
  turns = '[{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "%s"}]'
  rec = '{"id": "%s", "image": "1.jpg", "conversations": ' + turns + '}'
  text = ("[" + ", ".join([rec % ("r1", "ok"), rec % ("r2", "ok"), rec % ("r1", "again"),
                           rec % ("r3", "bad \\udc80 text"),
                           '{"id": "r4", "id": "r5", "image": "1.jpg", "conversations": '
                           + turns % "x" + "}"]) + "]")
  path = tmp_path / "llava.json"
  path.write_text(text)
  entries = llava_json.instruct_entries(lego_json.read_json(path, "LLaVA JSON"), str(path))
  result = _convert(tmp_path, records.INSTRUCT, entries,
                    lambda e: llava_json.load_instruct(e, frames), 0.8)
  assert result.num_records == {"train": 2} and result.num_bad == {"train": 3}
  bad = "\n".join(result.bad["train"])
  assert "r1: duplicate id" in bad
  assert "record r3: field 'conversations[1].value' is not valid Unicode text" in bad
  assert "record #4: field(s) ['id'] given more than once" in bad
  json.dumps(result.bad)   # the messages themselves are storable


def test_repeated_description_keys_are_a_usage_error(tmp_path):
  path = tmp_path / "desc.json"
  path.write_text('{"c": {"a1": {"llava_forecast_finetune": "x"}, '
                  '"a1": {"llava_forecast_finetune": "y"}}}')
  with pytest.raises(videos.UsageError, match=r"desc.json: key\(s\) \['a1'\] given twice"):
    videos.read_descriptions(path)
  path.write_text('{"c": {"a1": {"llava_forecast_finetune": "x"}}}')
  assert videos.read_descriptions(path) == {"c": {"a1": {"llava_forecast_finetune": "x"}}}


def test_a_clip_given_twice_in_the_metadata_is_one_line_exit_1(tmp_path, capsys):
  from lego_jax import cli

  frames = _frames(tmp_path, ["1.jpg"])
  ann = tmp_path / "ann.json"
  ann.write_text('{"c1": {"a1": ' + _entry(1) + '}}')
  meta = tmp_path / "meta.json"
  meta.write_text('{"c1": {"height": 12, "width": 16}, "c2": {"height": 9, "width": 9}, '
                  '"c1": {"height": 24, "width": 32}}')
  work = tmp_path / "work"
  with pytest.raises(SystemExit) as e:
    cli.run(["lego-jax", "prepare-data", f"--workdir={work}", "--config.data.source=lego_json",
             f"--config.data.annotation_train={ann}", f"--config.data.frames_dir={frames}",
             f"--config.data.metadata={meta}", "--config.data.instructions=released_vllm_outputs"])
  err = capsys.readouterr().err
  assert e.value.code == 1, err
  assert [line for line in err.splitlines() if line.strip()] == [
      f"lego-jax prepare-data: error: metadata JSON {meta}: clip 'c1' is given 2 times "
      "(one entry per clip)"]
  assert not (work / "records").exists() and not (work / "tokenizer").exists()
  # A field given twice within one clip: named too, before any record is read.
  meta.write_text('{"c1": {"height": 12, "width": 16, "height": 24}}')
  with pytest.raises(DataError, match=f"metadata JSON {meta}: clip 'c1' gives 'height' more "):
    lego_json.read_metadata(meta)
  meta.write_text('{"c1": {"height": 12, "width": 16}, "c2": {"height": 9, "width": 9}}')
  assert lego_json.read_metadata(meta) == {"c1": {"height": 12, "width": 16},
                                           "c2": {"height": 9, "width": 9}}
