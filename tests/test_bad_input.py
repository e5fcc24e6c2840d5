"""Bad input through the CLI: every mistake is one line naming the culprit, exit 2 for usage or
config, 1 for the environment (workdir, disk), no traceback; every command answers --help with its
purpose, flags and config sections, exit 0; values a run cannot honour (negative steps, a batch
that does not split over the devices, a mesh of other size) are refused before anything runs;
`init_checkpoint` is where training starts.

The CLI's entry function runs in this process (JAX starts once); tests/procs.py's subprocess tests
cover what needs the process boundary (kill -9, leftover workers)."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lego_jax import cli
from lego_jax import config as config_lib
from lego_jax.parallel import sharding
from lego_jax.train import common
from lego_jax.train import vae as vae_train
from procs import SMALL_VAE, SMALL_VLLM

REPO = Path(__file__).resolve().parents[1]
# What XLA's C++ runtime prints on stderr in every process (absl log lines), not the command's.
RUNTIME_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                         r"|[IWE]\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\])")


def _cli(capsys, *args) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `lego-jax ARGS` run in this process."""
  with pytest.raises(SystemExit) as e:
    cli.run(["lego-jax", *args])
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def _one_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


@pytest.mark.parametrize("flag,message", [
    ("--config.no_such_key=1", "unknown config key 'no_such_key'"),
    ("--config.vae_train.nope=2", "unknown config key 'vae_train.nope' ('nope' does not exist)"),
    ("--config.data.no.x=1", "unknown config key 'data.no.x' ('no' does not exist)"),
    ("--config.vae_train.num_steps=abc",
     "flag --config.vae_train.num_steps=abc: invalid literal for int() with base 10: 'abc'"),
    ("--config=configs/no_such_config.py", "config file not found: configs/no_such_config.py"),
])
def test_config_mistakes_are_one_line_exit_2(capsys, tmp_path, flag, message):
  code, _, err = _cli(capsys, "train-vae", f"--workdir={tmp_path}", flag)
  assert code == 2
  assert _one_line(err).startswith(f"lego-jax train-vae: error: {message}")
  assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flags,message", [
    (["--config.vae_train.num_steps=-5"],
     "vae_train.num_steps=-5 is negative: give the number of steps (>= 0)"),
    # 8 CPU devices in the tests. An odd VAE batch (half input, half target frames) once trained
    # on one image fewer than it reported.
    (["--config.vae_train.batch_size=3"], "vae_train.batch_size=3 (half input, half target "
     "frames, per host) must be a positive multiple of 8"),
    (["--config.vae_train.batch_size=12"], "vae_train.batch_size=12 (half input, half target "
     "frames, per host) must be a positive multiple of 8"),
    (["--config.mesh.shape=(2,1,1)"],
     "mesh shape (2, 1, 1) needs 2 devices, 8 available: set --config.mesh.shape"),
])
def test_values_a_run_cannot_honour_are_refused_at_start(capsys, tmp_path, flags, message):
  code, _, err = _cli(capsys, "train-vae", f"--workdir={tmp_path}", *flags)
  assert code == 2
  assert _one_line(err).startswith(f"lego-jax train-vae: error: {message}")
  assert not (tmp_path / "checkpoints").exists()


def test_a_negative_generate_limit_is_refused_at_start(capsys, tmp_path):
  code, _, err = _cli(capsys, "generate", f"--workdir={tmp_path}", "--limit=-1")
  assert code == 2
  assert _one_line(err) == ("lego-jax generate: error: --limit=-1: give how many frames to "
                            "generate (0: all)")


