"""extract / describe: the feature records hold exactly what transformers' Llava generates (tokens,
H_t, H_i) for a small random model; interrupted and multi-host extraction equal an uninterrupted
run; the description scorer; train-vllm end to end into `describe`; bad inputs."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import transformers
from absl.testing import flagsaver
from flax import nnx

from lego_jax import cli
from lego_jax import config as config_lib
from lego_jax.data import features, images, prepare, records
from lego_jax.data.prompts import human_turn
from lego_jax.infer import describe, extract
from lego_jax.models.llava import Llava, load_llava
from lego_jax.train import vllm
from lego_jax.weights import io as weights_io
from lego_jax.weights.state import flat_params
from helpers import rel_l2

tfds.display_progress_bar(False)
VOCAB, HF_IMAGE_TOKEN = 256, 0  # transformers needs the image token inside the vocabulary: unk


def small_cfg(records_dir, tokenizer_dir, **generate):
  cfg = config_lib.load("tiny")
  cfg.data.update(records_dir=str(records_dir), tokenizer_dir=str(tokenizer_dir), num_workers=0,
                  vllm_image_size=16)
  cfg.clip_vision.update(hidden_size=32, intermediate_size=32, num_layers=2, num_heads=2,
                         image_size=16, patch_size=8)
  cfg.llama.update(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2)
  cfg.llava.update(projector="mlp2x_gelu", vision_hidden=32, text_hidden=32)
  cfg.vllm_train.update(batch_size=8, num_steps=2, max_length=256, log_every=1, ckpt_every=2)
  cfg.vllm_generate.update({"greedy": True, "max_new_tokens": 6, "batch_size": 2,
                            "part_size": 3, "feature_dtype": "float32", **generate})
  cfg.checkpoint.async_save = False
  return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(records dir, tokenizer dir) of a small synthetic set."""
  work = tmp_path_factory.mktemp("data")
  cfg = config_lib.load("tiny")
  cfg.data.synthetic.update(num_train=6, num_val=2, num_test=5, frame_size=32)
  cfg.data.update(num_shards=1, num_workers=0, tokenizer_vocab_size=VOCAB)
  prepare.prepare(cfg, work)
  return work / "records", work / "tokenizer"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """(transformers Llava, our Llava loaded from its save_pretrained files, tokenizer). The
  lm_head rows of EOS and of the token example 0 emits second are swapped, so greedy rows stop
  at different steps."""
  cfg = small_cfg(*data)
  tok = vllm.load_tokenizer(cfg, tmp_path_factory.mktemp("unused"))
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
          image_size=16, patch_size=8, projection_dim=8),
      text_config=transformers.LlamaConfig(
          vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
          max_position_embeddings=512, initializer_range=0.3),  # input-dependent outputs
      image_token_id=HF_IMAGE_TOKEN, vision_feature_layer=-2,
      vision_feature_select_strategy="default")
  hf = transformers.LlavaForConditionalGeneration(config).eval()
  free = [hf_generate(hf, tok, e, eos=None)[0] for e in split_examples(cfg)]
  # Make EOS the token whose first appearance differs most between the examples.
  stop_at = lambda t: {int(np.flatnonzero(f == t)[0]) if t in f else len(f) for f in free}
  swap = max(sorted({int(t) for f in free for t in f} - {tok.eos_id}),
             key=lambda t: len(stop_at(t)))
  assert len(stop_at(swap)) > 1
  with torch.no_grad():
    head = hf.lm_head.weight
    head[[swap, tok.eos_id]] = head[[tok.eos_id, swap]].clone()
  path = tmp_path_factory.mktemp("hf_llava")
  hf.save_pretrained(path)
  model = nnx.eval_shape(lambda: Llava(vllm.llava_config(cfg), rngs=nnx.Rngs(0)))
  return hf, load_llava(model, weights_io.read_state_dict(path)), tok


def split_examples(cfg, split="test"):
  src = records.open_split(cfg.data.records_dir, split)
  out = []
  for i in range(len(src)):
    r = records.to_python(src[i])
    out.append((r["action"], images.clip_view(images.decode_rgb(r["input_jpeg"]), 16)))
  return out


