#!/usr/bin/env bash
# Every GPU row of the README's Performance table in ONE run that fits 10 minutes on one GPU, and
# the LDM step's measured memory against `lego-jax plan`'s row for the same program.
#
#   launch/gpu_bench.sh                      # the README set, within BUDGET_S (560 s)
#   ONLY="unet decode1" launch/gpu_bench.sh  # some of it
#   DRY_RUN=1 launch/gpu_bench.sh            # the same script on CPU at the embedded tiny sizes
#
# First, on a GPU, a preflight: the tiny train-ldm step with default XLA flags (see below).
# Groups, in this order (the README's rows first; a group that cannot start with 30 s of the
# budget left is skipped with a line saying so):
#   unet     UNet train step, batch 32, 256 px, context 410, bf16, vs PyTorch eager (>= 600/s)
#   vllm     VLLM instruction-tuning step at a 1.3B LLaMA shape, 2048 tokens, remat (MFU >= 40%)
#   decode1  LLaMA-2-13B decode with H_t, batch 1, 128 new tokens, bf16 weights (>= 140 tok/s)
#   decode16 the same at batch 16, what extraction runs (>= 2,000 tok/s)
#   sample   100-step dual-guidance sampling of 32 frames at 256 px (<= 8 s)
# The first lease (H200, 2026-12-04, docs/performance.md) measured decode1, decode16 and sample
# in 23-96 s each; the full-size UNet train step did not finish in 140 s (nor with XLA's
# autotuning off in 100 s) and the LDM step not in 103 s: their limits are 330 s and 580 s now,
# the unmeasured groups run first, and the LDM step (the plan's micro-batch: 32 per device,
# grad_accum 4; its memory against the plan's h100-80g-x8 row, PLAN_JSON) is a group of its own:
#   ldm      ONLY=ldm, a lease of its own
# and, only when named in ONLY (longer than one lease): ldm, unet_variants, decode_variants, data, cache.
#
# Each bench runs in its own process (peak memory is per process) under its own timeout, writes
# OUT/<name>.json and .log; a failure or timeout loses that line only. Printed last (and written
# to OUT/table.md and OUT/vs_plan.md): the table of every result against its target, then the
# memory comparison. Weights are random (speed does not depend on them): nothing is downloaded.
#
# Environment: OUT (results dir), ONLY, BUDGET_S (seconds for all benches), TIMEOUT_SCALE
# (multiplies each bench's own limit), PLAN_JSON, BENCH_FLAGS (added to every run), DRY_RUN=1,
# INSTALL=1 (pip install -e ".[cuda,torch]" first: needs an index), WHEELS=DIR (install the
# wheels in DIR offline first, e.g. a lease machine that lacks some of lego_jax's dependencies).
# What the benches import that a CUDA image with jax, flax, optax, torch and transformers may
# lack (the H200 lease image of 2026-12-04 lacked all of these; found by importing the bench
# path with each package blocked): ml_collections, grain + array_record + portpicker,
# simplejpeg, tensorboardX (at import), diffusers + importlib_metadata (the torch baselines);
# fetch them where pip reaches an index, e.g. for Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform \
#     manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 \
#     simplejpeg==1.9.0 tensorboardX==2.6.5 diffusers==0.42.1 importlib_metadata==10.2.0
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-bench_results/$(date +%Y%m%d-%H%M%S)}"
ONLY="${ONLY:-unet vllm decode1 decode16 sample}"
DRY="${DRY_RUN:-0}"
# A dry run compiles for a (possibly shared) CPU: ten times the limits, an hour in all.
SCALE="${TIMEOUT_SCALE:-$([ "$DRY" = 1 ] && echo 10 || echo 1)}"
BUDGET_S="${BUDGET_S:-$([ "$DRY" = 1 ] && echo 3600 || echo 560)}"
PLAN_JSON="${PLAN_JSON:-docs/plan-rows/2026-12-03-h100-80g-x8.plan.json}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
T0=$SECONDS

if [ "${INSTALL:-0}" = 1 ]; then
  "$PY" -m pip install -q -e ".[cuda,torch]" || { echo "install failed" >&2; exit 1; }
