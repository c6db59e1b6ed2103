#!/usr/bin/env bash
# The one prepared call for a lent GPU (see docs/GPU-CHECK.md and bench/RESULTS.md), in this
# order, each step's output kept under $OUT (default bench/results/gpu-check-<date>):
#   1. install this checkout (no dependencies: the machine's torch and Triton are the ones to check)
#   2. fasthist check --device cuda: versions, device, per optimizer and dtype the backend, the
#      histogram strategy, the shared-memory guard's verdict and the device self-test (check.json)
#   3. the gpu-marked tests (gpu-tests.txt)
#   4. python bench/gpu_report.py: the timing report of record (gpu-<date>.json)
#   5. the static sm_90 prediction for this machine's Triton beside it (sass-prediction.md)
# A failing step does not stop the later ones; the exit status is the first failure's.
# Budget: ~1 min install + check, <=4 min tests, <=5 min report (its own --budget-s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-check-$(date -u +%Y-%m-%d)}"
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, tee into $OUT/NAME.txt, remember the first failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$status" -ne 0 ] || status=$rc
}
step install pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step check timeout 300 python -m fasthist check --device cuda --json "$OUT/check.json"
step gpu-tests timeout 240 python -m pytest -q -m gpu tests -p no:cacheprovider
step gpu-report timeout 330 python bench/gpu_report.py --out-dir "$OUT"
v=$(python -c "import triton; print(triton.__version__)")
sass="bench/results/sass-triton-$v.json"
[ -f "$sass" ] || step sass-report python bench/sass_report.py --arch 90 --no-fallback
[ -f "$sass" ] && python bench/sass_report.py --markdown "$sass" > "$OUT/sass-prediction.md"
echo "outputs in $OUT; exit $status"
exit "$status"
