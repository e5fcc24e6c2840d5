#!/usr/bin/env bash
# Quickstart command 2: a virtual env with the test extras, then the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# plan-tpu / plan-gpu: the TPU and GPU compilers tests/parallel/test_plan_targets.py compiles for;
# serve: tests/serve/test_serve.py's page.
python -m pip install -q -e ".[test,serve,plan-tpu,plan-gpu]"
# tests/serve/test_serve.py drives `lego-jax serve` in Debian's headless chromium (Playwright fetches no
# browser); installed when missing and this runs as root, else that test file is skipped.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "launch/test.sh: chromium could not be installed; tests/serve/test_serve.py will skip" >&2
fi
# The lpips package ships the real LPIPS linear heads the eval tests load; its torchvision
# requirement would pull a CUDA torch, so it comes without dependencies.
python -m pip install -q --no-deps "lpips==0.1.4"
# JAX and torch share two cores in CI: one thread each per process, two test processes.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 TF_CPP_MIN_LOG_LEVEL=3
# CPU only: with the CUDA plugin and libtpu installed (plan-gpu, plan-tpu) and no platform named,
# JAX tries both backends in every process and logs their failure with a traceback.
export JAX_PLATFORMS=cpu
# Only "--" flags: XLA stops reading XLA_FLAGS at the first bare word, which silently dropped the
# 8 fake devices conftest.py appends after it.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false"
# One JAX compilation cache for the run, new each time: the two test processes and the commands
# the tests start compile many of the same programs (the tiny config's steps in several files);
# each is compiled once. Tests that need a cache of their own still set theirs.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d)"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
  export JAX_COMPILATION_CACHE_DIR
fi
# The 25 slowest tests, printed last: where the 20-minute CI budget goes.
python -m pytest -n "${LEGO_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=25 tests "$@"
