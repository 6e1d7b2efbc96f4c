#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the default test suite (slow tests: add
# -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check ddkd tests
.venv/bin/python -m mypy  # ddkd/, configured in pyproject.toml
.venv/bin/python -m pytest "$@"
