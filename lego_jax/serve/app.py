"""`lego-jax serve`: a local web page that describes and generates from your own frame.

    lego-jax serve --config=configs/tiny.py --workdir=workdir/demo [--host=127.0.0.1] [--port=7860]

Reads WORKDIR's trained models: the VLLM (checkpoints/vllm), the VAE (checkpoints/vae), the LEGO
LDM (checkpoints/ldm) and, when present, the action-label-only baseline LDM
(baseline_action_label/checkpoints/ldm, as `lego-jax demo` makes it), plus up to 16 held-out
examples of the test split's records. Pass the --config (and overrides) the models were trained
with. Nothing is written to WORKDIR.

The page (http://HOST:PORT/): upload a frame or pick a held-out example, type an action, press
Generate: the VLLM's enriched description shows first, then the generated frame of LEGO and,
beside it, the baseline's; guidance scales, steps and seed are controls, each result a download.
Models load and compile once at start-up (the page answers once they have); new guidance scales
or seeds do not recompile, each new step count compiles once. Requests queue and run one at a
time. A bad upload or action is answered with a message on the page.

Needs the serve extra: pip install -e '.[serve]' (FastAPI, uvicorn, python-multipart). A missing
workdir or checkpoint: one line naming it and the command that makes it, exit code 1.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, whose types
# are imported inside make_app (so a missing serve extra is a message, not an import error).
import collections
import importlib
import itertools
import queue
import re
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from absl import flags

from lego_jax.errors import UserError

_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on (0.0.0.0: every "
                            "interface, reachable from other machines)")
_PORT = flags.DEFINE_integer("port", 7860, "serve: the port to listen on")

# What `lego-jax serve --help` lists as read: the VLLM's, the LDM's and the sampler's sections.
CONFIG_SECTIONS = ("data", "clip_vision", "llama", "llava", "vllm_train", "vllm_generate", "vae",
                   "vae_train", "unet", "clip_text", "conditioner", "ldm_train", "sampler", "mesh")
PAGE = Path(__file__).with_name("page.html")
KEEP_JOBS = 64  # finished results kept for download (oldest dropped first)


class Job:
  def __init__(self, seq: int, frame, note: str, action: str, settings):
    self.seq, self.id = seq, f"{seq}-{secrets.token_hex(4)}"
    self.frame, self.note, self.action, self.settings = frame, note, action, settings
    self.state, self.stage, self.error = "queued", "", ""
    self.description = ""
    self.started = self.stage_started = 0.0
    self.stage_expected = 0.0
    self.results: dict[str, bytes] = {}   # "input", "lego", "baseline" -> PNG bytes
    self.labels: dict[str, str] = {}
    self.seconds: dict[str, float] = {}


class Queue:
  """Jobs run one at a time on one worker thread (one model, one device)."""

  def __init__(self, engine, log=print):
    self.engine, self.log = engine, log
    self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
    self.waiting: queue.Queue[Job] = queue.Queue()
    self.lock = threading.Lock()
    self.ids = itertools.count(1)
    threading.Thread(target=self._work, name="lego-serve-worker", daemon=True).start()

  def submit(self, frame, note, action, settings) -> Job:
    with self.lock:
      job = Job(next(self.ids), frame, note, action, settings)
      self.jobs[job.id] = job
      while len(self.jobs) > KEEP_JOBS:
        old = next(iter(self.jobs.values()))
        if old.state not in ("done", "error"):
          break
        self.jobs.popitem(last=False)
    self.waiting.put(job)
    return job

  def ahead_of(self, job: Job) -> int:
    with self.lock:
      return sum(1 for j in self.jobs.values()
                 if j.state in ("queued", "describing", "sampling") and j.seq < job.seq)

  def _stage(self, job: Job, state: str, stage: str, key: str, steps: int) -> bool:
    compiling = key != "describe" and (key, steps) not in self.engine.compiled
    job.state, job.stage = state, stage + (" (compiling this step count, once)" if compiling else "")
    job.stage_started, job.stage_expected = time.perf_counter(), self.engine.expected(key, steps)
    return compiling

  def _work(self) -> None:
    from lego_jax.serve import engine as engine_lib

    eng = self.engine
    while True:
      job = self.waiting.get()
      job.started = time.perf_counter()
      try:
        size = engine_lib.output_size(job.frame)
        job.results["input"] = engine_lib.to_png(job.frame, size)
        self._stage(job, "describing", "the VLLM writes the enriched description", "describe", 0)
        described = eng.describe(job.frame, job.action)
        job.description = described.description
        eng.record("describe", 0, time.perf_counter() - job.stage_started, False)
        for key, model in zip(("lego", "baseline"), eng.ldms):
          steps = job.settings.num_steps
          compiling = self._stage(job, "sampling", f"{model.label}: {steps} sampler steps",
                                  model.label, steps)
          frame = eng.generate(model, job.frame, described, job.action, job.settings)
          eng.record(model.label, steps, time.perf_counter() - job.stage_started, compiling)
          job.results[key] = engine_lib.to_png(frame, size)
          job.labels[key] = model.label
        state = "done"
      except UserError as e:
        state, job.error = "error", str(e)
      except Exception as e:  # the server stays up; the page gets one line, the log the rest
        import traceback

        traceback.print_exc()
        state, job.error = "error", f"generation failed ({type(e).__name__}: {e})"[:500]
      job.seconds["total"] = round(time.perf_counter() - job.started, 2)
      job.frame, job.state = None, state  # the state last: a poll that sees it sees the rest
      self.log(f"serve: request {job.id} {job.state} in {job.seconds['total']:.1f} s"
               + (f": {job.error}" if job.error else ""))

  def status(self, job: Job) -> dict:
    out = {"id": job.id, "state": job.state, "stage": job.stage, "error": job.error,
           "note": job.note, "action": job.action, "description": job.description,
           "results": {k: {"label": job.labels.get(k, "input"),
                           "url": f"/api/jobs/{job.id}/{k}.png"} for k in job.results},
           "seconds": job.seconds}
    if job.state == "queued":
      out["ahead"] = self.ahead_of(job)
    elif job.state in ("describing", "sampling"):
      elapsed = time.perf_counter() - job.stage_started
      out["elapsed"] = round(elapsed, 1)
      out["expected"] = round(job.stage_expected, 1)
    return out


def _form_error(message: str, status: int = 400):
  from fastapi.responses import JSONResponse

  return JSONResponse({"error": message}, status_code=status)


def make_app(engine, log=print):
  """The FastAPI app over a loaded (and warmed-up) Engine."""
  from fastapi import FastAPI, File, Form, UploadFile
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import HTMLResponse, Response

  from lego_jax.serve import engine as engine_lib

  jobs = Queue(engine, log)
  app = FastAPI(title="lego-jax serve", docs_url=None, redoc_url=None, openapi_url=None)
  page = PAGE.read_text()

  @app.exception_handler(RequestValidationError)
  async def _bad_form(request, exc):  # a missing or mistyped field: one line, not a schema dump
    names = ", ".join(str(e.get("loc", ["?"])[-1]) for e in exc.errors())
    return _form_error(f"the request lacks or mistypes: {names}")

  @app.exception_handler(Exception)
  async def _failed(request, exc):  # the page shows one line; the server's log has the rest
    import traceback

    traceback.print_exception(exc)
    return _form_error(f"the server failed on this request ({type(exc).__name__}: {exc})"[:500],
                       500)

  @app.get("/", response_class=HTMLResponse)
  def index():
    return page

  @app.get("/api/info")
  def info():
    s = engine.cfg.sampler
    return {"config": engine.cfg.name, "workdir": str(engine.workdir),
            "models": [m.label for m in engine.ldms],
            "defaults": {"text_scale": float(s.text_guidance),
                         "image_scale": float(s.image_guidance), "steps": engine.default_steps,
                         "seed": int(s.seed)},
            "step_choices": list(engine.step_choices),
            "compiled_steps": engine.compiled_steps,
            "compilations": engine.compilations.count,
            "max_action_chars": engine_lib.MAX_ACTION_CHARS,
            "max_upload_mib": engine_lib.MAX_UPLOAD_BYTES >> 20,
            "image_size": engine.image_size,
            "examples": [{"index": i, "id": e["id"], "action": e["action"],
                          "url": f"/api/examples/{i}.jpg"} for i, e in enumerate(engine.examples)]}

  @app.get("/api/examples/{index}.jpg")
  def example(index: int):
    if not 0 <= index < len(engine.examples):
      return _form_error(f"no example {index}", 404)
    return Response(engine.examples[index]["jpeg"], media_type="image/jpeg")

  @app.post("/api/jobs")
  def submit(image: UploadFile | None = File(None), example: str = Form(""), action: str = Form(""),
             text_scale: str = Form(""), image_scale: str = Form(""), steps: str = Form(""),
             seed: str = Form("")):
    # sync: FastAPI runs it on its thread pool, so checking a big upload does not block others
    try:
      if image is not None and image.filename:
        data = image.file.read(engine_lib.MAX_UPLOAD_BYTES + 1)
        frame, note = engine_lib.read_upload(data, _name(image.filename), engine.image_size)
      elif example.strip():
        try:
          e = engine.examples[int(example)]
        except (ValueError, IndexError):
          raise UserError(f"no held-out example {example!r}") from None
        frame, note = engine_lib.read_upload(e["jpeg"], f"example {e['id']}", engine.image_size)
      else:
        raise UserError("no frame: upload an image or pick a held-out example")
      action = engine_lib.check_action(action)
      engine.check_prompt(action)
      d = engine.cfg.sampler
      settings = engine_lib.Settings.parse(text_scale or d.text_guidance,
                                           image_scale or d.image_guidance,
                                           steps or engine.default_steps,
                                           seed if seed != "" else d.seed, engine.step_choices)
    except UserError as e:
      return _form_error(str(e))
    job = jobs.submit(frame, note, action, settings)
    return jobs.status(job)

  @app.get("/api/jobs/{job_id}")
  def status(job_id: str):
    job = jobs.jobs.get(job_id)
    if job is None:
      return _form_error(f"no request {job_id} (results are kept for the last {KEEP_JOBS})", 404)
    return jobs.status(job)

  @app.get("/api/jobs/{job_id}/{name}.png")
  def result(job_id: str, name: str, download: int = 0):
    job = jobs.jobs.get(job_id)
    if job is None or name not in job.results:
      return _form_error(f"no result {name!r} for request {job_id}", 404)
    headers = {}
    if download:
      slug = re.sub(r"[^a-z0-9]+", "_", job.action.lower()).strip("_")[:40] or "frame"
      headers["Content-Disposition"] = f'attachment; filename="{name}_{slug}.png"'
    return Response(job.results[name], media_type="image/png", headers=headers)

  app.state.jobs = jobs
  return app


def _name(filename: str) -> str:
  return Path(filename).name[:80] or "upload"


def main(cfg, workdir: Path) -> int:
  from lego_jax.infer import sampler as sampler_lib
  from lego_jax.serve import engine as engine_lib

  try:
    importlib.import_module("fastapi")
    importlib.import_module("multipart")  # python-multipart: FastAPI's form parser
    import uvicorn
  except ImportError as e:
    print(f"lego-jax serve: error: {e.name} is not installed: install the serve extra, "
          "pip install -e '.[serve]'", file=sys.stderr)
    return 1
  workdir = Path(workdir)
  sampler_lib.check_settings(cfg.sampler)   # before the models load and compile
  lack = engine_lib.missing(cfg, workdir)
  if lack:
    print(f"lego-jax serve: error: {lack}", file=sys.stderr)
    return 1
  try:  # before minutes of loading: is the address free?
    family = socket.AF_INET6 if ":" in _HOST.value else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind((_HOST.value, _PORT.value))
  except OSError as e:
    print(f"lego-jax serve: error: cannot listen on {_HOST.value}:{_PORT.value} ({e.strerror}): "
          "choose another --port or --host", file=sys.stderr)
    return 1
  log = lambda msg: print(msg, flush=True)
  log(f"serve: loading the models of {workdir} ({cfg.name})")
  engine = engine_lib.Engine(cfg, workdir, log)
  engine.warm_up(log)
  app = make_app(engine, log)
  host = _HOST.value
  shown = f"[{host}]" if ":" in host else host
  log(f"serve: open http://{shown}:{_PORT.value}/ (Ctrl-C stops)")
  uvicorn.run(app, host=host, port=_PORT.value, log_level="warning")
  return 0
