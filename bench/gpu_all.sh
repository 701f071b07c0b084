#!/usr/bin/env bash
# Everything a GPU session measures, in one `device` call (prepare here first: `make gpu-site`; carry
# .cache/gpu-site and service/_proto):  bash bench/gpu_all.sh
#   1. bench/gpu.py: parity, the five workloads (HF arrival/sorted, ours eager/compiled), our Triton kernels
#      (fused GEMMs alone; fused-GEMM and Triton-attention engines: parity, our rows again), budget sweep,
#      no-sync check, CUDA graphs (replay parity, latency, small batches), the attention kernels alone (FA2
#      and ours), profiler top kernels, memory;
#   2. bench/e2e.py: the same base-shape checkpoint through `python -m service` at 1..128 calls of 16 items in
#      flight (128 x 16 stays under the default admission bound of 4096 queued items) vs the engine, the same
#      levels over one ClassifyStream, then 300 one-item calls of 128 tokens (single-item latency);
#      between the two, the CUDA-only tests (pytest -m gpu, our Triton kernels' included). E2E=off skips
#      step 2, E2E_ITEMS and E2E_LEVELS shrink it; E2E_COMPILE=on runs both paths of step 2 compiled (the
#      server's default on CUDA; ~30 s more each).
# Output: stdout, and JSON under $OUT (gpu.json, e2e.json).
# Checked on the CPU with: DEVICE=cpu OUT=/tmp/g bash bench/gpu_all.sh --smoke --no-compile --workloads traffic
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.cache/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/out}"
PY="${PYTHON:-python3}"  # the GPU image has python3 (the one with torch), not always python
CKPT="$(mktemp -d)/base"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" bench/gpu.py --model-dir "$CKPT" --out "$OUT" "$@" || echo "# bench/gpu.py exited with $? (JSON so far: $OUT/gpu.json)"
test -f "$CKPT/model.safetensors" || exit 1
# the attention kernel gpu.py measured with (it falls back to sdpa if the default failed on this card)
ATTN="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('backend', 'auto'))" "$OUT/gpu.json" 2>/dev/null || echo auto)"
# the CUDA-only tests (skipped on machines without a GPU, so CI never runs them)
if [ "${DEVICE:-cuda}" = cuda ]; then
    # (the Triton kernel files' other tests also run on CUDA, in bf16, but autotune every shape they try:
    # minutes of Triton compiles; gpu.py checks the same kernels against cuBLAS/FA2 and HF at full size)
    timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/model/test_graphs.py \
        tests/model/test_compile_gpu.py tests/model/test_fused.py tests/model/test_triton_attention.py \
        || echo "# GPU tests exited with $?"
fi
[ "${E2E:-on}" = on ] || exit 0
"$PY" bench/e2e.py --model "$CKPT" --device "${DEVICE:-cuda}" --attention "$ATTN" --items "${E2E_ITEMS:-20000}" \
    --items-per-call 16 --concurrency "${E2E_LEVELS:-1,4,16,64,128}" --latency-calls 300 --stream \
    --compile "${E2E_COMPILE:-off}" --json "$OUT/e2e.json"
