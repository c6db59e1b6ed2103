#!/usr/bin/env bash
# One prepared call for a lent GPU (see bench/RESULTS.md): the GPU tests, the timing report,
# and the static prediction for this machine's Triton beside it. Writes under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps --no-build-isolation -e . 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python -m pytest -q -m gpu tests -x -p no:cacheprovider 2>&1 | tail -15
timeout 300 python bench/gpu_report.py
v=$(python -c "import triton; print(triton.__version__)")
[ -f "bench/results/sass-triton-$v.json" ] || python bench/sass_report.py --arch 90 --no-fallback
python bench/sass_report.py --markdown "bench/results/sass-triton-$v.json"
