#!/usr/bin/env bash
# Everything the GPU checks need, in one command on a GPU machine (see ../shared/device/README.md):
#   the GPU test suite, compute-sanitizer (memcheck, racecheck) on a small subset, the benchmarks and the
#   independent acceptance run, with logs and results written to RESULTS (default profiling/results/<gpu>).
#
#   ../shared/device/tilelang-bundle.sh .device            # once, on the development machine
#   bash profiling/gpu_run.sh [RESULTS]                     # on the GPU machine, from the repository root
#
# If .device/tilelang-site.tar.xz is present it is unpacked and put on PYTHONPATH (the GPU machine cannot install
# packages); a carried TileLang cache (.device/tilelang-cache) is reused so kernels built here are not rebuilt.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .device/tilelang-site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .device/tilelang-site.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .device/tilelang-cache ] && export TILELANG_CACHE_DIR=$PWD/.device/tilelang-cache
export PYTHONUNBUFFERED=1 TILELANG_PRINT_ON_COMPILATION=0
gpu=$(python3 -c "from profiling.bench import gpu_dir_name; print(gpu_dir_name())")
res=${1:-profiling/results/$gpu}
mkdir -p "$res"
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, tilelang; print('torch', torch.__version__, 'tilelang', tilelang.__version__)"
  git rev-parse HEAD 2>/dev/null || true
  date -u +%FT%TZ
} > "$res/environment.txt" 2>&1

echo "== GPU tests"
python3 -m pytest -m gpu -q -n 4 -p no:cacheprovider --junitxml="$res/gpu-tests.xml" 2>&1 | tail -n 40 \
  | tee "$res/gpu-tests.log" || status=1
echo "== compute-sanitizer"
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -m profiling.sanitize_cases > "$res/sanitizer-$tool.log" 2>&1 \
    && echo "$tool: clean" || { echo "$tool: FAILED (see $res/sanitizer-$tool.log)"; status=1; }
done
echo "== benchmarks"
python3 -m profiling.bench --out "$res" 2>&1 | tail -n 60 || status=1
if [ -f ../shared/verify/acceptance.py ]; then
  echo "== acceptance"
  python3 ../shared/verify/acceptance.py --out "$res" 2>&1 | tail -n 30 || status=1
elif [ -f shared/verify/acceptance.py ]; then
  echo "== acceptance"
  python3 shared/verify/acceptance.py --out "$res" 2>&1 | tail -n 30 || status=1
fi
exit $status
