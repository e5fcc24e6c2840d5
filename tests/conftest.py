"""Test-wide settings: 8 fake CPU devices for mesh tests, one thread per library.

JAX and torch share the CI machine's two cores; without pinning, torch's thread pool fights
XLA's and runs tens of times slower.
"""

import importlib
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Through jax's config rather than XLA_FLAGS: XLA stops parsing XLA_FLAGS at the first malformed
# entry, and a flag lost there once left every mesh test with a single device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", 8)

jax.config.update("jax_default_matmul_precision", "highest")  # parity tests compare fp32 exactly

try:
  import torch  # noqa: E402

  torch.set_num_threads(1)
except ImportError:
  pass

importlib.import_module("lego_jax")  # applies the project's flax settings


# The files that run whole commands in subprocesses take minutes each; the rest take seconds.
# Scheduled first (launch/test.sh turns off xdist's reordering by test count), they overlap each
# other and the short files fill the gaps, instead of one of them starting last on an idle suite.
SLOW_FIRST = ("tests/parallel/test_multihost.py", "tests/train/test_resume.py",
              "tests/test_demo.py", "tests/serve/test_serve.py", "tests/train/test_checkpoint.py",
              "tests/eval/test_looks.py", "tests/train/test_ldm_cache.py",
              "tests/parallel/test_plan.py", "tests/parallel/test_plan_targets.py",
              "tests/eval/test_release_comparison.py", "tests/test_bad_input.py",
              "tests/data/test_worker_exit.py")


# Tests marked `extended` cost minutes and repeat what a cheaper test covers for another model;
# the 20-minute CI on 2 cores leaves them out (docs/testing.md lists them), LEGO_EXTENDED_TESTS=1
# runs them.
EXTENDED = os.environ.get("LEGO_EXTENDED_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))
  if not EXTENDED:
    skip = pytest.mark.skip(reason="extended test, outside the CI budget: LEGO_EXTENDED_TESTS=1 "
                                   "bash launch/test.sh runs it")
    for item in items:
      if "extended" in item.keywords:
        item.add_marker(skip)
