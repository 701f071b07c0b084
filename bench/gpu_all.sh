#!/usr/bin/env bash
# Everything a GPU session measures, in one `device` call (prepare here first: `make gpu-site`; carry
# .cache/gpu-site and service/_proto):  bash bench/gpu_all.sh
#   1. bench/gpu.py: parity, the five workloads (HF arrival/sorted, ours eager/compiled), memory table;
#   2. bench/e2e.py: the same base-shape checkpoint through `python -m service` at saturation vs the engine.
# Output: stdout, and JSON under $OUT (gpu.json, e2e.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.cache/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/out}"
CKPT="$(mktemp -d)/base"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python bench/gpu.py --model-dir "$CKPT" --out "$OUT" "$@" || echo "# bench/gpu.py exited with $? (JSON so far: $OUT/gpu.json)"
test -f "$CKPT/model.safetensors" || exit 1
python bench/e2e.py --model "$CKPT" --device cuda --items 20000 --items-per-call 16 --concurrency 1,4,16,64,256 --latency-calls 300 \
    --json "$OUT/e2e.json"
