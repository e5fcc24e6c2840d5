"""generate's user-facing edges: bad inputs fail in one line, output normalisation."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lego_jax.errors import UserError
from lego_jax.infer import generate, single


def test_bad_frames_and_actions_are_one_line_errors(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  with pytest.raises(UserError, match="not an image file"):
    single.check_frame(str(tmp_path / "notes.txt"))
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    single.check_frame(str(tmp_path / "missing.jpg"))
  with pytest.raises(UserError, match="8x8"):
    single.check_frame(str(tmp_path / "tiny.png"))
  with pytest.raises(UserError, match="broken.jpg"):
    single.check_frame(str(tmp_path / "broken.jpg"))
  with pytest.raises(UserError, match="empty"):
    single.describe_lib.check_action("   ")


def test_cli_reports_without_traceback(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  proc = subprocess.run(
      [sys.executable, "-m", "lego_jax", "generate", f"--workdir={tmp_path / 'w'}",
       f"--image={tmp_path / 'notes.txt'}", "--action=cut the carrot"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("lego-jax generate: error:")
  assert "not an image file" in proc.stderr


def test_output_normalisation():
  x = np.stack([np.full((2, 2, 3), -0.5), np.linspace(-3, 3, 12).reshape(2, 2, 3)]).astype(np.float32)
  mm = generate.to_uint8(x, "minmax")
  assert mm[1].min() == 0 and mm[1].max() == 255
  assert np.all(mm[0] == 0)  # a constant image has no range: it maps to 0, not NaN
  cl = generate.to_uint8(x, "clamp")
  assert cl[0, 0, 0, 0] == 64 and cl[1].min() == 0 and cl[1].max() == 255
  with pytest.raises(ValueError, match="minmax or clamp"):
    generate.to_uint8(x, "other")
