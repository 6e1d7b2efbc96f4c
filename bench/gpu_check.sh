#!/usr/bin/env bash
# Issue 7's GPU checks in one run: the CUDA tests, then the benchmark on the GPU.
#
#   bash bench/gpu_check.sh --wheels   # here, once: what a bare GPU image lacks, into .whl/
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#
# With this workplace's device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"],
# timeout_s=590). The stages run most important first, each under its own time limit, so that
# a slow one cannot take the rest: the CUDA tests (2.5 minutes), the experts table at the
# default (Fashion-MNIST) shape with 8, 4 and 16 students per batch (3.5 minutes: five
# variants compile), then the matching tables at that shape and at CIFAR ipc 10 (90 s each):
# 9 minutes at most. It exits 1 if any stage failed or ran out of time.
#
# Outputs, in $OUT (else runs/gpu-check): env.txt, tests.log, bench-*.md (the three tables)
# and bench.log (every figure as it was measured, kept when a stage runs out of time).
# Environment: PYTHON (default .venv/bin/python where there is one, else python3), DEVICE
# (default cuda; cpu rehearses every stage here, on tiny settings, in about 2 minutes), OUT,
# and for --wheels WHEEL_PYTHON (default 3.12, the GPU image's Python).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
DEVICE=${DEVICE:-cuda}
# the packages ddkd imports that the GPU image (torch, torchvision, numpy, h5py, tqdm,
# matplotlib, pytest, pytorch-lightning) does not hold; lightly's own dependencies (hydra-core,
# omegaconf) are not imported by what ddkd uses of it
WHEELS="kornia==0.9.0 kornia_rs==0.2.0 lightly==1.6.0"

if [ "${1:-}" = "--wheels" ]; then
  rm -rf .whl && mkdir -p .whl
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: \
    --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $WHEELS || exit 1
  # the copy on the GPU machine may have no git history: say there which commit it is
  git log -1 --format='ddkd at %H (%cd)' >.whl/COMMIT
  ls -l .whl
  exit
fi

out=${OUT:-runs/gpu-check}
mkdir -p "$out"
: >"$out/bench.log"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  # the benchmark imports neither kornia nor lightly: without them only the tests suffer
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/ddkd-site .whl/*.whl; then
    export PYTHONPATH=/tmp/ddkd-site:$PYTHONPATH
  else
    echo "gpu_check: the wheels in .whl/ did not install (made for another Python? rerun" \
         "--wheels with WHEEL_PYTHON set to this one's version); going on without them"
  fi
fi

{
  date -u
  cat .whl/COMMIT 2>/dev/null || git log -1 --format='ddkd at %H (%cd)' 2>/dev/null
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$PY" - <<'EOF'
import importlib, sys, torch
versions = {}
for name in ("kornia", "lightly"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except ImportError:
        versions[name] = "MISSING"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      *(f"{k} {v}" for k, v in versions.items()))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}",
          "tf32 convolutions", torch.backends.cudnn.allow_tf32,
          "tf32 matmul", torch.backends.cuda.matmul.allow_tf32)
EOF
} 2>&1 | tee "$out/env.txt"

status=0
exec 3>&1  # the stages' own lines go to the terminal, whatever their output is sent to
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, say how it ended
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s)" >&3
  timeout -k 15 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ', out of time')" >&3
  return $rc
}

# -v and the durations: a stage cut short still shows which test it was in, and where
# (faulthandler dumps the stack of a test that runs over 60 s). Without a GPU they all skip.
stage tests 150 "$PY" -m pytest -v -p no:cacheprovider -rA --durations=0 \
  -o faulthandler_timeout=60 tests/test_cuda.py 2>&1 | tee "$out/tests.log" || status=1
if [ "$DEVICE" = cuda ]; then
  images=4096 steps=5,40 repeats=2  # N = 5 and 40: the constant-memory target's two ends
else  # a rehearsal: every stage, on tiny settings
  images=64 steps=2 repeats=1
fi

bench() {  # bench NAME SECONDS ARGS...
  local name=$1 limit=$2 rc
  shift 2
  stage "bench $name" "$limit" env DDKD_BENCH_IMAGES=$images "$PY" bench/run.py \
    --device "$DEVICE" --repeats $repeats "$@" >"$out/bench-$name.md" 2>>"$out/bench.log"
  rc=$?
  cat "$out/bench-$name.md"
  return $rc
}
# the 5x target is at the default student shape; 8 per batch is the GPU default, which 4 and
# 16 either side of it confirm or correct
bench experts 210 --shapes fashion-mnist --parts experts --groups 8,4,16 || status=1
bench matching-fashion-mnist 90 --shapes fashion-mnist --parts matching --syn-steps $steps \
  || status=1
bench matching-cifar10 90 --shapes cifar10-ipc10 --parts matching --syn-steps $steps || status=1
tail -n 5 "$out/bench.log"
exit $status
