"""`lego-jax <command> [--config=configs/NAME.py] [--config.section.key=value] [--workdir=DIR]`.

Each command lives in the module of its stage and exposes `main(cfg, workdir)`; the module is
imported before flags are parsed so it can define its own absl flags. User mistakes (bad paths,
bad inputs, unknown config keys) end in one clear line on stderr and exit code 2, no traceback.
A training stage stopped by SIGTERM exits 143 after its checkpoint is complete; one stopped by a
non-finite loss exits 1. Both say so in one line.

Multi-host: `--coordinator_address`, `--num_processes`, `--process_id` start the JAX distributed
runtime before anything else runs (TPU pods, SLURM and Open MPI need none of them: detected).
`lego-jax plan` compiles for TPU / GPU targets without them, on the CPU platform set up before JAX
starts any backend.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from lego_jax import config as config_lib
from lego_jax.errors import DataError, UserError

# command -> (module, one-line help). The module has `main(cfg, workdir) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("lego_jax.data.prepare", "write the dataset (synthetic default or a LEGO release) as ArrayRecord"),
    "show-data": ("lego_jax.data.show", "contact-sheet PNG of N examples: input | target | action | description"),
    "train-vae": ("lego_jax.train.vae", "train the KL autoencoder (the embedded default has no SD weights)"),
    "train-vllm": ("lego_jax.train.vllm", "LLaVA visual instruction tuning: the VLLM writes enriched descriptions"),
    "extract": ("lego_jax.infer.extract", "VLLM descriptions + H_i/H_t features of every split -> WORKDIR/features"),
    "import-features": ("data_prep.release_features", "the release's .npy H_i/H_t features of a split -> WORKDIR/features"),
    "describe": ("lego_jax.infer.describe", "print the VLLM's enriched description of one frame (--image, --action)"),
    "train-ldm": ("lego_jax.train.ldm", "train LEGO's latent diffusion model on frames + VLLM features"),
    "generate": ("lego_jax.infer.generate", "generate action frames (a records split, or --image/--action)"),
    "plan": ("lego_jax.plan", "compile the full-size train steps ahead of time: memory, FLOPs, which hardware fits"),
    "convert": ("lego_jax.weights.convert", "PyTorch checkpoint (SD-1.5, LEGO, LLaVA, CLIP, ...) -> Orbax"),
    "demo": ("lego_jax.demo", "run the whole pipeline on the embedded default config"),
    "evaluate": ("lego_jax.eval.evaluate", "score generated frames against ground truth"),
    "bench": ("lego_jax.bench.bench", "time a step (unet-train, ldm-train, vllm-train, vllm-decode, sample, data), optionally vs PyTorch"),
    "serve": ("lego_jax.serve.app", "a local web page: describe and generate from your own frame (needs the serve extra)"),
}
# Commands that only read WORKDIR: it is neither made nor written (a missing one is their error).
READ_ONLY = ("serve",)

# The arguments config_flags reads its --config.* overrides from: set by run(), empty at import
# (by default it reads sys.argv while the module is imported, where a mistyped key would raise a
# traceback before run() could report it, and a second in-process run() would see the first's).
_ARGV: list[str] = []
_DEFAULT_CONFIG = str(config_lib.CONFIG_DIR / "tiny.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "ml_collections config file", lock_config=True, sys_argv=_ARGV)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "where this run writes everything")
# Flags several commands share are defined once here (absl forbids defining a name twice, and the
# demo imports every stage); a command reads them as flags.FLAGS.<name>.
flags.DEFINE_string("image", None, "describe/generate: path of one input frame")
flags.DEFINE_string("action", None, "describe/generate: the action prompt, e.g. 'cut the carrot'")
flags.DEFINE_string("split", None, "which split of the records a command reads")
flags.DEFINE_string("out", None, "where a command writes its main output (default: in WORKDIR)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process runs without a cluster manager: host:port of "
    "process 0 (TPU pods, SLURM and Open MPI are detected without it)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --coordinator_address: 0 .. N-1")
_DATA_SHARDS = flags.DEFINE_integer(
    "data_shards", None, "split the training data into this many shards (default: one per "
    "process); runs with equal counts see equal global batches on any number of hosts")


# Exceptions that mean "the user gave something wrong", not "the code is broken".
def _user_error_types():
  from lego_jax.weights.io import WeightPathError
  from lego_jax.train.checkpoint import CheckpointMismatchError
  from lego_jax.weights.mapping import KeyMappingError

  # KeyMappingError: the weight file and the config's model disagree (as a checkpoint of another
  # config does): fix the config or pick the file meant for it. A damaged or unreadable weight
  # file (WeightFileError) is a data fault instead: exit 1 (below).
  return (UserError, config_lib.ConfigError, KeyMappingError, FileNotFoundError,
          CheckpointMismatchError, WeightPathError)


def _usage() -> str:
  width = max(len(c) for c in COMMANDS)
  lines = ["usage: lego-jax <command> [--config=...] [--workdir=...] [flags]", "", "commands:"]
  lines += [f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items()]
  return "\n".join(lines)


# Flags every command takes; the shared --image/--action/--split/--out are listed by the commands
# that read them (their module's CLI_FLAGS).
_COMMON_FLAGS = ("config", "workdir", "coordinator_address", "num_processes", "process_id",
                 "data_shards")


def command_help(command: str, module) -> str:
  """What `lego-jax <command> --help` prints: the command's purpose (its one-line help and its
  module's docstring), its flags, and the config sections it reads (the module's
  CONFIG_SECTIONS)."""
  import textwrap

  lines = [f"usage: lego-jax {command} [--config=configs/NAME.py] [--workdir=DIR] "
           "[--config.section.key=value ...] [flags]", "", COMMANDS[command][1] + "."]
  doc = (module.__doc__ or "").strip()
  if doc:
    lines += ["", textwrap.dedent(doc)]
  own = flags.FLAGS.get_flags_for_module(module.__name__)
  shared = [flags.FLAGS[n] for n in getattr(module, "CLI_FLAGS", ())]
  common = [flags.FLAGS[n] for n in _COMMON_FLAGS]
  for title, group in (("flags of this command", own + shared), ("common flags", common)):
    if group:
      lines += ["", title + ":"]
      for f in sorted(group, key=lambda f: f.name):
        default = "" if f.default is None else f" (default: {f.default_as_str})"
        lines.append(f"  --{f.name}: {f.help}{default}")
  sections = getattr(module, "CONFIG_SECTIONS", None)
  lines += ["", "config sections read: " + (", ".join(sections) if sections else "not declared"),
            "  (any key: --config.section.key=value; the values are in the config file)"]
  return "\n".join(lines)


def _config_file_of(args: list[str]) -> str | None:
  for i, a in enumerate(args):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(args):
      return args[i + 1]
  return None


def _parse_flags(command: str, argv: list[str]) -> list[str]:
  """absl's flag parsing with every mistake in a flag or config override as one line, exit 2
  (absl and ml_collections would print a traceback or exit 1)."""
  def fail(msg: str):
    print(f"lego-jax {command}: error: {msg}", file=sys.stderr)
    sys.exit(2)

  config_file = _config_file_of(argv[1:])
  if config_file is not None:
    path = config_file.partition(":")[0]
    if not Path(path).is_file():
      fail(f"config file not found: {path} (give a path, e.g. --config=configs/tiny.py)")
  if config_file is None:
    argv = argv[:1] + [f"--config={_DEFAULT_CONFIG}"] + argv[1:]
  _ARGV[:] = argv
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # a previous run()'s overrides (tests run several in-process)
  overrides = [a.split("=", 1)[0][len("--config."):] for a in argv[1:]
               if a.startswith("--config.")]
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value  # loads the file and applies the overrides now, not at first use
  except flags.Error as e:
    fail(str(e).strip().splitlines()[0])
  except (KeyError, AttributeError) as e:
    key = str(e).strip("'\" ").split("'")[0]
    culprit = next((o for o in overrides if key in o.split(".")), key)
    fail(f"unknown config key {culprit!r}" + (f" ({key!r} does not exist)" if culprit != key else "")
         + "; the keys are those of the config file's sections (configs/NAME.py)")
  except (TypeError, ValueError, config_lib.ConfigError) as e:
    fail(f"config: {str(e).strip().splitlines()[0]}")
  except Exception as e:  # noqa: BLE001  (a config file that does not load)
    fail(f"config file {config_file}: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
  return rest


# OS errors that mean "the workdir / disk cannot take what we write", not a bug.
_ENVIRONMENT_ERRNOS = ("EROFS", "EACCES", "EPERM", "ENOSPC", "EDQUOT", "EEXIST", "ENOTDIR",
                       "EISDIR")


def _environment_error(e: OSError) -> bool:
  import errno

  return any(e.errno == getattr(errno, n, None) for n in _ENVIRONMENT_ERRNOS)


def _restore_record(record: Path | None, before: bytes | None) -> None:
  """A refused invocation (a usage error, exit 2) leaves the workdir's record of the command's
  config as it was: the earlier run's, or none. Runs that fail on data keep theirs: they ran as
  recorded, and their checkpoints may already be written."""
  if record is None:
    return
  if before is None:
    record.unlink(missing_ok=True)
  else:
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_bytes(before)
    os.replace(tmp, record)


def run(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"lego-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(COMMANDS[command][0])
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[2:]):
    print(command_help(command, module))
    sys.exit(0)
  if command == "plan":
    module.use_fake_devices()  # before any JAX backend starts

  def main(_):
    from lego_jax.data.records import RecordFileError
    from lego_jax.parallel import distributed
    from lego_jax.train.checkpoint import CheckpointDamagedError, Preempted
    from lego_jax.train.common import NonFiniteError
    from lego_jax.weights.io import WeightFileError

    cfg = _CONFIG.value
    workdir = Path(_WORKDIR.value)
    try:
      if command != "plan":
        started = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                         _PROCESS_ID.value)
        logging.info("lego-jax %s: %s", command, started)
      distributed.set_data_shards(_DATA_SHARDS.value)
    except ValueError as e:
      print(f"lego-jax {command}: error: {e}", file=sys.stderr)
      return 2
    import jax

    record, before = None, None
    try:
      if command not in READ_ONLY:
        workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
          record = workdir / f"config.{command}.json"
          before = record.read_bytes() if record.is_file() else None
          config_lib.save(cfg, workdir, record.name)
      return module.main(cfg, workdir) or 0
    except _user_error_types() as e:
      msg = str(e).strip() or type(e).__name__
      print(f"lego-jax {command}: error: {msg}", file=sys.stderr)
      _restore_record(record, before)
      return 2
    except Preempted as e:
      print(f"lego-jax {command}: {e}", file=sys.stderr)
      return Preempted.exit_code
    except (NonFiniteError, CheckpointDamagedError, RecordFileError,
            WeightFileError, DataError) as e:  # data faults: exit 1
      print(f"lego-jax {command}: error: {e}", file=sys.stderr)
      return 1
    except OSError as e:
      if not _environment_error(e):
        raise
      where = f"{e.filename}: " if e.filename else ""
      print(f"lego-jax {command}: error: {where}{e.strerror or e} (--workdir must be a writable "
            "directory with free space)", file=sys.stderr)
      return 1

  logging.set_verbosity(logging.WARNING)
  try:
    app.run(main, argv=[f"lego-jax {command}"] + argv[2:],
            flags_parser=lambda a: _parse_flags(command, a))
  except config_lib.ConfigError as e:
    print(f"lego-jax {command}: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
