#!/usr/bin/env bash
# Probes that place time and find faults (a part of gpu_round.sh), under $OUT/probe/:
#   bash benchmarks/gpu_probe.sh less-tests      LESS GPU tests: the step's parts one at a time, launch 1's feature accumulators
#   bash benchmarks/gpu_probe.sh prefill         profile of one 128K prefill, 4 layers: unpatched, minference, minference+duo
#   bash benchmarks/gpu_probe.sh decode-splits   decode attention per split setting (dense vs Duo 25% at equal bytes)
#   bash benchmarks/gpu_probe.sh graph-profile   kernels of one decode step, kvpress dense at 128K
#   bash benchmarks/gpu_probe.sh less            every LESS kernel GPU test, then benchmarks/less_probe.py (one step, by part)
#   bash benchmarks/gpu_probe.sh vs-sweep        minference's 128K prefill (4 layers) per VS-kernel warps / stages
#   bash benchmarks/gpu_probe.sh palu-diag       Palu decode at 128K: as configured, prefetch, one rope row, rank-16 keys
#   bash benchmarks/gpu_probe.sh gpu-tests       every GPU test of the suite (pytest -m gpu tests/, ~4 min)
#   bash benchmarks/gpu_probe.sh all             the first four (~5 min)
#   bash benchmarks/gpu_probe.sh PART PART ...   several
set -uo pipefail
export PYTHONUNBUFFERED=1
R=${OUT:-/tmp/kvpress-gpu}/probe
mkdir -p "$R"
stamp() { echo "== $(date +%T) $*"; }
run_part() {
  case $1 in
    less-tests) stamp "$1"; timeout 240 pytest -m gpu -q -p no:cacheprovider tests/test_less_kernels.py \
                  -k "decode_step_gpu or feature_accumulators" 2>&1 | tee "$R/less_tests.log" | tail -25 ;;
    prefill) stamp "$1"; timeout 240 python benchmarks/profile_prefill.py --tokens 131072 --layers 4 \
               --variants unpatched,minference,minference+duo --out "$R/profile_prefill_128k.json" 2>&1 \
               | grep -v USDT | tee "$R/prefill.log" | tail -60 ;;
    decode-splits) stamp "$1"; timeout 200 python benchmarks/decode_split_probe.py 2>&1 | tee "$R/decode_splits.log" | tail -8
                   cp benchmarks/results/decode_split_probe_*.json "$R/" 2>/dev/null ;;
    graph-profile) stamp "$1"; timeout 120 python benchmarks/bench_graph.py --parts profile --profile dense-graph:131072 \
                     --out "$R" 2>&1 | tee "$R/graph_profile.log" | tail -30 ;;
    less) stamp "$1"; timeout 240 pytest -m gpu -q -p no:cacheprovider tests/test_less_kernels.py 2>&1 \
            | tee "$R/less_tests_all.log" | tail -15
          timeout 120 python benchmarks/less_probe.py "$R/less_probe.json" 2>&1 | tee "$R/less_probe.log" | tail -16 ;;
    vs-sweep) stamp "$1"; timeout 240 python benchmarks/profile_prefill.py --tokens 131072 --layers 4 --vs-sweep \
                --out "$R/vs_sweep_128k.json" 2>&1 | grep -v USDT | tee "$R/vs_sweep.log" | tail -8 ;;
    prefill-minference) stamp "$1"; timeout 120 python benchmarks/profile_prefill.py --tokens 131072 --layers 4 \
                          --variants minference,minference+duo --out "$R/profile_prefill_128k_minference.json" 2>&1 \
                          | grep -v USDT | grep -v "^  gap" | tee "$R/prefill_minference.log" | tail -30 ;;
    palu-diag) stamp "$1"; timeout 150 python benchmarks/palu_probe.py "$R/palu_probe.json" 2>&1 | tee "$R/palu_probe.log" | tail -12 ;;
    gpu-tests) stamp "$1"; timeout 400 pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$R/gpu_tests.log" | tail -15 ;;
    *) echo "unknown part $1" ;;
  esac
}
if [ "${1:-all}" = all ]; then
  for part in less-tests prefill decode-splits graph-profile; do run_part $part; done
else
  for part in "$@"; do run_part "$part"; done
fi
stamp done