@pytest.mark.parametrize("command", ["generate", "serve", "train-ldm"])
@pytest.mark.parametrize("flag,message", [
    ("--config.sampler.kind=euler", "cfg.sampler.kind='euler': one of euler_ancestral, ddim"),
    ("--config.sampler.output_norm=none", "cfg.sampler.output_norm='none': one of minmax, clamp"),
    ("--config.sampler.postprocess=pil", "cfg.sampler.postprocess='pil': one of release, project"),
    ("--config.sampler.num_steps=0", "cfg.sampler.num_steps=0: a whole number of steps, 1 or more"),
])
def test_bad_sampler_settings_are_refused_before_any_model_loads(capsys, tmp_path, command, flag,
                                                                 message):
  # generate and serve used to find out at the first batch (a ValueError's traceback, after the
  # models had loaded and the output folders were made); train-ldm at its first sample
  code, _, err = _cli(capsys, command, "--config=configs/tiny.py", f"--workdir={tmp_path}", flag)
  assert code == 2
  assert _one_line(err) == f"lego-jax {command}: error: {message}"
  # nothing made, not even the CLI's record of the invocation (it was refused)
  assert list(tmp_path.iterdir()) == []


def test_a_refused_invocation_keeps_the_record_of_the_run_before(capsys, tmp_path):
  # The CLI records a command's config in WORKDIR/config.<command>.json before the command
  # checks it; a refused invocation used to overwrite an earlier run's record there.
  record = tmp_path / "config.train-vae.json"
  record.write_text('{"the run before": true}')
  code, _, err = _cli(capsys, "train-vae", f"--workdir={tmp_path}",
                      "--config.vae_train.num_steps=-5")
  assert code == 2 and "vae_train.num_steps=-5 is negative" in _one_line(err)
  assert record.read_text() == '{"the run before": true}'
  assert sorted(f.name for f in tmp_path.iterdir()) == ["config.train-vae.json"]


def test_batch_split_over_data_parallel_devices():
  cfg = config_lib.load("tiny", ["ldm_train.batch_size=6", "mesh.shape=(4,1,2)"])
  mesh = sharding.make_mesh(cfg.mesh.shape)
  with pytest.raises(config_lib.ConfigError, match=r"ldm_train.batch_size=6 must be a positive "
                     r"multiple of 4: .* grad_accum=1 micro-batches over the 4 device\(s\)"):
    common.check_schedule("ldm_train", cfg.ldm_train, mesh)
  cfg.ldm_train.batch_size = 8
  common.check_schedule("ldm_train", cfg.ldm_train, mesh)
  cfg.ldm_train.grad_accum = 4
  with pytest.raises(config_lib.ConfigError, match="multiple of 16"):
    common.check_schedule("ldm_train", cfg.ldm_train, mesh)
  cfg.vae_train.batch_size = 3  # one device: the pairs still need an even batch
  with pytest.raises(config_lib.ConfigError, match="multiple of 2"):
    common.check_schedule("vae_train", cfg.vae_train, sharding.make_mesh(
        (1, 1, 1), devices=jax.devices()[:1]), pairs=True)
  cfg.vllm_train.num_steps = -1  # -1 = vllm_train.epochs passes
  cfg.vllm_train.batch_size = 8
  common.check_schedule("vllm_train", cfg.vllm_train, mesh, epochs_allowed=True)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_answers_help(capsys, command):
  code, out, err = _cli(capsys, command, "--help")
  assert code == 0 and not err
  module = __import__(cli.COMMANDS[command][0], fromlist=["_"])
  assert out.startswith(f"usage: lego-jax {command} ")
  assert cli.COMMANDS[command][1] in out  # its purpose
  assert "  --workdir: " in out and "  --config: " in out
  sections = ", ".join(module.CONFIG_SECTIONS)
  assert f"config sections read: {sections}\n" in out
  for name in getattr(module, "CLI_FLAGS", ()):
    assert f"  --{name}: " in out


@pytest.mark.parametrize("fault", ["workdir is a file", "read-only", "disk full"])
def test_a_workdir_that_cannot_be_written_is_one_line_exit_1(capsys, tmp_path, monkeypatch,
                                                            fault):
  workdir = tmp_path / "w"
  if fault == "workdir is a file":
    workdir.write_text("not a directory")
  else:
    code = {"read-only": errno.EROFS, "disk full": errno.ENOSPC}[fault]

    def fail(cfg, where, name="config.json"):
      raise OSError(code, os.strerror(code), str(Path(where) / name))

    monkeypatch.setattr(config_lib, "save", fail)
  code, _, err = _cli(capsys, "prepare-data", f"--workdir={workdir}")
  assert code == 1
  line = _one_line(err)
  reason = ("File exists" if fault == "workdir is a file" else
            os.strerror(errno.EROFS if fault == "read-only" else errno.ENOSPC))
  assert line.startswith(f"lego-jax prepare-data: error: {workdir}")
  assert line.endswith(f": {reason} (--workdir must be a writable directory with free space)")


