"""launch/gpu_bench.sh's full-size command lines, without a GPU: a stand-in python records each
call, and every `lego-jax bench` call must name the config file before any `--config.x=` override
(ml_collections refuses an override that comes first: the first H200 lease lost the VLLM row to
that, 2026-12-04), run the groups in the documented order, and start with the preflight."""

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_full_size_command_lines(tmp_path):
  log = tmp_path / "calls.txt"
  fake = tmp_path / "python"
  # `python -c` (the script's arithmetic) runs for real; everything else is recorded.
  fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec python3 "$@"\n'
                  f'printf "%s\\n" "$*" >> {log}\nexit 0\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"),
         "ONLY": "unet vllm decode1 decode16 sample ldm", "PATH": os.environ["PATH"]}
  subprocess.run(["bash", str(ROOT / "launch" / "gpu_bench.sh")], env=env, check=True,
                 capture_output=True, text=True, timeout=60)
  benches = [line.split() for line in log.read_text().splitlines()
             if line.startswith("-m lego_jax bench ")]
  whats = [args[3] for args in benches]
  assert whats == ["ldm-train", "unet-train", "vllm-train", "vllm-decode", "vllm-decode",
                   "sample", "ldm-train"], whats
  assert "--config=configs/tiny.py" in benches[0]  # the preflight runs the embedded config
  for args in benches[1:]:
    first_override = next((i for i, a in enumerate(args) if a.startswith("--config.")), None)
    assert args.index("--config=configs/lego_ego4d.py") < (first_override or len(args)), args
  vllm = benches[2]
  assert "--config.llama.hidden_size=2048" in vllm and "--seq_len=2048" in vllm


def test_a_refused_preflight_turns_triton_gemms_off_for_every_bench(tmp_path):
  log = tmp_path / "calls.txt"
  fake = tmp_path / "python"
  # The tiny preflight fails (as the deviceless H100 compile did); everything else succeeds.
  fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec python3 "$@"\n'
                  f'printf "%s | %s\\n" "$*" "$XLA_FLAGS" >> {log}\n'
                  'case "$*" in *configs/tiny.py*) exit 1;; esac\nexit 0\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "ONLY": "unet",
         "XLA_FLAGS": ""}
  subprocess.run(["bash", str(ROOT / "launch" / "gpu_bench.sh")], env=env, check=True,
                 capture_output=True, text=True, timeout=60)
  benches = [line for line in log.read_text().splitlines()
             if line.startswith("-m lego_jax bench ")]
  assert len(benches) == 3, benches  # the preflight, its retry, the UNet bench
  assert "triton" not in benches[0] and benches[1].endswith("--xla_gpu_enable_triton_gemm=false")
  assert "unet-train" in benches[2] and benches[2].endswith("--xla_gpu_enable_triton_gemm=false")
  assert "triton_gemm=false" in (tmp_path / "out" / "xla_flags.txt").read_text()
