"""Test-wide settings: 8 fake CPU devices for mesh tests, one thread per library.

JAX and torch share the CI machine's two cores; without pinning, torch's thread pool fights
XLA's and runs tens of times slower.
"""

import importlib
import os

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


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))