def test_prepare_data_a_broken_annotation_is_a_data_fault_exit_1(capsys, tmp_path):
  """The annotation file itself is the culprit (exit 1, named); settings that clash with the
  records already in the workdir stay a usage error (exit 2)."""
  broken = tmp_path / "train.json"
  broken.write_text('{"clip": {"0": ')
  (tmp_path / "frames").mkdir()
  release = ["--config.data.source=lego_json", f"--config.data.frames_dir={tmp_path / 'frames'}",
             "--config.data.instructions=released_vllm_outputs"]
  code, _, err = _cli(capsys, "prepare-data", f"--workdir={tmp_path / 'w'}", *release,
                      f"--config.data.annotation_train={broken}")
  assert code == 1
  line = _one_line(err)
  assert line.startswith("lego-jax prepare-data: error: train annotation JSON ")
  assert str(broken) in line and "is not valid JSON" in line
  assert not list((tmp_path / "w").rglob("*.array_record*"))

  small = ["--config.data.synthetic.num_train=4", "--config.data.synthetic.num_val=0",
           "--config.data.synthetic.num_test=0", "--config.data.synthetic.num_instruction=0"]
  code, _, err = _cli(capsys, "prepare-data", f"--workdir={tmp_path / 's'}", *small)
  assert code == 0, err
  written = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*.array_record*")}
  code, _, err = _cli(capsys, "prepare-data", f"--workdir={tmp_path / 's'}", *small,
                      "--config.data.num_shards=3")
  assert code == 2
  assert "written from other inputs" in _one_line(err) and "num_shards" in err
  assert written and {p: p.stat().st_mtime_ns for p in written} == written  # kept as they were


def _small_vae_cfg(*extra):
  return config_lib.load("tiny", [f[len("--config."):] for f in SMALL_VAE] + list(extra))


def test_train_vae_starts_from_init_checkpoint(tmp_path):
  from lego_jax.models.vae import vae_to_torch
  from lego_jax.weights import io as weights_io

  cfg = _small_vae_cfg("vae_train.lr=1e-3", "seed=0")
  source = vae_train.build(cfg, nnx.Rngs(123))  # other weights than seed 0 gives
  path = weights_io.write_safetensors(vae_to_torch(source), tmp_path / "vae.safetensors")
  want = nnx.state(source, nnx.Param)
  cfg.vae_train.init_checkpoint = str(path)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])  # one device compiles fastest
  graphdef, state, _, tx = vae_train.init_state(cfg, mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["trained"]), jax.device_get(want))

  # The first step moves the weights by at most the learning rate (Adam's step), from F.
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
  step = jax.jit(vae_train.make_train_step(graphdef, tx, cfg.vae_train.kl_weight,
                                           cfg.vae_train.l2_weight))
  state, _ = step(state, {"images": jnp.asarray(images)}, jax.random.key(0))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       jax.device_get(state["trained"]), jax.device_get(want))
  assert 0 < max(jax.tree.leaves(moved)) <= 1.01e-3

  # Without a train-vae checkpoint the VAE used later is F itself; with one, the trained VAE.
  loaded = vae_train.load_trained(cfg, tmp_path)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.state(loaded, nnx.Param)),
               jax.device_get(want))


