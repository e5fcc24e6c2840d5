"""`lego-jax serve` end to end: a workdir of the smallest models, the server as a user starts it,
the page driven in headless Chromium (Debian's /usr/bin/chromium through Playwright, which
downloads no browser of its own).

The workdir is made by the real stage code (prepare-data, train-vae, train-vllm, extract,
train-ldm at 1 step each). The baseline's checkpoint is a copy of the LEGO LDM's (the same
parameter tree): what is under test is serve's baseline path (its config, its action-label text,
no VLLM embeddings), not the baseline's training, which tests/test_demo.py runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from procs import SMALL_LDM, SMALL_VAE, SMALL_VLLM

ROOT = Path(__file__).resolve().parents[2]
# Lines XLA's C++ runtime writes to stderr while JAX loads an installed CUDA plugin (the plan-gpu
# extra CI installs), before any of our code runs: "Could not find cuda drivers ..." at INFO.
# They are not the command's output; its one line is what is left.
RUNTIME_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                         r"|[IWE]\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\])")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Model flags: the build and the server must agree (serve loads what the stages trained).
MODEL_FLAGS = SMALL_VAE + SMALL_VLLM + SMALL_LDM + [
    "--config.vllm_generate.max_new_tokens=8", "--config.sampler.num_steps=2"]
BUILD_FLAGS = MODEL_FLAGS + [
    "--config.data.synthetic.num_train=16", "--config.data.synthetic.num_val=8",
    "--config.data.synthetic.num_test=8", "--config.data.num_workers=0",
    "--config.vae_train.num_steps=1", "--config.vllm_train.num_steps=1",
    "--config.vllm_train.batch_size=4", "--config.ldm_train.num_steps=1",
    "--config.ldm_train.batch_size=4", "--config.checkpoint.async_save=false"]
BUILD = """
import shutil, sys
from pathlib import Path
from lego_jax import config as config_lib, demo
from lego_jax.data import pipeline, prepare
from lego_jax.infer import extract
from lego_jax.train import ldm, vae, vllm

pipeline.ensure_flags_parsed()
workdir = Path(sys.argv[1])
cfg = config_lib.load("tiny", [f[len("--config."):] for f in sys.argv[2:]])
for stage in (prepare, vae, vllm, extract, ldm):
  assert stage.main(cfg, workdir) == 0, stage.__name__