fi
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/lego_site "$WHEELS"/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/lego_site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout itself, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# torch shares the GPU with JAX in the --baseline=torch runs: JAX allocates on demand (torch runs
# first and empties its cache) instead of taking 75% of the memory at start-up.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ "$DRY" = 1 ]; then
  # The embedded tiny config shrunk to tests/bench/test_bench.py's micro sizes, small batches,
  # few steps: checks the script (every bench, the table, the plan comparison), not the speed.
  export JAX_PLATFORMS=cpu
  CONFIG="--config.data.image_size=16 --config.data.vllm_image_size=16
    --config.unet.block_out_channels=(16,) --config.unet.attention_levels=(True,)
    --config.unet.num_heads=2 --config.unet.context_dim=16 --config.unet.norm_groups=8
    --config.vae.block_out_channels=(8,) --config.vae.norm_groups=4
    --config.clip_text.hidden_size=16 --config.clip_text.intermediate_size=32
    --config.clip_text.num_layers=1 --config.clip_text.num_heads=2
    --config.clip_vision.hidden_size=16 --config.clip_vision.intermediate_size=32
    --config.clip_vision.num_layers=2 --config.clip_vision.num_heads=2
    --config.clip_vision.image_size=16 --config.clip_vision.patch_size=8
    --config.clip_vision.projection_dim=8 --config.llama.hidden_size=32
    --config.llama.intermediate_size=64 --config.llama.num_layers=1 --config.llama.num_heads=2
    --config.llama.num_kv_heads=2 --config.llama.max_position=128
    --config.llava.vision_hidden=16 --config.llava.text_hidden=32
    --config.conditioner.llm_dim=32 --config.conditioner.context_dim=16
    --config.conditioner.num_heads=2 --config.conditioner.ffn_dim=32
    --config.conditioner.num_layers=1"
  size() { echo "$2"; }
else
  CONFIG="--config=configs/lego_ego4d.py"
  size() { echo "$1"; }
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv \
    | tee "$OUT/gpu.txt"
fi
"$PY" - <<'EOF' | tee -a "$OUT/gpu.txt"
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__,
      torch.cuda.is_available())
EOF

want() { case " $ONLY " in *" $1 "*) return 0;; esac; return 1; }

# bench NAME LIMIT_S ARGS... : one run, its JSON in OUT/NAME.json, within what is left of BUDGET_S.
bench() {
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET_S - (SECONDS - T0)))
  local secs; secs=$("$PY" -c "print(min(int($limit * $SCALE), $left))")
  if [ "$secs" -lt 30 ]; then
    echo "=== $name: skipped, ${left} s of the ${BUDGET_S} s budget left" | tee "$OUT/$name.log"
    return
  fi
  echo "=== $name (timeout ${secs}s): lego-jax bench $*" | tee "$OUT/$name.log"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$secs" \
    "$PY" -m lego_jax bench "$1" $CONFIG "${@:2}" --workdir="$OUT/workdir" --out="$OUT/$name.json" \
    ${BENCH_FLAGS:-} >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
  [ $rc -eq 0 ] || tail -n 15 "$OUT/$name.log"
  return $rc
}

# Preflight (real GPU only): the tiny config's train-ldm step with XLA's default GPU flags. The
# deviceless H100 compile refused that step ("Couldn't find output tile sizes" in a Triton GEMM,
# issue #15); if the real compiler refuses it too, every bench below runs with Triton GEMMs off
# (the one flag that compiled it), and OUT/xla_flags.txt says so. 62 s on the H200 (2026-12-04).
if [ "$DRY" != 1 ]; then
  PREFLIGHT="ldm-train --steps=5 --repeats=1 --warmup_steps=1"
  CONFIG="--config=configs/tiny.py" bench preflight_tiny_ldm 90 $PREFLIGHT || {
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false"
    echo "=== preflight failed: the benches below run with XLA_FLAGS=$XLA_FLAGS"
    CONFIG="--config=configs/tiny.py" bench preflight_tiny_ldm_no_triton_gemm 90 $PREFLIGHT
  }
fi
echo "XLA_FLAGS=${XLA_FLAGS:-}" > "$OUT/xla_flags.txt"

DT="--dtype=$(size bfloat16 float32)"
if want unet; then
  # Target: >= 600 samples/s, batch 32, 256 px (32x32x8 latents), context 410 x 768, AdamW;
  # PyTorch eager (diffusers) in the same process, first.
  bench unet_bf16_vs_torch 330 unet-train --batch=$(size 32 2) $DT --baseline=torch \
    --torch_compile=false --steps=5 --repeats=1 --warmup_steps=1
fi
if want vllm; then
  # Target: MFU >= 40% at a 1-3B LLaMA shape (1.3B: LLaMA-2's block at width 2048, 24 layers,
  # head size 128), CLIP ViT-L/14 frozen, 2048 tokens per sequence.
  if [ "$DRY" = 1 ]; then SMALL_LM="--seq_len=24"; else SMALL_LM="--seq_len=2048
    --config.llama.hidden_size=2048 --config.llama.intermediate_size=5504
    --config.llama.num_layers=24 --config.llama.num_heads=16 --config.llama.num_kv_heads=16
    --config.llava.text_hidden=2048 --config.vllm_train.grad_accum=1"; fi
  bench vllm_1b3_remat 120 vllm-train $SMALL_LM --batch=$(size 8 2) $DT --remat \
    --steps=3 --repeats=1 --warmup_steps=1