def test_train_vllm_starts_from_init_checkpoint(tmp_path):
  from lego_jax.models.llava import Llava, save_llava
  from lego_jax.train import vllm

  cfg = config_lib.load("tiny", [f[len("--config."):] for f in SMALL_VLLM])
  source = Llava(vllm.llava_config(cfg), rngs=nnx.Rngs(99))
  cfg.vllm_train.init_checkpoint = str(save_llava(source, tmp_path / "llava.safetensors"))
  model = vllm.initialise(cfg)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.state(model, nnx.Param)),
               jax.device_get(nnx.state(source, nnx.Param)))


def test_ldm_init_checkpoint_without_an_init_kind_is_refused(tmp_path):
  from lego_jax.train import ldm

  cfg = config_lib.load("tiny", ["ldm_train.init_checkpoint=/x/sd15.safetensors"])
  with pytest.raises(config_lib.ConfigError, match="ldm_train.init_checkpoint='/x/sd15.safetensors'"
                     " is read only with ldm_train.init=sd15 or lego"):
    ldm.initialise(cfg, tmp_path)


def test_a_failed_restore_lets_its_other_reads_finish_before_its_loop_closes():
  """The Orbax shutdown race, modelled: a restore is a gather of reads that TensorStore finishes
  in its own threads by calling back onto the restore's event loop. Orbax closes that loop as
  soon as one read fails; a read finishing later then hits a closed loop ("Event loop is
  closed", printed by TensorStore's thread, at times after our one-line message at exit)."""
  import asyncio
  import contextlib
  import threading

  from orbax.checkpoint._src import asyncio_utils

  from lego_jax.train import checkpoint as ckpt_lib

  late: list[str] = []
  threads: list[threading.Thread] = []
  release = threading.Event()

  async def read(fail: bool, wait_s: float):
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def io():  # finishes in another thread, as TensorStore's reads do
      if not fail:
        release.wait(wait_s)
      try:
        loop.call_soon_threadsafe(done.set_result, None)
      except RuntimeError as e:
        late.append(str(e))

    threads.append(threading.Thread(target=io))
    threads[-1].start()
    await done
    if fail:
      raise OSError("damaged array file")

  for settle in (False, True):
    late.clear()
    release.clear()
    # Orbax as it is: the other reads finish only after the failure reached us (released then).
    # Settled: the restore itself waits for them (each ends after 0.5 s on its own).
    wait_s = 0.5 if settle else 60.0

    async def restore():
      await asyncio.gather(read(True, wait_s), read(False, wait_s), read(False, wait_s))

    with ckpt_lib._reads_settle_on_failure() if settle else contextlib.nullcontext():
      with pytest.raises(OSError, match="damaged array file"):
        asyncio_utils.run_sync(restore())
    release.set()
    for t in threads:
      t.join()
    assert late == ([] if settle else ["Event loop is closed"] * 2)


def test_every_checkpoint_damaged_through_the_cli_is_one_line_and_a_clean_exit(tmp_path):
  """train-vae on a workdir whose only checkpoint lost its array files: the warning naming it,
  the one-line error, exit 1, and nothing after it (no traceback from threads at exit)."""
  from lego_jax.train import checkpoint as ckpt_lib

  cfg = _small_vae_cfg()
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, _ = vae_train.init_state(cfg, mesh)
  directory = tmp_path / "checkpoints" / "vae"
  with ckpt_lib.Checkpointer(directory) as ckpt:
    ckpt.save(1, state, None, {}, force=True)
  for f in (directory / "1" / "state" / "ocdbt.process_0" / "d").iterdir():
    f.unlink()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "lego_jax", "train-vae", f"--workdir={tmp_path}",
                         *SMALL_VAE], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  # XLA's runtime INFO lines (the plan-gpu extra's CUDA plugin, which CI installs) are not ours.
  lines = [line for line in proc.stderr.splitlines() if line.strip() and not RUNTIME_LOG.match(line)]
  assert len(lines) == 2, proc.stderr[-3000:]
  assert lines[0].startswith(f"lego-jax: checkpoint {directory}/1 is damaged (")
  assert lines[0].endswith("; no older one")
  assert lines[1].startswith(f"lego-jax train-vae: error: every checkpoint in {directory} is "
                             "damaged (1: ")
  assert (directory / "1").is_dir()  # nothing deleted


