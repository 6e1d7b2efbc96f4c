#!/usr/bin/env bash
# Issue 6's comparison: distil the embedded default (Fashion-MNIST, shipped teacher, ipc 10)
# through every KD objective, then evaluate the five sets side by side with the no-pre-training
# and random-subset + KD (mse) baselines, 3 seeds, 0.1% / 1% / 5% labels, into OUT/eval/.
# About 12 minutes per objective on 2 CPU cores. Re-running resumes: finished stages are skipped.
#   bash scripts/compare_objectives.sh [OUT] [extra ddkd teach options, e.g. --subset 512]
# Environment: OBJECTIVES (default "mse kdep tcs ssld skd"; the first one's run gives the
# baselines), SYNTH_ARGS (extra ddkd synthesize options), SEEDS (3), FRACTIONS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ddkd=.venv/bin/ddkd
out=${1:-runs/objectives}
shift || true
objectives=${OBJECTIVES:-mse kdep tcs ssld skd}

sets=()
for obj in $objectives; do
  run="$out/$obj"
  set_file="$out/fashion-mnist_ipc10_$obj.h5"
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
first=${objectives%% *}
$ddkd evaluate "${sets[@]}" --run "$out/$first" --baselines none,random \
  --fractions "${FRACTIONS:-0.001,0.01,0.05}" --seeds "${SEEDS:-3}" --out "$out/eval"
