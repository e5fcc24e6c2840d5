"""`prepare-data` end to end on a small synthetic set, its config checks, and `show-data`."""

import importlib
import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl.testing import flagsaver
from PIL import Image

from data_prep.lego_json import ConversionError
from lego_jax import config
from lego_jax.data import pipeline, prepare, prompts, records, show, tokenizer
from lego_jax.data.prompts import human_turn

importlib.import_module("lego_jax.cli")  # defines the shared --split / --out flags show-data reads

tfds.display_progress_bar(False)


def _cfg(**data):
  cfg = config.load("tiny")
  # The plain world (pairs and instruction records one to one); tests/data/test_synthetic_heldout.py
  # covers the held-out-combinations world configs/tiny.py runs.
  cfg.data.synthetic.update(num_train=10, num_val=3, num_test=4, frame_size=32,
                            combination_rules=False, holdout=(), num_instruction=0,
                            hand_swap=0.0)
  cfg.data.update({"num_shards": 2, "num_workers": 2, "tokenizer_vocab_size": 256, **data})
  return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("work")
  return workdir, prepare.prepare(_cfg(), workdir)


def test_prepare_writes_release_files_records_and_tokenizer(prepared):
  workdir, summary = prepared
  raw = workdir / "raw"
  for name in ("lego_train.json", "lego_val.json", "lego_test.json", "llava_train.json",
               "metadata.json"):
    assert (raw / name).is_file(), name
  assert summary["pairs"]["num_records"] == {"train": 10, "val": 3, "test": 4}
  assert summary["instruct"]["num_records"] == {"train": 10, "val": 3, "test": 4}
  assert summary["pairs"]["num_bad"] == {"train": 0, "val": 0, "test": 0}
  rec = workdir / "records"
  assert records.split_names(rec) == ["train", "val", "test"]
  assert json.loads((rec / "prepare_summary.json").read_text()) == summary

  ann = json.loads((raw / "lego_train.json").read_text())
  flat = [(f"{c}/{a}", e) for c, acts in ann.items() for a, e in acts.items()]
  pairs = records.open_split(rec, "train")
  instruct = records.open_split(rec, "train", records.INSTRUCT)
  for i, (rid, e) in enumerate(flat):
    r, q = records.to_python(pairs[i]), records.to_python(instruct[i])
    assert r["id"] == q["id"] == rid
    assert r["raw_action"] == e["action"] and not r["action"].startswith("#")
    assert r["description"] == e["llava_forecast_finetune"] == q["answer"]
    assert r["input_jpeg"] == (raw / "frames" / e["image_0"]).read_bytes()
    assert q["prompt"] == human_turn(r["action"])
    meta = records.read_meta(r)
    assert meta["target"] in r["action"] and meta["colour"] in r["action"]
    mask = np.asarray(Image.open(io.BytesIO(r["mask_png"])))
    assert mask.shape == (32, 32) and mask.max() == 255
  assert any(r.startswith("#C C ") for _, e in flat for r in [e["action"]])

  tok = tokenizer.load_tokenizer(workdir / "tokenizer")
  assert tok.vocab_size == 256 and tok.bos_id == 1
  assert 0 not in tok.encode(records.to_python(pairs[0])["description"])
  assert len(prepare.corpus(rec)) == 10 + 10 + 10  # train only: actions, descriptions, chats
  # A whole held-out instruction example (chat prompt, image tokens, answer, EOS) fits the tiny
  # VLLM's max_length.
  cfg = _cfg()
  n_image = (cfg.clip_vision.image_size // cfg.clip_vision.patch_size) ** 2
  test = records.open_split(rec, "test", records.INSTRUCT)
  for i in range(len(test)):
    q = records.to_python(test[i])
    n = (len(tok.encode_with_image(prompts.chat_prompt(q["prompt"]))) - 1 + n_image
         + len(tok.encode(" " + q["answer"], bos=False, eos=True)))
    assert n <= cfg.vllm_train.max_length
  batches = list(pipeline.eval_pairs(_cfg(num_workers=0), workdir, 3, split="test"))
  assert [len(b["id"]) for b in batches] == [3, 1]  # one ordered pass, nothing dropped
  assert batches[0]["input"].shape == (3, 64, 64, 3)
  assert batches[0]["clip_input"].shape == (3, 32, 32, 3)
  assert not batches[0]["flipped"].any()


def test_rerun_skips_and_changed_inputs_are_refused(prepared):
  workdir, _ = prepared
  model = workdir / "tokenizer" / "tokenizer.model"
  stamp = model.stat().st_mtime_ns
  again = prepare.prepare(_cfg(), workdir)
  assert again["pairs"]["skipped"] and again["instruct"]["skipped"]
  assert model.stat().st_mtime_ns == stamp
  with pytest.raises(ConversionError, match="written from other inputs.*num_shards"):
    prepare.prepare(_cfg(num_shards=3), workdir)
  cfg = _cfg()
  cfg.data.synthetic.seed = 1
  with pytest.raises(FileExistsError, match="synthetic data made with other settings"):
    prepare.prepare(cfg, workdir)


def test_release_path_gives_the_same_records(prepared, tmp_path):
  """The default job's raw files run through source="lego_json", like a user's release."""
  workdir, _ = prepared
  raw = workdir / "raw"
  cfg = _cfg(source="lego_json", frames_dir=str(raw / "frames"),
             metadata=str(raw / "metadata.json"), records_dir=str(tmp_path / "rec"),
             **{f"annotation_{s}": str(raw / f"lego_{s}.json") for s in ("train", "val", "test")})
  # The paper's instruction tuning needs the GPT-curated file: no silent substitute.
  with pytest.raises(prepare.DataConfigError,
                     match="ego4d_for_tuning_forecasting.json .*instructions=released_vllm_outputs"):
    prepare.convert_release(cfg.data, tmp_path)
  cfg.data.instructions = "released_vllm_outputs"  # the explicit, named alternative
  prepare.convert_release(cfg.data, tmp_path)
  fingerprint = records.build_metadata(tmp_path / "rec", records.INSTRUCT)["fingerprint"]
  assert fingerprint["derived"] == ["test", "train", "val"]
  from lego_jax.train import vllm  # train-vllm says so when it starts

  assert "released VLLM's outputs" in vllm.targets_note(tmp_path / "rec")
  assert vllm.targets_note(workdir / "records") == ""  # the generator's LLaVA files
  for split in ("train", "val", "test"):
    a = records.open_split(workdir / "records", split)
    b = records.open_split(tmp_path / "rec", split)
    assert len(a) == len(b) and all(a[i] == b[i] for i in range(len(a)))
  # Without LLaVA files the instruction records are derived from the annotations: same content.
  a = records.open_split(workdir / "records", "test", records.INSTRUCT)
  b = records.open_split(tmp_path / "rec", "test", records.INSTRUCT)
  assert all(a[i] == b[i] for i in range(len(a)))


def test_config_mistakes_are_named(tmp_path):
  cfg = _cfg()
  cfg.data.annotation_trian = "x.json"
  with pytest.raises(prepare.DataConfigError,
                     match=r"unknown config key\(s\) cfg.data.annotation_trian"):
    prepare.prepare(cfg, tmp_path)
  cfg = _cfg()
  cfg.data.synthetic.num_trian = 3
  with pytest.raises(prepare.DataConfigError, match="cfg.data.synthetic.num_trian"):
    prepare.prepare(cfg, tmp_path)
  with pytest.raises(prepare.DataConfigError, match="source='lego_json' needs the release's"):
    prepare.prepare(_cfg(source="lego_json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="frames directory not found"):
    prepare.prepare(_cfg(source="lego_json", annotation_train="a.json",
                         frames_dir=str(tmp_path / "nope")), tmp_path)
  with pytest.raises(prepare.DataConfigError, match="cfg.data.source='webdataset'"):
    prepare.prepare(_cfg(source="webdataset"), tmp_path)
  with pytest.raises(prepare.DataConfigError, match="max_bad_fraction=1.5"):
    prepare.prepare(_cfg(max_bad_fraction=1.5), tmp_path)
  cfg = _cfg()
  cfg.data.synthetic.objects = (3, 9)
  with pytest.raises(prepare.DataConfigError, match=r"cfg.data.synthetic.objects: .*\(3, 9\)"):
    prepare.prepare(cfg, tmp_path)
  assert not (tmp_path / "records").exists()
  # Through the command's entry point the same mistakes become one-line user errors.
  from lego_jax.errors import UserError

  with pytest.raises(UserError, match="source='lego_json' needs"):
    prepare.main(_cfg(source="lego_json"), tmp_path)


def test_small_synthetic_records_have_exact_sizes_in_the_plain_world(tmp_path):
  """tests/helpers.py's records (the subprocess tests' data) have the sizes asked for and no
  VLLM-only instruction frames although configs/tiny.py's world holds combinations out with 512
  instruction frames; the same bytes as a plain-world config asked directly."""
  from helpers import synthetic_records

  s = config.load("tiny").data.synthetic
  assert s.num_instruction == 512 and s.combination_rules and s.holdout
  got = synthetic_records(tmp_path / "helper", 4, 2, 2)
  summary = json.loads((got / "records" / "prepare_summary.json").read_text())
  for kind in ("pairs", "instruct"):
    assert summary[kind]["num_records"] == {"train": 4, "val": 2, "test": 2}, kind
  cfg = config.load("tiny", ["data.synthetic.num_train=4", "data.synthetic.num_val=2",
                             "data.synthetic.num_test=2", "data.synthetic.num_instruction=0",
                             "data.synthetic.combination_rules=false", "data.synthetic.holdout=()",
                             "data.synthetic.hand_swap=0"])
  plain = tmp_path / "plain"
  prepare.prepare(cfg, plain)
  for kind in ("pairs", "instruct"):
    for split in ("train", "val", "test"):
      a = records.open_split(plain / "records", split, kind)
      b = records.open_split(got / "records", split, kind)
      assert len(a) == len(b) and all(a[i] == b[i] for i in range(len(a))), (kind, split)


def test_contact_sheet(prepared, tmp_path):
  workdir, _ = prepared
  sheet = show.contact_sheet(workdir / "records", "val", num=5)
  assert sheet.width == 2 * (show.CELL + show.PAD) + show.ACTION_W + show.DESC_W + show.PAD
  assert sheet.height >= show.HEADER_H + 3 * (show.CELL + 28)  # 5 asked, the split has 3
  first = records.to_python(records.open_split(workdir / "records", "val")[0])
  want = np.asarray(show._frame(first["input_jpeg"], show.CELL))
  top = show.HEADER_H + show.PAD // 2
  got = np.asarray(sheet)[top:top + show.CELL, show.PAD:show.PAD + show.CELL]
  np.testing.assert_array_equal(got, want)
  out = tmp_path / "sheet.png"
  pipeline.ensure_flags_parsed()  # show.main reads absl flags: outside the CLI, mark them parsed
  with flagsaver.flagsaver(split="test", num=2, out=str(out)):
    assert show.main(_cfg(), workdir) == 0
  assert Image.open(out).size[0] == sheet.width
