"""What the tests that run lego-jax commands as processes share: the smallest model flags, and
killing a process with SIGKILL at a chosen moment."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable

# The smallest models the training commands accept (test_ldm.py's UNet, text encoder and
# conditioner; the conditioner's llm_dim stays the VLLM's width). Tests add steps, batch sizes
# and checkpoint cadence.
SMALL_VAE = ["--config.vae.block_out_channels=(8,)", "--config.vae.layers_per_block=1",
             "--config.vae.norm_groups=4", "--config.data.image_size=16",
             "--config.vae_train.batch_size=8", "--config.vae_train.log_every=1"]
SMALL_VLLM = ["--config.llama.num_layers=1", "--config.clip_vision.num_layers=2"]
SMALL_LDM = ["--config.unet.block_out_channels=(16,32)",
             "--config.unet.attention_levels=(False,True)", "--config.unet.num_heads=2",
             "--config.unet.context_dim=16", "--config.unet.norm_groups=8",
             "--config.clip_text.hidden_size=16", "--config.clip_text.intermediate_size=32",
             "--config.clip_text.num_layers=1", "--config.clip_text.num_heads=2",
             "--config.conditioner.context_dim=16", "--config.conditioner.num_heads=2",
             "--config.conditioner.ffn_dim=32", "--config.conditioner.num_layers=1",
             "--config.ldm_train.log_every=1", "--config.ldm_train.sample_every=0",
             # The frozen encoders in the step (the tiny default caches them; test_ldm_cache.py
             # and the demo test run that path).
             "--config.ldm_train.cache_frozen=false"]


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float,
              poll_s: float = 0.01) -> None:
  """SIGKILL `proc` as soon as `ready()` holds, polled every `poll_s` seconds. Fails (with the
  end of its stderr) if the process exits first or `timeout` seconds pass; the process never
  outlives this call."""
  try:
    deadline = time.monotonic() + timeout
    while not ready():
      assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else proc.returncode
      assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
      time.sleep(poll_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
