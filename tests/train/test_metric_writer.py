"""The training logs: TensorBoard event files people open, written without importing torch
(tensorboardX's writer would import it, 1.4-2.4 s of every training process), and metrics.jsonl."""

import json
import struct
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

WRITE = """
import sys, numpy as np
from lego_jax.train import common
w = common.MetricWriter(sys.argv[1])
w.scalars(3, {"loss": 0.25})
w.image(3, "samples", np.full((4, 6, 3), 200, np.uint8))
w.close()
print("torch imported:", "torch" in sys.modules)
"""


def _events(path: Path) -> list:
  """The Event protos of a TFRecord event file (length, crc, data, crc per record)."""
  from tensorboardX.proto import event_pb2

  data, out, i = path.read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[i + 12:i + 12 + n])
    out.append(event)
    i += 12 + n + 4
  return out


def test_event_file_and_jsonl_without_torch(tmp_path):
  run = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert run.returncode == 0, run.stderr[-2000:]
  assert "torch imported: False" in run.stdout
  (event_file,) = tmp_path.glob("events.out.tfevents.*")
  values = [(e.step, v.tag, v) for e in _events(event_file) for v in e.summary.value]
  scalars = {(step, tag): v.simple_value for step, tag, v in values if v.HasField("simple_value")}
  assert scalars == {(3, "loss"): 0.25}
  (image,) = [v.image for step, tag, v in values if tag == "samples" and step == 3]
  assert (image.height, image.width, image.colorspace) == (4, 6, 3)
  assert image.encoded_image_string.startswith(b"\x89PNG")
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(3, 0.25)]
