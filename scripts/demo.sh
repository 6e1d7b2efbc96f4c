#!/usr/bin/env bash
# Set up (if needed), then run the main job end to end on the embedded default (Fashion-MNIST):
# ddkd teach -> ddkd synthesize --ipc 10 -> ddkd inspect -> ddkd evaluate, into runs/demo/.
# Re-running resumes: finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# What to expect (docs/performance.md): about 15 minutes on 2 cores with AVX-512 kernels; about
# 31 with PyTorch's kernels limited to AVX2 on the same CPU (2026-12-02); older AVX2-only CPUs
# take longer (their teach alone 881 s, 2026-12-01). The kernel set is PyTorch's own choice, so
# ask it (ATEN_CPU_CAPABILITY lowers it).
cores=$(nproc)
capability=$(.venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())" \
             2>/dev/null || echo unknown)
case "$capability" in
  AVX512*) echo "demo: about 15 minutes on 2 cores with AVX-512 kernels ($cores cores here);" \
                "re-running resumes" ;;
  *) echo "demo: about 30 minutes on 2 cores with $capability kernels, longer on older CPUs" \
          "($cores cores here); re-running resumes whatever was interrupted" ;;
esac
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
