"""`lego-jax <command> [--config=configs/NAME.py] [--config.section.key=value] [--workdir=DIR]`.

Each command lives in the module of its stage and exposes `main(cfg, workdir)`; the module is
imported before flags are parsed so it can define its own absl flags. User mistakes (bad paths,
bad inputs, unknown config keys) end in one clear line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from lego_jax import config as config_lib

# command -> (module, one-line help). The module has `main(cfg, workdir) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("lego_jax.data.prepare", "write the dataset (synthetic default or a LEGO release) as ArrayRecord"),
    "show-data": ("lego_jax.data.show", "contact-sheet PNG of N examples: input | target | action | description"),
    "train-vae": ("lego_jax.train.vae", "train the KL autoencoder (the embedded default has no SD weights)"),
    "demo": ("lego_jax.demo", "run the whole pipeline on the embedded default config"),
    "evaluate": ("lego_jax.eval.evaluate", "score generated frames against ground truth"),
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(config_lib.CONFIG_DIR / "tiny.py"), "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "where this run writes everything")


class UserError(Exception):
  """A mistake in the user's input: reported as one line, exit code 2."""


# Exceptions that mean "the user gave something wrong", not "the code is broken".
def _user_error_types():
  from lego_jax.weights.io import WeightFileError
  from lego_jax.weights.mapping import KeyMappingError

  return (UserError, config_lib.ConfigError, WeightFileError, KeyMappingError, FileNotFoundError)


def _usage() -> str:
  width = max(len(c) for c in COMMANDS)
  lines = ["usage: lego-jax <command> [--config=...] [--workdir=...] [flags]", "", "commands:"]
  lines += [f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items()]
  return "\n".join(lines)


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

  def main(_):
    cfg = _CONFIG.value
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, workdir, f"config.{command}.json")
    try:
      return module.main(cfg, workdir) or 0
    except _user_error_types() as e:
      msg = str(e).strip() or type(e).__name__
      print(f"lego-jax {command}: error: {msg}", file=sys.stderr)
      return 2

  logging.set_verbosity(logging.WARNING)
  try:
    app.run(main, argv=[f"lego-jax {command}"] + argv[2:])
  except config_lib.ConfigError as e:
    print(f"lego-jax {command}: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