def _can_mount_tmpfs() -> bool:
  try:
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` and a tmpfs mount "
                    "(user namespaces); tests/test_bad_input.py's in-process cases still run")
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_prepare_data_on_a_real_full_or_read_only_disk(tmp_path, fault):
  """prepare-data on a real 1.2 MB tmpfs (it fills while the records are written: ArrayRecord
  reports that as a RuntimeError's text) or on a read-only one, in a private mount namespace:
  one line naming the file, exit 1, no staging directory left, the finished steps complete."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  work = mnt / "w"
  cmd = (f"{sys.executable} -m lego_jax prepare-data --workdir={work} "
         "--config.data.synthetic.num_train=16 --config.data.synthetic.num_val=4 "
         "--config.data.synthetic.num_test=4 --config.data.synthetic.num_instruction=0")
  setup = {"disk full": f"mount -t tmpfs -o size=1200k tmpfs {mnt}",
           "read-only": f"mount -t tmpfs tmpfs {mnt} && mkdir {work} && echo kept > "
                        f"{work}/notes.txt && mount -o remount,ro {mnt}"}[fault]
  # After the command: what it left, listed before the namespace (and its tmpfs) goes.
  script = (f"{setup} && {{ {cmd}; printf '\\nrc=%s\\n' $? >&2; cd {work} && find . | sort >&2; "
            "cat notes.txt >&2 2>/dev/null; true; }")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  lines = [line for line in proc.stderr.replace("\r", "\n").splitlines()]
  assert "rc=1" in lines and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in lines if line.startswith("lego-jax")]
  assert len(errors) == 1, proc.stderr[-3000:]
  reason = os.strerror(errno.ENOSPC if fault == "disk full" else errno.EROFS)
  assert errors[0].startswith(f"lego-jax prepare-data: error: {work}")
  assert errors[0].endswith(f": {reason} (--workdir must be a writable directory with free space)")
  left = lines[lines.index("rc=1") + 1:]
  assert not [p for p in left if "incomplete" in p], left  # no staging directory remains
  if fault == "read-only":
    assert left == [".", "./notes.txt", "kept"]  # nothing written, nothing lost
  else:
    # The disk filled while the records were written: the frames step finished, whole.
    assert "./raw/lego_train.json" in left and "./raw/frames" in left
    for kind in ("pairs", "instruct"):
      done = f"./records/lego/{kind}/1.0.0"
      assert (done in left) == (f"{done}/dataset_info.json" in left)  # a version dir is whole


@pytest.mark.parametrize("text", ['{"weight_map": ', '{"weight_map": {"a": 3}}'])
def test_a_malformed_bin_index_is_one_named_error(tmp_path, text):
  """The sharded PyTorch layout (pytorch_model.bin.index.json) as the safetensors one
  (tests/weights/test_weight_faults.py): a WeightFileError naming the file, not a JSONDecodeError."""
  from lego_jax.weights import io as weights_io

  (tmp_path / "pytorch_model.bin.index.json").write_text(text)
  with pytest.raises(weights_io.WeightFileError,
                     match="pytorch_model.bin.index.json: not a weight index"):
    weights_io.read_state_dict(tmp_path)


def test_weight_files_a_missing_path_exits_2_and_a_damaged_file_exits_1(capsys, tmp_path):
  """A weights path that names nothing is a usage mistake (exit 2); a file that is there but
  damaged is a data fault (exit 1): each one line naming the file."""
  missing = tmp_path / "nowhere.safetensors"
  code, _, err = _cli(capsys, "convert", "--kind=vae", f"--source={missing}",
                      f"--workdir={tmp_path / 'w1'}")
  assert code == 2 and str(missing) in _one_line(err), err
  damaged = tmp_path / "vae.safetensors"
  damaged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
  code, _, err = _cli(capsys, "convert", "--kind=vae", f"--source={damaged}",
                      f"--workdir={tmp_path / 'w2'}")
  assert code == 1 and "not a readable safetensors file" in _one_line(err), err
