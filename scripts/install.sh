#!/usr/bin/env bash
# Set up splitserve on a fresh machine, into a virtual environment: the active one if there is
# one, else ./.venv (made here). PyTorch first (the pinned CPU build, so nothing pulls a
# multi-GB CUDA build), then the project with its serve and dev extras, then a Redis server for
# `splitserve serve` and the end-to-end tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PIP=(python -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[serve,dev]"

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
  else
    echo "install.sh: redis-server not found and no apt-get; install Redis to run 'splitserve serve' and the tests" >&2
  fi
fi
echo "splitserve installed in $VIRTUAL_ENV ($(python -c 'import torch; print("torch", torch.__version__)'))"
