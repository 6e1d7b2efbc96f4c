#!/usr/bin/env bash
# Issue 6's comparison: distil the embedded default (Fashion-MNIST, shipped teacher, ipc 10)
# through every KD objective, then evaluate the sets side by side with the no-pre-training and
# random-subset + KD baselines (KD through the first objective listed: mse by default), 3 seeds,
# 0.1% / 1% / 5% labels, into OUT/eval/. About 12 minutes per objective on 2 CPU cores.
# Re-running resumes: finished runs, sets and the evaluation are kept.
#   bash scripts/compare_objectives.sh [OUT] [extra ddkd teach options, e.g. --subset 512]
# Environment: OBJECTIVES (default "mse kdep tcs ssld skd"), SYNTH_ARGS (extra ddkd
# synthesize options), SEEDS (3), FRACTIONS (0.001,0.01,0.05).
set -euo pipefail
out=${1:-runs/objectives}
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac  # relative to where it was called from
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ddkd=.venv/bin/ddkd
read -ra objectives <<< "${OBJECTIVES:-mse kdep tcs ssld skd}"
if [ ${#objectives[@]} -eq 0 ]; then
  echo "compare_objectives: OBJECTIVES is empty; give e.g. OBJECTIVES=\"mse kdep\"" >&2
  exit 2
fi

sets=()
for obj in "${objectives[@]}"; do
  run="$out/$obj"
  set_file="$out/ipc10_$obj.h5"
  if [ ! -f "$run/summary.json" ]; then
    resume=""
    [ -f "$run/config.json" ] && resume="--resume"
    $ddkd teach --objective "$obj" --out "$run" $resume "$@"
  fi
  if [ ! -f "$set_file" ]; then
    resume=""
    [ -d "$set_file.partial" ] && resume="--resume"
    $ddkd synthesize --run "$run" --ipc 10 --out "$set_file" $resume ${SYNTH_ARGS:-}
  fi
  sets+=("$set_file")
done
if [ ! -f "$out/eval/results.json" ]; then
  $ddkd evaluate "${sets[@]}" --run "$out/${objectives[0]}" --baselines none,random \
    --fractions "${FRACTIONS:-0.001,0.01,0.05}" --seeds "${SEEDS:-3}" --out "$out/eval"
else
  cat "$out/eval/results.md"
fi
