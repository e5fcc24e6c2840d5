#!/usr/bin/env bash
# Every number of lego_jax/bench/README.md's Performance table in one GPU session.
#
#   launch/gpu_bench.sh                    # install, then the whole set (~60-90 min on one H100/H200)
#   SKIP_INSTALL=1 ONLY="unet decode" launch/gpu_bench.sh
#
# Each bench runs in its own process (peak memory is per process) under its own timeout, writes
# OUT/<name>.json and OUT/<name>.log, and a failure or timeout only loses that line. The table of
# every result is printed last (and written to OUT/table.md). Full-size shapes come from
# configs/lego_ego4d.py with the batch set on the command line; weights are random (speed does
# not depend on them), so nothing is downloaded.
#
# Environment: OUT (results dir), ONLY (space-separated groups: unet ldm decode sample vllm data
# cache), TIMEOUT_SCALE (multiply every timeout), SKIP_INSTALL=1, BENCH_FLAGS (added to every run).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-bench_results/$(date +%Y%m%d-%H%M%S)}"
ONLY="${ONLY:-unet ldm decode sample vllm data cache}"
SCALE="${TIMEOUT_SCALE:-1}"
mkdir -p "$OUT"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python -m pip install -q -e ".[cuda,torch]" || { echo "install failed" >&2; exit 1; }
fi
# torch shares the GPU with JAX in the --baseline=torch runs: JAX allocates on demand (torch runs
# first and empties its cache) instead of taking 75% of the memory at start-up.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python - <<'EOF' | tee -a "$OUT/gpu.txt"
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.is_available())
EOF

FULL="--config=configs/lego_ego4d.py"
want() { case " $ONLY " in *" $1 "*) return 0;; esac; return 1; }

# bench NAME TIMEOUT_S ARGS... : one run, its JSON in OUT/NAME.json.
bench() {
  local name="$1" limit="$2"; shift 2
  local secs; secs=$(python -c "print(int($limit * $SCALE))")
  echo "=== $name (timeout ${secs}s): lego-jax bench $*" | tee "$OUT/$name.log"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=30 "$secs" \
    python -m lego_jax bench "$@" --workdir="$OUT/workdir" --out="$OUT/$name.json" \
    ${BENCH_FLAGS:-} >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
  [ $rc -eq 0 ] || tail -n 15 "$OUT/$name.log"
}

if want unet; then
  # Target: >= 600 samples/s, batch 32, 256 px (32x32x8 latents), context 410 x 768, AdamW.
  bench unet_bf16_vs_torch 1500 unet-train $FULL --batch=32 --dtype=bfloat16 --baseline=torch \
    --steps=10 --repeats=1
  bench unet_bf16_cudnn_attention 700 unet-train $FULL --batch=32 --dtype=bfloat16 \
    --unet_attention=cudnn --steps=10 --repeats=1
  bench unet_bf16_dpa_xla 700 unet-train $FULL --batch=32 --dtype=bfloat16 \
    --unet_attention=xla --steps=10 --repeats=1
  bench unet_bf16_remat 700 unet-train $FULL --batch=32 --dtype=bfloat16 --remat \
    --steps=10 --repeats=1
  bench unet_bf16_b64 700 unet-train $FULL --batch=64 --dtype=bfloat16 --steps=10 --repeats=1
  # The LEGO release trains in fp32 (JAX's default fp32 matmuls on GPU use TF32 passes).
  bench unet_fp32_vs_torch 900 unet-train $FULL --batch=32 --dtype=float32 --baseline=torch \
    --torch_compile=false --steps=5 --repeats=1
  # XLA GPU flags: one candidate set, measured against unet_bf16_vs_torch's JAX figure.
  (export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false"
   bench unet_bf16_no_triton_gemm 700 unet-train $FULL --batch=32 --dtype=bfloat16 \
     --steps=10 --repeats=1)
fi

