#!/usr/bin/env bash
# The GPU check in one call that fits a GPU lease (15 minutes of device time in all, at
# most 10 per call, 8 files back): environment, the CUDA build, the focused GPU tests,
# one case of each benchmark, the base COTS training step, then the remaining shapes and
# tests while the budget lasts; each stage has its own time limit, the whole run one
# budget (COTS_GPU_BUDGET, 500 s). Four files land in $OUT: gpu_results.json,
# gpu_log.txt, tests.xml, gpu_extra.tar.gz; a summary is printed last. The stages are in
# benchmarks/gpu/pipeline.py.
#
#   bash benchmarks/gpu_check.sh                         # OUT defaults to benchmarks/results/gpu
#   COTS_GPU_RERUN=benchmarks/results/gpu/gpu_results.json COTS_GPU_BUDGET=150 \
#       bash benchmarks/gpu_check.sh                     # a second call: only what failed or timed out
#   COTS_GPU_STAGES=environment,build,tests bash benchmarks/gpu_check.sh   # a subset
#   bash benchmarks/gpu_check.sh --dry-run               # the same pipeline on the CPU, tiny shapes
#
# Uses the machine's own python (a CUDA torch and Triton; nothing is downloaded). Wheels
# of optional peers (inf-cl, liger-kernel, cut-cross-entropy) placed in ./wheels are
# installed first, without an index.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m benchmarks.gpu.run --out "${OUT:-benchmarks/results/gpu}" "$@"
