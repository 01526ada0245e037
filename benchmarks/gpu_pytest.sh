#!/usr/bin/env bash
# The GPU tests of one test file on the device, under $OUT/pytest/ (a part of gpu_round.sh):
#   bash benchmarks/gpu_pytest.sh kernels        pytest -m gpu tests/test_kernels.py
set -uo pipefail
R=${OUT:-/tmp/kvpress-gpu}/pytest
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R/gpu.txt"
timeout "${PYTEST_TIMEOUT:-120}" pytest -m gpu -q -p no:cacheprovider "tests/test_${1:?which tests/test_NAME.py}.py" 2>&1 \
  | tee "$R/gpu_tests_$1.log" | tail -15
