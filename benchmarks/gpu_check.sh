#!/usr/bin/env bash
# GPU check: build with CUDA, run the test suite on the GPU, run the GPU benchmarks, the
# kernel report and the demo; everything lands as logs and JSON under $OUT.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#   STAGES="build tests" bash benchmarks/gpu_check.sh     # a subset, e.g. to fit one
#   STAGES="build benchmarks report" ...                 # 10-minute device call each
#
# Uses the machine's own python (a CUDA torch and Triton must be installed; nothing is
# downloaded). Wheels of optional peers (inf-cl, ...) placed in ./wheels are installed
# first. Each stage has a time limit so that a hang costs minutes, not the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python}
STAGES=${STAGES:-build tests benchmarks report demo}
wants() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
status=0
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start))s"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if compgen -G "wheels/*.whl" >/dev/null; then
  stage install_peers 120 $PY -m pip install --no-index --no-deps wheels/*.whl
fi
# sm_90 covers H100/H200; add 8.0 for A100 machines.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} COTS_KERNELS_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if wants build; then
  stage build 240 $PY -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
fi
wants tests && stage tests 300 $PY -m pytest -q -p no:cacheprovider tests --junitxml="$OUT/tests.xml"
wants benchmarks && stage benchmarks 540 $PY -m benchmarks.gpu.run --out "$OUT"
wants report && stage report 120 $PY -m benchmarks.report --json "$OUT/report_gpu.json"
# The README's demo on the GPU: a tiny COTS trained in seconds, recall and summary JSON.
wants demo && stage demo 180 $PY -m cots.demo --out "$OUT/demo"
exit $status
