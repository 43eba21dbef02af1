#!/usr/bin/env bash
# Set up splitserve on a fresh machine: PyTorch first (the pinned CPU build, so nothing pulls
# a multi-GB CUDA build), then the project with its dev extras, then a Redis server for the
# end-to-end tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[dev]"

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
  else
    echo "install.sh: redis-server not found and no apt-get; install Redis to run the end-to-end tests" >&2
  fi
fi
echo "splitserve installed: $("$PYTHON" -c 'import torch; print("torch", torch.__version__)')"
