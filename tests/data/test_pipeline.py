"""The Grain pipeline: exact decode/resize, joint seeded flips, host shards, resume, zipping."""

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from data_prep import lego_json, llava_json, tfds_builder
from lego_jax.data import images, pipeline, records
from lego_jax.data.prompts import human_turn
from lego_jax.parallel.sharding import make_mesh

tfds.display_progress_bar(False)
N = 12
SIZES = [(20, 28), (26, 18), (24, 24)]  # (h, w): landscape, portrait, square


def _noise(seed: int, hw) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  frames = root / "frames"
  ann, metadata = {}, {}
  for k in range(N):
    d = frames / f"c{k}" / "0"
    d.mkdir(parents=True)
    hw = SIZES[k % 3]
    for name, seed in (("in.jpg", 2 * k), ("out.jpg", 2 * k + 1)):
      Image.fromarray(_noise(seed, hw)).save(d / name, quality=90)
    ann[f"c{k}"] = {"0": {"image_0": f"c{k}/0/in.jpg", "image_1": f"c{k}/0/out.jpg",
                          "action": f"#C C opens drawer {k}",
                          "llava_forecast_finetune": f"The hand opens drawer {k}."}}
    if k % 2 == 0:  # half the records carry a mask, like synthetic data; the rest like real
      mask = np.zeros(hw, np.uint8)
      mask[: hw[0] // 2, : hw[1] // 3] = 255
      Image.fromarray(mask).save(d / "mask.png")
      metadata[f"c{k}"] = {"height": hw[0], "width": hw[1],
                           "actions": {"0": {"mask": f"c{k}/0/mask.png"}}}
  entries = lego_json.pair_entries(ann, "ann")
  common = dict(num_shards=2, workers=1, max_bad_fraction=0.0, fingerprint={})
  tfds_builder.convert(root / "rec", records.PAIRS, {"train": tfds_builder.SplitInput(
      entries, lambda e: lego_json.load_pair(e, frames, metadata, "ego4d"), "ann")}, **common)
  conv = llava_json.from_annotation(entries, "ego4d")
  tfds_builder.convert(root / "rec", records.INSTRUCT, {"train": tfds_builder.SplitInput(
      llava_json.instruct_entries(conv, "ann"), lambda e: llava_json.load_instruct(e, frames),
      "ann")}, **common)
  decoded = [np.asarray(Image.open(frames / f"c{k}/0/in.jpg")) for k in range(N)]
  targets = [np.asarray(Image.open(frames / f"c{k}/0/out.jpg")) for k in range(N)]
  return root / "rec", decoded, targets


def _loader(rec, **kw):
  args = dict(batch_size=4, image_size=16, vllm_image_size=12, hflip_prob=0.0, seed=3,
              shuffle=False, num_epochs=1, drop_remainder=False,
              shard_options=grain.sharding.NoSharding())
  args.update(kw)
  return pipeline.pair_loader(rec, "train", **args)


def _all(loader) -> dict:
  batches = list(loader)
  return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def test_views_are_exact(data):
  rec, inputs, targets = data
  out = _all(_loader(rec))
  # Frames leave the pipeline as uint8; the jitted programs convert them on the device.
  assert out["input"].shape == (N, 16, 16, 3) and out["input"].dtype == np.uint8
  assert out["target"].dtype == np.uint8
  assert out["clip_input"].shape == (N, 12, 12, 3) and out["mask"].shape == (N, 16, 16, 1)
  assert out["mask"].dtype == bool
  assert list(out["index"]) == list(range(N)) and out["index"].dtype == np.int32
  for k in range(N):
    want = np.asarray(Image.fromarray(inputs[k]).resize((16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out["input"][k], want)
    np.testing.assert_array_equal(images.frames_to_unit_range(out["input"][k]),
                                  want.astype(np.float32) * (2 / 255) - 1)
    want = np.asarray(Image.fromarray(targets[k]).resize((16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out["target"][k], want)
    np.testing.assert_array_equal(out["clip_input"][k], images.clip_view(inputs[k], 12))
    assert out["id"][k] == f"c{k}/0" and out["action"][k] == f"open drawer {k}"
    assert out["raw_action"][k] == f"#C C opens drawer {k}"
    assert (out["height"][k], out["width"][k]) == SIZES[k % 3]
    assert out["has_mask"][k] == (k % 2 == 0)
    if k % 2 == 0:  # nearest-resized mask: top half, left third
      assert out["mask"][k, :7, :4].all() and not out["mask"][k, 9:].any()
      assert out["mask"][k].mean() == pytest.approx(1 / 6, abs=0.05)
    else:
      assert not out["mask"][k].any()


def test_frames_to_unit_range_same_on_host_and_device():
  import jax
  import jax.numpy as jnp

  x = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  host = images.frames_to_unit_range(x)
  assert host.dtype == np.float32 and host.min() == -1 and host.max() == 1
  np.testing.assert_array_equal(host, images.to_unit_range(x))
  device = jax.jit(images.frames_to_unit_range)(jnp.asarray(x))
  # XLA may fuse the multiply-add (one rounding instead of two): within an ulp of the host
  np.testing.assert_allclose(np.asarray(device), host, rtol=0, atol=2.4e-7)
  # float frames are taken to be in [-1, 1] already
  f = np.linspace(-1, 1, 8, dtype=np.float32)
  assert images.frames_to_unit_range(f) is f
  np.testing.assert_array_equal(images.from_unit_range(host), x)


def test_clip_view_matches_transformers_clip_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  proc = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
  for seed, hw in enumerate([(30, 41), (45, 31), (24, 24), (100, 60)]):
    img = _noise(seed, hw)
    want = proc(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(images.clip_view(img, 24), want.transpose(1, 2, 0), atol=1e-6)


def test_flip_is_joint_and_seeded(data):
  rec, _, _ = data
  plain = _all(_loader(rec, shuffle=True, num_epochs=1))
  flipped = _all(_loader(rec, shuffle=True, num_epochs=1, hflip_prob=0.5))
  again = _all(_loader(rec, shuffle=True, num_epochs=1, hflip_prob=0.5))
  other = _all(_loader(rec, shuffle=True, num_epochs=1, hflip_prob=0.5, seed=4))
  np.testing.assert_array_equal(plain["index"], flipped["index"])  # flips do not reorder
  f = flipped["flipped"]
  assert 0 < f.sum() < N and not plain["flipped"].any()
  for i in range(N):
    for key in ("input", "target", "mask"):
      want = plain[key][i][:, ::-1] if f[i] else plain[key][i]
      np.testing.assert_array_equal(flipped[key][i], want)
    # The CLIP view (the VLLM's input) is never flipped.
    np.testing.assert_array_equal(flipped["clip_input"][i], plain["clip_input"][i])
  np.testing.assert_array_equal(again["flipped"], f)
  np.testing.assert_array_equal(again["input"], flipped["input"])
  by_index = lambda o: dict(zip(o["index"], o["flipped"]))
  assert by_index(other) != by_index(flipped)


def test_two_hosts_see_every_example_once_per_epoch(data):
  rec, _, _ = data
  seen = []
  for host in range(2):
    out = _all(_loader(rec, shuffle=True, batch_size=2, shard_options=grain.sharding.ShardOptions(
        shard_index=host, shard_count=2, drop_remainder=True)))
    seen.append(list(out["index"]))
  assert len(seen[0]) == len(seen[1]) == N // 2
  assert sorted(seen[0] + seen[1]) == list(range(N))
  assert seen[0] != sorted(seen[0]) or seen[1] != sorted(seen[1])  # shuffled


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert list(x["id"]) == list(y["id"])
    np.testing.assert_array_equal(x["input"], y["input"])
    np.testing.assert_array_equal(x["flipped"], y["flipped"])


def test_iterator_state_resumes_the_exact_sequence(data):
  rec, _, _ = data
  make = lambda: _loader(rec, batch_size=3, shuffle=True, num_epochs=None, hflip_prob=0.5,
                         drop_remainder=True)
  it = iter(make())
  _take(it, 5)  # crosses an epoch boundary (12 examples = 4 batches)
  state = it.get_state()
  reference = _take(it, 4)
  resumed = iter(make())
  resumed.set_state(state)
  _same_batches(_take(resumed, 4), reference)


def test_worker_processes_give_the_in_process_examples(data):
  rec, _, _ = data
  local = _all(_loader(rec, shuffle=True, hflip_prob=0.5, batch_size=2))
  it = iter(_loader(rec, shuffle=True, hflip_prob=0.5, batch_size=2, worker_count=2))
  batches = list(it)
  remote = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}
  del it, batches  # free Grain's shared-memory batches while the workers are still there
  assert sorted(remote["index"]) == list(range(N))  # every example exactly once
  # Workers interleave batches, but each example is processed the same way.
  for i, idx in enumerate(remote["index"]):
    j = list(local["index"]).index(idx)
    np.testing.assert_array_equal(remote["clip_input"][i], local["clip_input"][j])
    np.testing.assert_array_equal(remote["input"][i], local["input"][j])
    assert remote["id"][i] == local["id"][j]


def test_zipped_extra_records_align_by_index(data, tmp_path):
  rec, _, _ = data
  path = str(tmp_path / "features.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for i in range(N):
    writer.write(np.full((2, 3), i, np.float16).tobytes())
  writer.close()

  class DecodeFeature(grain.transforms.Map):
    def map(self, r):
      r["feature"] = np.frombuffer(r["feature"], np.float16).reshape(2, 3).astype(np.float32)
      return r

  features = grain.sources.ArrayRecordDataSource([path])
  out = _all(_loader(rec, shuffle=True, extra_sources={"feature": features},
                     extra_operations=[DecodeFeature()]))
  assert out["feature"].shape == (N, 2, 3)
  for idx, feat in zip(out["index"], out["feature"]):
    assert (feat == idx).all()
  with pytest.raises(ValueError, match="extra source 'short' has 2 records, the split has 12"):
    pipeline.ZippedSource(records.open_split(rec, "train"), {"short": [b"a", b"b"]})


def test_instruction_batches(data):
  rec, inputs, _ = data
  batches = list(pipeline.instruct_loader(rec, "train", batch_size=5, vllm_image_size=12,
                                          shuffle=False, num_epochs=1, drop_remainder=False,
                                          shard_options=grain.sharding.NoSharding()))
  assert [len(b["id"]) for b in batches] == [5, 5, 2]
  b = batches[0]
  assert b["clip_image"].shape == (5, 12, 12, 3)
  np.testing.assert_array_equal(b["clip_image"][1], images.clip_view(inputs[1], 12))
  assert b["prompt"][1] == human_turn("open drawer 1")
  assert b["answer"][1] == "The hand opens drawer 1."


def test_host_batch_to_global_arrays(data):
  rec, _, _ = data
  batch = next(iter(_loader(rec, batch_size=8)))
  mesh = make_mesh((-1, 1, 1))
  out = pipeline.to_global(batch, mesh)
  assert isinstance(out["input"], jax.Array) and out["input"].shape == (8, 16, 16, 3)
  assert out["input"].sharding.spec[0] == ("data", "fsdp")
  assert len(out["input"].addressable_shards) == len(jax.devices())
  np.testing.assert_array_equal(np.asarray(out["input"]), batch["input"])
  np.testing.assert_array_equal(np.asarray(out["index"]), batch["index"])
  assert isinstance(out["action"], np.ndarray) and out["action"][0] == batch["action"][0]