def hf_generate(hf, tok, example, eos):
  """transformers on ONE unpadded prompt: (tokens, H_t rows, H_i)."""
  action, pixels = example
  ids = np.asarray(vllm.prompt_ids(tok, human_turn(action), 4))
  assert not np.any(ids == HF_IMAGE_TOKEN)
  ids = np.where(ids == vllm.tokenizer_lib.IMAGE_TOKEN_ID, HF_IMAGE_TOKEN, ids)
  pixel_values = torch.as_tensor(pixels.transpose(2, 0, 1)[None].copy())
  with torch.no_grad():
    # The image token is the pad id: without an explicit mask generate() would mask the image.
    out = hf.generate(input_ids=torch.as_tensor(ids[None]), pixel_values=pixel_values,
                      attention_mask=torch.ones((1, len(ids)), dtype=torch.long), do_sample=False, max_new_tokens=6, eos_token_id=eos, pad_token_id=0,
                      output_hidden_states=True, return_dict_in_generate=True)
    h_img = hf.get_image_features(pixel_values=pixel_values).pooler_output
  hidden = torch.stack([step[-1][0, -1] for step in out.hidden_states]).numpy()
  return out.sequences[0, len(ids):].numpy(), hidden, torch.stack(list(h_img))[0].numpy()


def read_split(workdir, split) -> list[dict]:
  src = features.open_source(workdir / "features", split)
  return [features.decode(src[i]) for i in range(len(src))]


def test_feature_records_hold_what_transformers_generates(data, reference, tmp_path):
  hf, model, tok = reference
  cfg = small_cfg(*data)
  summary = extract.extract(cfg, tmp_path, model, tok, model_source="random", splits=["test"])
  info = summary["test"]
  assert info["complete"] and info["num_records"] == 5 and info["num_parts"] == 2
  assert (info["dim"], info["n_img"], info["dtype"], info["part_size"]) == (32, 4, "float32", 3)
  assert info["bytes_per_example"] == info["total_bytes"] / 5 > 0
  assert json.loads((tmp_path / "features" / "test" / "info.json").read_text())["complete"]
  written = read_split(tmp_path, "test")
  pairs = records.open_split(cfg.data.records_dir, "test")
  lengths = set()
  for i, (r, example) in enumerate(zip(written, split_examples(cfg))):
    tokens, hidden, h_img = hf_generate(hf, tok, example, eos=tok.eos_id)
    assert r["index"] == i and r["id"] == records.to_python(pairs[i])["id"]
    np.testing.assert_array_equal(r["tokens"], tokens)
    assert r["description"] == tok.decode(tokens)
    assert r["h_txt"].shape == (len(tokens), 32) and r["n_txt"] == len(tokens)
    assert rel_l2(r["h_txt"], hidden) <= 1e-4
    assert r["h_img"].shape == (4, 32) and rel_l2(r["h_img"], h_img) <= 1e-4
    lengths.add(len(tokens))
  assert len(lengths) > 1 and min(lengths) < 6   # some rows stopped at EOS, others ran on
  accuracy = json.loads((tmp_path / "features" / "test" / "accuracy.json").read_text())
  assert accuracy["num"] == 5 and set(accuracy) == {"location", "hand", "object", "num", "exact"}
  # A finished split is kept; other settings are refused, not mixed in.
  again = extract.extract(cfg, tmp_path, model, tok, model_source="random", splits=["test"])
  assert again["test"]["kept"]
  cfg.vllm_generate.max_new_tokens = 7
  with pytest.raises(config_lib.ConfigError, match="max_new_tokens"):
    extract.extract(cfg, tmp_path, model, tok, model_source="random", splits=["test"])


