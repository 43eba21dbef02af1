#!/usr/bin/env bash
# Every GPU path in one command, within 8 minutes (benchmarks/gpu_suite.py says what and how).
# Needs CUDA; no Ray, no Redis, no install (it imports this checkout). Writes OUT/gpu_suite.json
# and OUT/gpu_suite.txt.
#   benchmarks/gpu_suite.sh [--out DIR] [--sections kv_nccl,engine,parity,cp] [--vllm-python PY] [--budget-s 480]
#   PYTHON=/path/to/python benchmarks/gpu_suite.sh ...   # another interpreter than python3
set -euo pipefail
cd "$(dirname "$0")/.."
budget=480
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --budget-s) budget="${args[i + 1]:-$budget}" ;;
    --budget-s=*) budget="${args[i]#*=}" ;;
  esac
done
# the suite keeps to its own budget; this backstop only catches a driver that hangs (TERM first:
# the driver then stops its running section and still writes its report)
exec timeout --kill-after=15 "$(( ${budget%.*} + 90 ))" "${PYTHON:-python3}" -m benchmarks.gpu_suite "$@"
