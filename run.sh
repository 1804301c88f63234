#!/usr/bin/env bash
# flava_ds entry point.
#   ./run.sh          the demo: preprocess bundled data, pretrain with DeepSpeed, evaluate
#   ./run.sh setup    create .venv/ and install everything (CPU torch where no CUDA GPU is present)
#   ./run.sh test     setup if needed (+ tests/requirements.txt), then the test suite (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

setup() {
  local stamp="$VENV/.flava_ds-setup"
  local want
  want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "[setup] creating $VENV"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "[setup] CUDA GPU found: installing the CUDA build of torch"
      "$PY" -m pip install -q torch
    else
      echo "[setup] no CUDA GPU: installing the CPU build torch==2.13.0"
      "$PY" -m pip install -q torch==2.13.0
    fi
  fi
  "$PY" -m pip install -q -r requirements.txt
  "$PY" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
  echo "[setup] done"
}

setup_tests() {  # optional integrations the tests cover (wandb), not installed for users by default
  local stamp="$VENV/.flava_ds-test-setup"
  local want
  want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  "$PY" -m pip install -q -r tests/requirements.txt
  echo "$want" > "$stamp"
}

case "${1:-demo}" in
  setup)
    setup
    ;;
  test)
    shift || true
    setup
    setup_tests
    export PYTHONUNBUFFERED=1
    "$PY" -m pytest "$@"
    ;;
  demo)
    shift || true
    setup
    export PYTHONUNBUFFERED=1
    exec bash tools/demo.sh "$@"
    ;;
  *)
    echo "usage: ./run.sh [setup|test|demo]" >&2
    exit 2
    ;;
esac