fi
if want decode1; then
  # LLaMA-2-13B, prompt 300 (256 image patches + the prompt), 128 new tokens, H_t returned.
  bench decode_b1 90 vllm-decode --batch=1 --new_tokens=$(size 128 4) $DT \
    --param_dtype=$(size bfloat16 float32) $(size "" --prompt_len=8) --steps=2 --repeats=1 \
    --warmup_steps=1
fi
if want decode16; then
  bench decode_b16 90 vllm-decode --batch=$(size 16 2) --new_tokens=$(size 128 4) $DT \
    --param_dtype=$(size bfloat16 float32) $(size "" --prompt_len=8) --steps=2 --repeats=1 \
    --warmup_steps=1
fi
if want sample; then
  # Target: <= 8 s for 100 Euler-ancestral steps, 3-way guidance batch, 32 frames at 256 px.
  bench sample_b32 120 sample --batch=$(size 32 2) --sample_steps=$(size 100 2) $DT \
    --steps=1 --repeats=1 --warmup_steps=1
fi
if want ldm; then
  # The plan's LDM row on 8 GPUs, per device: micro-batch 32, grad_accum 4 (global 1024 / 8).
  bench ldm_plan_micro_batch 580 ldm-train --batch=$(size 128 8) $DT --steps=2 --repeats=1 \
    --warmup_steps=1
  if [ "$DRY" = 1 ] && [ -z "${PLAN_TARGET:-}" ]; then
    # Something to compare with at the tiny sizes: the plan of the same step for one CPU device.
    "$PY" -m lego_jax plan $CONFIG --workdir="$OUT/plan" --plan_targets=cpu-1 \
      --plan_stages=ldm --plan_meshes=config > "$OUT/plan.log" 2>&1 || tail -n 5 "$OUT/plan.log"
    PLAN_JSON="$OUT/plan/plan.json" PLAN_TARGET=cpu-1
  fi
fi

# Longer groups, for a longer lease (each names itself in ONLY).
if want unet_variants; then
  bench unet_bf16_cudnn_attention 300 unet-train --batch=$(size 32 2) $DT \
    --unet_attention=cudnn --steps=10 --repeats=1
  bench unet_bf16_remat 300 unet-train --batch=$(size 32 2) $DT --remat --steps=10 --repeats=1
  bench unet_bf16_b64 300 unet-train --batch=$(size 64 4) $DT --steps=10 --repeats=1
  bench unet_bf16_vs_torch_compile 900 unet-train --batch=$(size 32 2) $DT --baseline=torch \
    --steps=10 --repeats=1
fi
if want decode_variants; then
  # The stacked-scan decode the first lease measured (46.8 tok/s), against decode1's per-layer
  # weights (docs/experiments/2026-12-04-decode-weights.md).
  bench decode_b1_stacked 90 vllm-decode --batch=1 --new_tokens=$(size 128 4) $DT \
    --param_dtype=$(size bfloat16 float32) $(size "" --prompt_len=8) --steps=2 --repeats=1 \
    --warmup_steps=1 --config.vllm_generate.unstack_layers=false
  bench decode_b1_vs_torch 900 vllm-decode --batch=1 --new_tokens=$(size 128 4) $DT \
    --param_dtype=$(size bfloat16 float32) --baseline=torch --steps=3 --repeats=1
  bench decode_b16_fp32_weights 600 vllm-decode --batch=$(size 16 2) \
    --new_tokens=$(size 128 4) $DT --param_dtype=float32 --steps=3 --repeats=1
fi
if want data; then
  bench data_256 300 data --batch=$(size 32 4) --config.data.num_workers=$(size 8 2) \
    --steps=20 --repeats=1
fi
if want cache; then
  # Persistent compilation cache: the second run's compile_s is the cache hit.
  bench cache_cold 300 unet-train --batch=$(size 32 2) $DT \
    --compilation_cache="$OUT/jax_cache" --steps=3 --repeats=1
  bench cache_warm 300 unet-train --batch=$(size 32 2) $DT \
    --compilation_cache="$OUT/jax_cache" --steps=3 --repeats=1
fi

echo "=== benches done after $((SECONDS - T0)) s"
"$PY" -m lego_jax.bench.table "$OUT" | tee "$OUT/table.md"
if [ -f "$PLAN_JSON" ]; then
  echo "=== memory: this device's compiler and allocator against the plan ($PLAN_JSON)"
  "$PY" -m lego_jax.bench.vs_plan "$OUT" "$PLAN_JSON" ${PLAN_TARGET:-} | tee "$OUT/vs_plan.md"
else
  echo "=== no plan to compare with: $PLAN_JSON is missing (PLAN_JSON=...)"
fi
