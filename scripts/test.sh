#!/usr/bin/env bash
# Set up (if needed), then lint and run the default test suite (slow tests: add -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check ddkd tests
.venv/bin/python -m pytest "$@"
