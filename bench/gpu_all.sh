#!/usr/bin/env bash
# Everything a GPU session measures, in one `device` call. Prepare here first: `make gpu-site` (the service's
# deps for the GPU image, the gRPC stubs, and .cache/gpu-site/COMMIT: the commit measured, as the GPU machine
# gets no .git). The call (docs/benchmarks.md, "Running it again"): carry [".cache/gpu-site",
# "service/_proto"], timeout_s 570, then give_back:
#   set -o pipefail; export PYTHONUNBUFFERED=1; TOTAL_S=360 E2E=on E2E_COMPILE=on E2E_ITEMS=8000 \
#       E2E_LEVELS=1,16,128 timeout 540 bash bench/gpu_all.sh --skip fused_kernels,attention,budget,memory,cudnn \
#       --triton-variants fused_local_compiled,fused_compiled,triton_local_compiled,fused_triton_compiled --repeat 3 \
#       2>&1 | grep -v DEBUG | tee $OUT/log
#   1. bench/gpu.py (arguments after gpu_all.sh go to it): environment (card, driver, CUDA, torch, Triton,
#      transformers, commit), parity (graph-replayed and ungraphed), the workloads (HF arrival/sorted, ours
#      eager/compiled), then the optional steps, most wanted first: no-sync check, CUDA graphs (replay parity,
#      latency, small batches), profiler top kernels, budget sweep, memory, the attention kernels alone (FA2
#      and ours), our Triton kernels (fused GEMMs alone; fused-GEMM and Triton-attention engines: parity
#      replayed and ungraphed, our rows again, profiles), the cuDNN probe; a table at the end in every case.
#      No optional step starts after its deadline: TOTAL_S - TEST_RESERVE_S seconds (480 - 80 = 400); each
#      step stops after --step-cap-s (150 s), with every thread's traceback (faulthandler) when it does;
#   2. the CUDA-only tests (pytest -m gpu: the compiled CUDA load, graphs, our Triton kernels), given what
#      is left of TOTAL_S (at least 30 s, else skipped), stopped with SIGINT so their report and
#      $OUT/gpu-tests.xml are still written;
#   3. bench/e2e.py: the same base-shape checkpoint through `python -m service` at 1..128 calls of 16 items in
#      flight (128 x 16 stays under the default admission bound of 4096 queued items) vs the engine, the same
#      levels over one ClassifyStream, then 300 one-item calls of 128 tokens (single-item latency). Not
#      inside TOTAL_S: E2E=off skips it (run it in a second call), E2E_ITEMS and E2E_LEVELS shrink it;
#      E2E_COMPILE=on runs both paths of step 3 compiled (the server's default on CUDA; ~30 s more each);
#      E2E_ATTENTION and E2E_FUSED=auto|on|off pick the engine there (default: the server's, auto and auto);
#      E2E_ENGINE=best: the fastest compiled engine on traffic in step 1 (gpu.json's best_traffic; run it
#      compiled with E2E_COMPILE=on).
# Output: stdout, and under $OUT: gpu.json (rewritten after every step), gpu-tests.xml, e2e.json.
# Checked on the CPU (the venv's python as PYTHON, or first on PATH; ~2 min on 2 cores, docs/benchmarks.md):
#   DEVICE=cpu E2E=off TRITON_INTERPRET=1 OUT=/tmp/g bash bench/gpu_all.sh --smoke --workloads traffic
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.cache/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/out}"
PY="${PYTHON:-python3}"  # the GPU image has python3 (the one with torch), not always python
TOTAL_S="${TOTAL_S:-480}"  # seconds for steps 1 and 2, from this script's start (the call's timeout: 500)
TEST_RESERVE_S="${TEST_RESERVE_S:-80}"  # of which the GPU tests get at least this much
CKPT="$(mktemp -d)/base"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" bench/gpu.py --model-dir "$CKPT" --out "$OUT" --deadline-s "$((TOTAL_S - TEST_RESERVE_S))" "$@" \
    || echo "# bench/gpu.py exited with $? (JSON so far: $OUT/gpu.json)"
test -f "$CKPT/model.safetensors" || exit 1
# the attention kernel gpu.py measured with (it falls back to sdpa if the default failed on this card)
ATTN="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('backend', 'auto'))" "$OUT/gpu.json" 2>/dev/null || echo auto)"
# the CUDA-only tests (skipped on machines without a GPU, so CI never runs them), most wanted first
if [ "${DEVICE:-cuda}" = cuda ]; then
    LEFT=$((TOTAL_S - SECONDS))
    TEST_TIMEOUT="${TEST_TIMEOUT:-$LEFT}"
    if [ "$TEST_TIMEOUT" -gt "$LEFT" ]; then TEST_TIMEOUT=$LEFT; fi
    if [ "$TEST_TIMEOUT" -lt 30 ]; then
        echo "# GPU tests skipped: ${LEFT} s left of TOTAL_S=${TOTAL_S}"
    else
        echo "# GPU tests: ${TEST_TIMEOUT} s"
        # (the Triton kernel files' other tests also run on CUDA, in bf16, but autotune every shape they try:
        # minutes of Triton compiles; gpu.py checks the same kernels against cuBLAS/FA2 and HF at full size)
        timeout -s INT -k 15 "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA --durations=20 \
            --junitxml="$OUT/gpu-tests.xml" tests/model/test_compile_gpu.py tests/model/test_graphs.py \
            tests/model/test_fused.py tests/model/test_triton_attention.py \
            || echo "# GPU tests exited with $?"
    fi
fi
[ "${E2E:-on}" = on ] || exit 0
E2E_FUSED="${E2E_FUSED:-auto}"
if [ "$ATTN" != sdpa ]; then ATTN=auto; fi  # the server's default, unless gpu.py had to fall back to sdpa
if [ "${E2E_ENGINE:-}" = best ]; then  # the fastest compiled engine on traffic in gpu.py's run
    # (no best_traffic, e.g. --skip triton: the defaults stay; a failed `read` would blank both)
    BEST="$("$PY" -c "import json,sys; b=json.load(open(sys.argv[1]))['best_traffic']; \
print(b['backend'], 'on' if b['fused_gemm'] else 'off')" "$OUT/gpu.json" 2>/dev/null || echo "$ATTN $E2E_FUSED")"
    read -r ATTN E2E_FUSED <<< "$BEST"
    echo "# e2e engine: attention $ATTN, fused GEMMs $E2E_FUSED"
fi
"$PY" bench/e2e.py --model "$CKPT" --device "${DEVICE:-cuda}" --attention "${E2E_ATTENTION:-$ATTN}" \
    --fused-gemm "$E2E_FUSED" --items "${E2E_ITEMS:-20000}" \
    --items-per-call 16 --concurrency "${E2E_LEVELS:-1,4,16,64,128}" --latency-calls 300 --stream \
    --compile "${E2E_COMPILE:-off}" --json "$OUT/e2e.json"
