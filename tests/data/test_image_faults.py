"""Damaged JPEG frames: what the decoder reports as corrupt is refused at conversion (counted
as a bad record under max_bad_fraction), not written as a training pair of garbage."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import lego_json, tfds_builder
from lego_jax.data import images, records

tfds.display_progress_bar(False)


def _textured_jpeg(size=96) -> bytes:
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size]
  arr = np.stack([128 + 90 * np.sin(xx / 6 + yy / 9), 128 + 60 * np.cos(xx / 5), (xx * 2) % 255],
                 -1)
  arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _visible_flips(good: bytes, count: int) -> list[bytes]:
  """Single-bit flips in the entropy-coded data that PIL decodes without complaint into an image
  more than 10 grey levels (mean) away from the original: the silent-garbage case."""
  sos = good.index(b"\xff\xda")
  start = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")
  ref = np.asarray(Image.open(io.BytesIO(good)), np.float32)
  rng, out = np.random.default_rng(1), []
  while len(out) < count:
    bad = bytearray(good)
    bad[int(rng.integers(start, len(good) - 2))] ^= 1 << int(rng.integers(8))
    try:
      img = images.open_image(bytes(bad))
    except images.ImageError:
      continue
    if np.abs(np.asarray(img, np.float32) - ref).mean() > 10:
      out.append(bytes(bad))
  return out


def test_decoder_reported_corruption_is_refused():
  good = _textured_jpeg()
  assert images.normalise_jpeg(good)[0] == good   # an intact JPEG is kept byte for byte
  flips = _visible_flips(good, 30)
  refused = sum(_refuses(bad) for bad in flips)
  # libjpeg reports ~93% of such flips in 256x256 frames (docs/data-faults.md); PIL alone: 0%.
  assert refused >= 0.8 * len(flips), refused
  for mode, colour in (("L", 90), ("CMYK", (0, 255, 255, 0))):   # other JPEG kinds still pass
    buf = io.BytesIO()
    Image.new(mode, (12, 8), colour).save(buf, "JPEG")
    images.normalise_jpeg(buf.getvalue())


def test_corrupt_frame_is_a_named_bad_record(tmp_path):
  good = _textured_jpeg()
  bad = next(b for b in _visible_flips(good, 30) if _refuses(b))
  frames = tmp_path / "frames"
  frames.mkdir()
  (frames / "good.jpg").write_bytes(good)
  (frames / "bad.jpg").write_bytes(bad)
  entry = {"image_1": "good.jpg", "action": "#C C opens the drawer"}
  ann = {"c": {str(i): {"image_0": "good.jpg", **entry} for i in range(3)}}
  ann["c"]["3"] = {"image_0": "bad.jpg", **entry}
  inp = tfds_builder.SplitInput(lego_json.pair_entries(ann, "ann.json"),
                                lambda e: lego_json.load_pair(e, frames, {}, "ego4d"), "ann.json")
  result = tfds_builder.convert(tmp_path / "rec", records.PAIRS, {"train": inp}, num_shards=1,
                                workers=1, max_bad_fraction=0.25, fingerprint={"test": 1})
  assert result.num_records == {"train": 3} and result.num_bad == {"train": 1}
  (msg,) = result.bad["train"]
  assert msg.startswith("c/3: image_0 ") and "bad.jpg" in msg and "corrupt JPEG data" in msg


def _refuses(data: bytes) -> bool:
  try:
    images.normalise_jpeg(data)
  except images.ImageError:
    return True
  return False
