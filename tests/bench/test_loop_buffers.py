"""The decode loop on XLA:GPU (a deviceless H100 compile): with per-layer weights an iteration
materialises no weight-sized buffer; the stacked scan copies every weight matrix out of the
stacked arrays each trip (what held LLaMA-2-13B decoding on the H200 to 1.22 of 4.8 TB/s,
2026-12-04), and XLA's dot merger would concatenate the q/k/v (gate/up) weights each trip under cuBLAS."""

import jax.numpy as jnp
import pytest

from lego_jax import plan
from lego_jax.bench import loop_buffers as lb
from lego_jax.models.llama import LlamaConfig

# Widths where XLA:GPU runs the projections as GEMMs at batch 4 (narrower ones or batch 1 at
# these widths become multiply-and-reduce fusions, weight-sized by construction).
CFG = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_layers=2,
                  num_heads=8, num_kv_heads=8, max_position=64, dtype=jnp.bfloat16,
                  param_dtype=jnp.bfloat16)
WEIGHT = 1024 * 1024


@pytest.fixture(scope="module")
def device():
  target = plan.target_of("h100-80g-x8")
  missing = plan.compiler_missing(target)
  if missing:
    pytest.skip(missing)
  return plan.target_devices(target)[0]


def _buffers(device, unstack, options=None):
  compiled = lb.compile_decode(CFG, device, batch=4, prompt_len=16, new_tokens=4,
                               unstack_layers=unstack, options=options)
  return lb.loop_buffers(compiled.as_text(), WEIGHT)


def test_per_layer_weights_are_read_in_place(device):
  stacked = _buffers(device, unstack=False)
  copies = [n for found in stacked.values() for (op, shape, called), n in found.items()
            if "dynamic_slice" in called]
  # 7 weight matrices per block (q, k, v, o, gate, up, down), copied out of the stacked arrays.
  assert sum(copies) >= 7, stacked
  per_layer = _buffers(device, unstack=True)
  assert len(per_layer) == 1                      # the one-token loop; the blocks are unrolled
  assert all(not found for found in per_layer.values()), per_layer


def test_no_weight_concatenation_under_cublas(device):
  cublas = {"xla_gpu_enable_triton_gemm": False}
  assert all(not f for f in _buffers(device, True, cublas).values())
  merged = _buffers(device, True, {**cublas, "xla_gpu_dot_merger_threshold_mb": 32})
  concatenated = sorted((shape, n) for found in merged.values()
                        for (op, shape, called), n in found.items() if "concatenate" in called)
  # Each of the 2 blocks' q, k and v joined into one (1024, 3072) weight and gate and up into
  # one (1024, 4096), every trip.
  assert concatenated == [("bf16[1024,3072]", 2), ("bf16[1024,4096]", 2)], merged


def test_loop_buffers_reads_hlo_text():
  text = """HloModule m

%fused_a (p0: bf16[4,8]) -> bf16[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %c = bf16[4,8]{1,0} copy(%p0)
}

%body (t: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0)
  %w = bf16[4,8]{1,0} get-tuple-element(%t), index=1
  %f = bf16[4,8]{1,0} fusion(%w), kind=kLoop, calls=%fused_a
  %small = bf16[2]{0} fusion(%w), kind=kLoop, calls=%fused_a
  ROOT %r = (s32[], bf16[4,8]{1,0}) tuple(%i, %f)
}

ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {
  %w = (s32[], bf16[4,8]{1,0}) while(%x), condition=%cond, body=%body
}
"""
  found = lb.loop_buffers(text, 32)
  assert found == {"body": {("fusion", "bf16[4,8]", "fused_a"): 1}}