if want ldm; then
  # train-ldm's real step (VAE + CLIP text + conditioner + UNet + AdamW + EMA), one micro-batch.
  bench ldm_bf16_vs_torch 1200 ldm-train $FULL --batch=32 --dtype=bfloat16 \
    --config.ldm_train.grad_accum=1 --baseline=torch --torch_compile=false --steps=10 --repeats=1
  bench ldm_fp32 900 ldm-train $FULL --batch=32 --dtype=float32 \
    --config.ldm_train.grad_accum=1 --steps=5 --repeats=1
fi

if want decode; then
  # LLaMA-2-13B, prompt 300 (256 image patches + the prompt), 128 new tokens, H_t returned.
  # Targets on H200: >= 140 tok/s at batch 1, >= 2000 tok/s at batch 16 (extraction).
  bench decode_b1_vs_torch 1500 vllm-decode $FULL --batch=1 --new_tokens=128 --dtype=bfloat16 \
    --param_dtype=bfloat16 --baseline=torch --steps=3 --repeats=1
  bench decode_b16_vs_torch 1500 vllm-decode $FULL --batch=16 --new_tokens=128 \
    --dtype=bfloat16 --param_dtype=bfloat16 --baseline=torch --steps=3 --repeats=1
  # What `lego-jax extract` runs today: fp32 weights, bf16 compute (twice the bytes per token).
  bench decode_b16_fp32_weights 900 vllm-decode $FULL --batch=16 --new_tokens=128 \
    --dtype=bfloat16 --param_dtype=float32 --steps=3 --repeats=1
  bench decode_b16_greedy 900 vllm-decode $FULL --batch=16 --new_tokens=128 --dtype=bfloat16 \
    --param_dtype=bfloat16 --config.vllm_generate.greedy=True --steps=3 --repeats=1
fi

if want sample; then
  # Target: <= 8 s for 100 Euler-ancestral steps, 3-way guidance batch, 32 frames at 256 px.
  bench sample_b32_vs_torch 1800 sample $FULL --batch=32 --dtype=bfloat16 --baseline=torch \
    --steps=2 --repeats=1 --warmup_steps=1
  bench sample_b32_cudnn_attention 900 sample $FULL --batch=32 --dtype=bfloat16 \
    --unet_attention=cudnn --steps=2 --repeats=1 --warmup_steps=1
fi

if want vllm; then
  # Target: MFU >= 40% for the instruction-tuning step at a 1-3B LLaMA shape (1.3B here:
  # LLaMA-2's block at width 2048, 24 layers, head size 128), CLIP ViT-L/14 frozen, 2048 tokens.
  SMALL_LM="--config.llama.hidden_size=2048 --config.llama.intermediate_size=5504
    --config.llama.num_layers=24 --config.llama.num_heads=16 --config.llama.num_kv_heads=16
    --config.llava.text_hidden=2048 --config.vllm_train.grad_accum=1"
  bench vllm_1b3_remat 1200 vllm-train $FULL $SMALL_LM --batch=8 --seq_len=2048 \
    --dtype=bfloat16 --remat --baseline=torch --torch_compile=false --steps=5 --repeats=1
  bench vllm_1b3_no_remat 900 vllm-train $FULL $SMALL_LM --batch=4 --seq_len=2048 \
    --dtype=bfloat16 --noremat --steps=5 --repeats=1
fi

if want data; then
  # The input pipeline must outrun the UNet step: 256 px pairs, 8 worker processes.
  bench data_256 600 data $FULL --batch=32 --config.data.num_workers=8 --steps=20 --repeats=1
fi

if want cache; then
  # Persistent compilation cache: the second run's compile_s is the cache hit.
  bench cache_cold 900 unet-train $FULL --batch=32 --dtype=bfloat16 \
    --compilation_cache="$OUT/jax_cache" --steps=3 --repeats=1
  bench cache_warm 900 unet-train $FULL --batch=32 --dtype=bfloat16 \
    --compilation_cache="$OUT/jax_cache" --steps=3 --repeats=1
fi

python -m lego_jax.bench.table "$OUT" | tee "$OUT/table.md"
