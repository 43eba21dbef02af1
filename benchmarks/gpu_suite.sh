#!/usr/bin/env bash
# Every GPU path in one command, within 8 minutes (benchmarks/gpu_suite.py says what and how).
# Needs CUDA; no Ray, no Redis. Writes OUT/gpu_suite.json and OUT/gpu_suite.txt.
#   benchmarks/gpu_suite.sh [--out DIR] [--sections kv_nccl,engine,parity,cp] [--vllm-python PY] [--budget-s 480]
set -euo pipefail
cd "$(dirname "$0")/.."
# the suite keeps to its own budget; this backstop only catches a driver that hangs
exec timeout --kill-after=15 600 python -m benchmarks.gpu_suite "$@"
