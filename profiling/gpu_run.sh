#!/usr/bin/env bash
# Every GPU check in one command, on the GPU machine, from the repository root (see docs/gpu-runs.md):
#
#   bash profiling/gpu_prep.sh                 # once, on the development machine: fills .device/
#   bash profiling/gpu_run.sh OUT [ARGS...]    # on the GPU machine; ARGS go to python -m profiling.gpu_run
#
# The driver (profiling/gpu_run.py) unpacks the carried TileLang bundle (.device/tilelang-site.tar.xz) and kernel
# cache (.device/tilelang-cache.tar.xz) and the bench's peers (.device/peers/*.whl), runs the stages in priority order with a time limit each, and keeps
# OUT/summary.md, OUT/summary.json and OUT/results.tar.xz up to date after every stage.
set -uo pipefail
cd "$(dirname "$0")/.."
# MHC_STRICT_KERNELS=1: no stage may pass on the PyTorch reference where a kernel should have run (mhc/_cuda.py)
export MHC_RUN_STARTED=${MHC_RUN_STARTED:-$(date +%s)} PYTHONUNBUFFERED=1 MHC_STRICT_KERNELS=1
exec python3 -m profiling.gpu_run "${1:-profiling/results/gpu-run}" "${@:2}"
