#!/usr/bin/env bash
# Set up (if needed), then run the main job end to end on the embedded default (Fashion-MNIST):
# ddkd teach -> ddkd synthesize --ipc 10 -> ddkd inspect -> ddkd evaluate, into runs/demo/.
# Re-running resumes: finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# What to expect (docs/performance.md): measured on 2 cores of an AVX512-BF16 Xeon, 180 s +
# 245 s + 432 s (2026-11-29); on 2 cores of an AVX2-only EPYC teach alone took 881 s
# (2026-12-01), 4.9x, and the later stages are the same kind of work.
cores=$(nproc)
if grep -q -w avx512f /proc/cpuinfo 2>/dev/null; then
  echo "demo: about 15 minutes on 2 cores with AVX-512 ($cores cores here); re-running resumes"
else
  echo "demo: about an hour on 2 AVX2-only cores ($cores cores here: no AVX-512, so PyTorch's" \
       "slower kernels); re-running resumes whatever was interrupted"
fi
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