def test_interrupted_and_multi_host_extraction_equal_one_run(data, reference, tmp_path):
  _, model, tok = reference
  cfg = small_cfg(*data, greedy=False, temperature=1.0, top_k=0, part_size=2)
  run = lambda wd, **kw: extract.extract(cfg, wd, model, tok, model_source="random",
                                         splits=["train"], **kw)["train"]
  assert run(tmp_path / "whole")["complete"]
  expected = read_split(tmp_path / "whole", "train")
  assert [r["index"] for r in expected] == list(range(6))

  stopped = tmp_path / "stopped"
  assert not run(stopped, stop_after_parts=1)["complete"]
  assert features.done_parts(stopped / "features", "train") == {0}
  assert not features.is_complete(stopped / "features", "train")
  # A write killed mid-part leaves only a temporary file, which the resumed run replaces.
  features.part_path(stopped / "features", "train", 1).with_suffix(".array_record.tmp") \
      .write_bytes(b"partial")
  assert run(stopped)["complete"]

  hosts = tmp_path / "hosts"
  assert not run(hosts, process_index=1, process_count=2)["complete"]
  assert features.done_parts(hosts / "features", "train") == {1}
  assert run(hosts, process_index=0, process_count=2)["complete"]

  for wd in (stopped, hosts):
    got = read_split(wd, "train")
    assert [r["index"] for r in got] == list(range(6))
    for a, b in zip(got, expected):
      assert a["tokens"] == b["tokens"] and a["description"] == b["description"]
      np.testing.assert_array_equal(a["h_txt"], b["h_txt"])
      np.testing.assert_array_equal(a["h_img"], b["h_img"])
  # Sampling at temperature 1 really sampled: not the greedy tokens.
  greedy = small_cfg(*data, part_size=2)
  g = extract.extract(greedy, tmp_path / "greedy", model, tok, model_source="random",
                      splits=["train"])["train"]
  assert g["complete"]
  assert [r["tokens"] for r in read_split(tmp_path / "greedy", "train")] != \
      [r["tokens"] for r in expected]


def test_description_accuracy_reads_location_hand_and_object():
  metas = [{"location": "left", "hand": "left", "colour": "red", "target": "cup"},
           {"location": "middle", "hand": "right", "colour": "green", "target": "carrot"},
           {"location": "right", "hand": "right", "colour": "blue", "target": "pan"},
           {}]  # real data: no metadata, not scored
  descriptions = [
      "The left hand reaches to the left side of the table and grasps the red cup by its handle.",
      # "around its middle" is not a location; the place is "the right side of the table".
      "The left hand reaches to the right side of the table and grasps the green carrot around "
      "its middle, lifting it off the table.",
      "The right hand holds a spoon in the blue bowl on the right side of the table.",
      "anything"]
  acc = extract.description_accuracy(descriptions, metas, references=descriptions)
  assert acc == {"location": 2 / 3, "hand": 2 / 3, "object": 2 / 3, "num": 3, "exact": 1.0}
  assert extract.named_location(descriptions[1]) == "right"
  assert extract.description_accuracy(["x"], [{}]) is None


def test_train_vllm_checkpoint_feeds_describe_and_extract(data, tmp_path, capsys):
  cfg = small_cfg(*data)
  _, state = vllm.train(cfg, tmp_path)
  logged = [json.loads(line) for line in
            (tmp_path / "logs" / "vllm" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2]
  assert {"loss", "token_accuracy", "tokens_per_s", "grad_norm", "lr"} <= set(logged[-1])
  model, tok = vllm.load_trained(cfg, tmp_path)
  trained = {**jax.device_get(state["trained"]), **jax.device_get(state["frozen"])}
  loaded = flat_params(model)
  for k, v in flat_params(nnx.merge(nnx.graphdef(model), trained)).items():
    np.testing.assert_array_equal(loaded[k], v)

  pair = records.to_python(records.open_split(cfg.data.records_dir, "val")[1])
  frame = tmp_path / "frame.jpg"
  frame.write_bytes(pair["input_jpeg"])
  with flagsaver.flagsaver(image=str(frame), action=pair["action"]):
    assert describe.main(cfg, tmp_path) == 0
  printed = capsys.readouterr().out.strip()
  extract.main(cfg, tmp_path)
  assert read_split(tmp_path, "val")[1]["description"] == printed
  out = capsys.readouterr().out
  assert "extract val: 2 examples written" in out and "KiB per example" in out


@pytest.mark.parametrize("args, message", [
    (["--image=/nonexistent/frame.jpg", "--action=cut the carrot"], "image not found"),
    (["--image={garbage}", "--action=cut the carrot"], "cannot read image"),
    (["--image={frame}", "--action=  "], "the action is empty"),
])
def test_describe_bad_inputs_fail_in_one_line(tmp_path, capsys, args, message):
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image")
  frame = tmp_path / "frame.png"
  from PIL import Image

  buf = io.BytesIO()
  Image.new("RGB", (8, 8)).save(buf, "PNG")
  frame.write_bytes(buf.getvalue())
  argv = ["lego-jax", "describe", f"--workdir={tmp_path / 'work'}"]
  argv += [a.format(garbage=garbage, frame=frame) for a in args]
  with pytest.raises(SystemExit) as exit_info:
    cli.run(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0] and err[0].startswith("lego-jax describe: error:")
  assert not (tmp_path / "work" / "features").exists()