baseline = workdir / demo.BASELINE_DIR
demo.link_vae(workdir, baseline)
shutil.copytree(workdir / "checkpoints" / "ldm", baseline / "checkpoints" / "ldm")
"""
TIMEOUT = 900


def _missing_tools() -> str | None:
  for module, extra in (("playwright", "playwright"), ("fastapi", "the serve extra"),
                        ("uvicorn", "the serve extra"), ("multipart", "the serve extra")):
    if importlib.util.find_spec(module) is None:
      return f"{module} is not installed (launch/test.sh installs {extra})"
  if not os.access(CHROMIUM, os.X_OK):
    return (f"{CHROMIUM} is missing: launch/test.sh installs Debian's chromium when it runs as "
            "root (apt-get install chromium)")
  return None


pytestmark = pytest.mark.skipif(_missing_tools() is not None, reason=str(_missing_tools()))


def _env() -> dict:
  env = dict(os.environ)
  # One CPU device (not the 8 fake ones of the other tests); compiled programs are run, never
  # timed here, so LLVM's expensive optimisations only cost compile time.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _serve_cmd(workdir, port: int, *extra) -> list[str]:
  return [sys.executable, "-m", "lego_jax", "serve", f"--workdir={workdir}", f"--port={port}",
          *MODEL_FLAGS, *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url: str) -> dict:
  with urllib.request.urlopen(url, timeout=30) as r:
    return json.load(r)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("serve") / "workdir"
  env = _env()
  build = subprocess.run([sys.executable, "-c", BUILD, str(workdir), *BUILD_FLAGS], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
  assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
  port = _free_port()
  proc = subprocess.Popen(_serve_cmd(workdir, port), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  log: list[str] = []
  threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + TIMEOUT
    while True:
      assert proc.poll() is None, "".join(log)[-5000:]
      assert time.monotonic() < deadline, "the server did not answer in time"
      try:
        _get(url + "/api/info")
        break
      except OSError:
        time.sleep(0.5)
    yield {"url": url, "workdir": workdir, "log": log, "proc": proc}
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()


@pytest.fixture(scope="module")
def browser():
  from playwright.sync_api import sync_playwright

  with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
    context = p.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1100, "height": 760}, accept_downloads=True)
    yield context
    context.close()


@pytest.fixture()
def page(browser, server):
  page = browser.new_page()
  page.goto(server["url"] + "/")
  page.wait_for_selector("#examples img")
  yield page
  page.close()


def _submit(page, *, upload=None, example: int | None = None, action: str = "",
            timeout_ms: int = 300_000, **controls) -> dict:
  """Fills the form as a person does, presses Generate, waits for the answer; -> what shows."""
  if upload is not None:
    page.set_input_files("#image", str(upload))
  else:
    page.set_input_files("#image", [])
  if example is not None:
    page.click(f"#examples img >> nth={example}")
  page.fill("#action", action)
  for name, value in controls.items():
    if name == "steps":
      page.select_option("#steps", str(value))
    else:
      page.fill(f"#{name}", str(value))
  page.click("#generate")
  page.wait_for_function("!document.querySelector('#generate').disabled", timeout=timeout_ms)
  return {"message": page.inner_text("#message"),
          "message_class": page.get_attribute("#message", "class") or "",
          "description": page.inner_text("#description"),
          "done": page.get_attribute("#frames", "data-done"),
          "images": page.eval_on_selector_all(
              "#frames img", "imgs => imgs.map(i => [i.dataset.kind, i.complete ? i.naturalWidth : 0])")}


def _wait_images(page) -> None:
  page.wait_for_function("[...document.querySelectorAll('#frames img')]"
                         ".every(i => i.complete && i.naturalWidth > 0)")


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
  Image.fromarray(array, mode).save(path)
  return path


def _frame(server) -> np.ndarray:
  """A held-out test frame of the workdir, as the page's examples show it."""
  with urllib.request.urlopen(server["url"] + "/api/examples/0.jpg") as r:
    import io

    return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def test_upload_describe_generate_and_download(page, server, tmp_path):
  frame = _frame(server)
  upload = _png(tmp_path / "my_frame.png", np.ascontiguousarray(frame[:, ::-1]))  # my own frame
  shown = _submit(page, upload=upload, action="pick up the red cup")
  assert shown["done"] and "error" not in shown["message_class"], shown
  assert shown["description"].strip() and shown["description"] != "…", shown
  _wait_images(page)
  kinds = [k for k, _ in page.eval_on_selector_all("#frames img",
                                                     "imgs => imgs.map(i => [i.dataset.kind, 0])")]
  assert kinds == ["input", "lego", "baseline"]  # LEGO and, beside it, the label-only baseline
  captions = page.inner_text("#frames")
  assert "LEGO" in captions and "action label only" in captions
  page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
  shot = os.environ.get("LEGO_SERVE_SCREENSHOT")
  if shot:
    shutil.copy(tmp_path / "serve.png", shot)
  assert Image.open(tmp_path / "serve.png").size[0] >= 1000
  with page.expect_download() as got:
    page.click("a.download >> nth=0")
  saved = tmp_path / "download.png"
  got.value.save_as(saved)
  assert got.value.suggested_filename == "lego_pick_up_the_red_cup.png"
  with Image.open(saved) as im:  # back at the input's size, a real picture
    assert im.size == (frame.shape[1], frame.shape[0]) and im.mode == "RGB"
    assert np.asarray(im).std() > 0


def test_new_guidance_scales_and_seed_do_not_recompile(page, server):
  first = _submit(page, example=1, action="pick up the green bowl")
  assert first["done"], first
  before = _get(server["url"] + "/api/info")["compilations"]
  again = _submit(page, example=1, action="pick up the green bowl", text_scale=4.5,
                  image_scale=1.5, seed=1234)
  assert again["done"], again
  assert _get(server["url"] + "/api/info")["compilations"] == before
  # A new step count is a new program: it compiles (once), and the page says so beforehand.
  assert "compiles once" in page.inner_text("#steps-hint")
  steps = _submit(page, example=1, action="pick up the green bowl", steps=10)
  assert steps["done"], steps
  info = _get(server["url"] + "/api/info")
  assert info["compilations"] > before and 10 in info["compiled_steps"]


