#!/usr/bin/env bash
# Set up (if needed), then run the main job end to end on the embedded default (Fashion-MNIST).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/demo}
if [ -f "$out/summary.json" ]; then
  echo "demo: $out is complete already (remove it to run again)"
else
  resume=""
  [ -f "$out/config.json" ] && resume="--resume"
  .venv/bin/ddkd teach --out "$out" $resume
fi
