#!/usr/bin/env bash
# One GPU session for the mixed-attention kernel: environment, GPU tests, benchmark.
# Usage: OUT=<folder> bash benchmarks/kernel_gpu_session.sh
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/env.txt"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout 140 $PY -m pytest -q $XDIST -p no:cacheprovider -p no:benchmark -rs tests/test_kernel_gpu.py tests/test_kernel_triton.py tests/test_fold.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 260 $PY benchmarks/kernel_mixed_attention.py --out "$OUT/kernel_mixed_attention.md" 2>&1 | tee "$OUT/bench.log" | tail -45
