#!/usr/bin/env bash
# Set up (if needed), then run the main job end to end on the embedded default (Fashion-MNIST):
# ddkd teach -> ddkd synthesize --ipc 10 -> ddkd inspect -> ddkd evaluate, into runs/demo/.
# Re-running resumes: finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ddkd=.venv/bin/ddkd
out=${1:-runs/demo}
set_file="$out/fashion-mnist_ipc10_seed0.h5"

if [ ! -f "$out/summary.json" ]; then
  resume=""
  [ -f "$out/config.json" ] && resume="--resume"
  $ddkd teach --out "$out" $resume
fi
if [ ! -f "$set_file" ]; then
  resume=""
  [ -d "$set_file.partial" ] && resume="--resume"
  $ddkd synthesize --run "$out" --ipc 10 --out "$set_file" $resume
fi
$ddkd inspect "$set_file" --png "${set_file%.h5}.png"
$ddkd evaluate "$set_file" --out "$out/eval"