@pytest.mark.parametrize("name, make, action, expected", [
    ("notes.png", lambda p: p.write_text("not a picture"), "open the drawer",
     "not an image PIL can read"),
    ("tiny.png", lambda p: _png(p, np.zeros((8, 8, 3), np.uint8)), "open the drawer",
     "8x8 pixels is outside the supported 16..8192"),
    ("wide.png", lambda p: _png(p, np.zeros((20, 9000, 3), np.uint8)), "open the drawer",
     "9000x20 pixels is outside the supported"),
    (None, None, "", "the action is empty"),
    (None, None, "x" * 10_000, "10,000 characters long; at most 300"),
    ("empty.png", lambda p: p.write_bytes(b""), "open the drawer", "the file is empty"),
])
def test_bad_input_gets_a_message_and_the_server_keeps_answering(page, server, tmp_path, name,
                                                                   make, action, expected):
  upload = None
  if name:
    upload = tmp_path / name
    make(upload)
  shown = _submit(page, upload=upload, example=None if upload else 2, action=action)
  assert "error" in shown["message_class"] and expected in shown["message"], shown
  assert "Traceback" not in page.content()
  assert not shown["done"] and not shown["images"]
  assert _get(server["url"] + "/api/info")["models"] == ["LEGO", "action label only"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "8000px"])
def test_odd_modes_and_sizes_are_converted_and_say_so(page, server, tmp_path, mode):
  frame = _frame(server)
  if mode == "L":
    upload = _png(tmp_path / "grey.png", frame.mean(-1).astype(np.uint8), "L")
  elif mode == "RGBA":
    alpha = np.full(frame.shape[:2] + (1,), 200, np.uint8)
    upload = _png(tmp_path / "rgba.png", np.concatenate([frame, alpha], -1), "RGBA")
  elif mode == "I;16":
    upload = _png(tmp_path / "deep.png", (frame.mean(-1) * 257).astype(np.uint16))  # I;16
  else:  # 8000 px wide (a panorama), flat: a small file
    upload = tmp_path / "wide.png"
    Image.new("RGB", (8000, 600), (120, 90, 60)).save(upload)
  shown = _submit(page, upload=upload, action="pick up the red cup")
  assert shown["done"] and "error" not in shown["message_class"], shown
  note = shown["message"]
  if mode == "8000px":
    assert "8000x600 squashed to the model's 16x16" in note
    _wait_images(page)
    sizes = dict(page.eval_on_selector_all(
        "#frames img", "imgs => imgs.map(i => [i.dataset.kind, [i.naturalWidth, i.naturalHeight]])"))
    assert sizes["lego"] == [1024, 77]  # the input's aspect ratio, at most 1024 px a side
  else:
    assert f"converted from mode {mode}" in note or (mode == "I;16" and "mode I" in note), note


def test_two_browsers_at_once_both_get_their_answer(browser, server):
  pages = [browser.new_page(), browser.new_page()]
  try:
    for p in pages:
      p.goto(server["url"] + "/")
      p.wait_for_selector("#examples img")
    for i, p in enumerate(pages):
      p.click(f"#examples img >> nth={3 + i}")
    for p in pages:  # both pressed before either is answered: the second waits in the queue
      p.click("#generate")
    for p in pages:
      p.wait_for_selector("#frames[data-done]", timeout=300_000)
      _wait_images(p)
    done = [p.get_attribute("#frames", "data-done") for p in pages]
    assert done[0] != done[1]
    for p in pages:
      assert p.inner_text("#description").strip()
      assert len(p.query_selector_all("#frames img")) == 3
  finally:
    for p in pages:
      p.close()


def test_missing_workdir_or_checkpoint_is_one_line_and_exit_1(tmp_path):
  gone = subprocess.run(_serve_cmd(tmp_path / "nowhere", _free_port()), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert gone.returncode == 1, gone.stderr
  lines = [line for line in gone.stderr.strip().splitlines() if not RUNTIME_LOG.match(line)]
  assert len(lines) == 1 and "does not exist" in lines[0] and "launch/demo.sh" in lines[0], lines
  assert not (tmp_path / "nowhere").exists()  # serve never makes or writes its workdir
  # The same check names the first missing checkpoint and the command that makes it.
  from lego_jax import config as config_lib
  from lego_jax.serve import engine

  cfg = config_lib.load("tiny")
  (tmp_path / "empty").mkdir()
  lack = engine.missing(cfg, tmp_path / "empty")
  assert lack.startswith("no VLLM checkpoint in ") and "`lego-jax train-vllm" in lack, lack
