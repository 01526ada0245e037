#!/usr/bin/env bash
# One device call: GPU tests and benchmarks of this tree (results under $OUT).
#   bash benchmarks/gpu_session.sh tests        GPU tests (pytest -m gpu)
#   bash benchmarks/gpu_session.sh duo-ab       Duo decode/prefill layer bench, before (.gpu_old) and now
#   bash benchmarks/gpu_session.sh less-budgets the LESS step at budgets of 128-4096 tokens per KV head
#   bash benchmarks/gpu_session.sh less-probe   the same at 128-2048 tokens, 128K, per kernel setting
#   bash benchmarks/gpu_session.sh less-tests   the LESS GPU tests only
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvpress-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The tree is installed (not editable) under /tmp and run with PYTHONPATH, never from the repository
# root on sys.path (./kvpress there lacks the kvpress.kernels / kvpress.calibration mapping).
install() { pip install -q --no-deps --no-build-isolation --target "$2" "$1" >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"; }
install . /tmp/kvpress-new
export PYTHONPATH=/tmp/kvpress-new
for part in "$@"; do
  case $part in
    duo-ab)
      if [ -d .gpu_old ]; then  # the tree before a change, carried as .gpu_old (git archive COMMIT)
        install ./.gpu_old /tmp/kvpress-old
        (cd /tmp && PYTHONPATH=/tmp/kvpress-old timeout 240 python "$OLDPWD/.gpu_old/benchmarks/bench_duo.py" \
           --parts layer --no-sweep --out "$OUT/before") 2>&1 | tail -30
      fi
      timeout 240 python benchmarks/bench_duo.py --parts layer --no-sweep --out "$OUT/after" 2>&1 | tail -30 ;;
    tests)
      timeout 400 pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    less-budgets)
      timeout 300 python benchmarks/bench_less.py layer --lengths 131072 524288 --budgets 128 256 512 1024 2048 4096 \
        --out "$OUT" 2>&1 | tail -30 ;;
    less-probe)
      timeout 420 python benchmarks/less_budget_probe.py --budgets 128 256 512 1024 2048 --out "$OUT" 2>&1 | tail -30 ;;
    less-tests)
      timeout 150 pytest -m gpu -q -p no:cacheprovider tests/test_less_kernels.py tests/test_less.py 2>&1 \
        | tee "$OUT/less_gpu_tests.log" | tail -20 ;;
    *) echo "unknown part $part" ;;
  esac
done
