#!/usr/bin/env bash
# bench/kernel_steps.py with PyTorch's own kernels and with them limited to AVX2, alternately,
# three times each: on a CPU with AVX-512, what an AVX2-only CPU of the same speed would take.
set -euo pipefail
cd "$(dirname "$0")/.."
for i in 1 2 3; do
  echo "native: $(.venv/bin/python bench/kernel_steps.py)"
  echo "avx2:   $(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/kernel_steps.py)"
done
