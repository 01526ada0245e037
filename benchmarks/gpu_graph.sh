#!/usr/bin/env bash
# Issue #15 on the GPU (graph decode with fused ops): GPU tests and benchmarks, all under $OUT/graph.
#   bash benchmarks/gpu_graph.sh round2   GPU tests; GEMMs (cuBLAS, Triton GEMV); graph==eager check; profile;
#                                         TPOT batch 1 at 32K/128K: all fused parts, all but the norms in
#                                         the GEMVs, all but the GEMV, none (~2.5 min; at most 3.5)
#   bash benchmarks/gpu_graph.sh round3   (default) <= 60 s: TPOT of the default fused parts (dense, Duo 50%,
#                                         Duo 25% graph at 32K/128K; Duo 25% at 512K and batch 4), then the
#                                         GPU tests round 2 failed or changed
#   bash benchmarks/gpu_graph.sh table    the TPOT table of every variant (8K-512K, batch 1 and 4), no check/gemm/profile
#   bash benchmarks/gpu_graph.sh compile  transformers' static cache + compile at 8K/32K/128K, batch 1 and 4
#   bash benchmarks/gpu_graph.sh full     everything of bench_graph.py (every variant, 8K-512K, batch 1 and 4,
#                                         compile at 8K/32K/128K): ~15 min, run as separate calls if needed
# Installs this tree under /tmp and runs it with PYTHONPATH (as benchmarks/gpu_session.sh does).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvpress-gpu}/graph
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-graph . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
export PYTHONPATH=/tmp/kvpress-graph
BENCH="python benchmarks/bench_graph.py --out $OUT"
stamp() { echo "== $(date +%T) $*"; }
summary() { grep -v "^wrote" | tail -"$1"; }
tests() {
  stamp "GPU tests (graph, fused)"
  timeout "$1" pytest -m gpu -q -p no:cacheprovider tests/test_graph.py tests/test_fused.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
}
case ${1:-round3} in
  round2)
    tests 90
    stamp "bench: gemm, check, profile, TPOT batch 1"
    timeout 120 $BENCH --parts gemm,check,profile,tpot --batch 1 --lengths 32768,131072 --steps 15 \
      --variants dense-graph,duo50-graph,duo25-graph,duo25-graph/norm+rotary+mlp+residual+qkv+gate_up+gemv,duo25-graph/norm+rotary+mlp+residual+qkv+gate_up,duo25-graph/none 2>&1 \
      | tee "$OUT/bench_b1.log" | summary 45
    ;;
  round3)  # <= 60 s: TPOT of the default fused parts (not measured in round 2), then the fixed GPU tests
    stamp "bench: TPOT, default fused parts"
    timeout 40 $BENCH --parts tpot --batch 1,4 --lengths 32768,131072,524288 --steps 10 --tag _round3 \
      --variants dense-graph@32768,duo50-graph@32768,duo25-graph@32768,dense-graph@131072,duo50-graph@131072,duo25-graph@131072,duo25-graph/norm+rotary+mlp+residual+qkv+gate_up@32768,duo25-graph@524288,duo25-graph@32768x4 2>&1 \
      | tee "$OUT/bench_round3.log" | summary 16
    stamp "GPU tests: rounding, graph == eager with the default fused parts"
    timeout 25 pytest -m gpu -q -p no:cacheprovider tests/test_fused.py tests/test_graph.py -k "round_as_torch or greedy_padded" 2>&1 \
      | tee "$OUT/gpu_tests_round3.log" | tail -4
    ;;
  table)
    timeout 560 $BENCH --parts tpot --batch 1,4 --steps 12 --tag _table 2>&1 | tee "$OUT/bench_table.log" | summary 70
    ;;
  compile)
    timeout 560 $BENCH --parts compile --batch 1,4 --steps 12 --tag _table --compile-lengths 8192,32768,131072 2>&1 \
      | tee "$OUT/compile_table.log" | summary 20
    ;;
  full)
    timeout 590 $BENCH --parts check,gemm,profile,tpot --batch 1,4 2>&1 | tee "$OUT/bench_full.log" | summary 80
    timeout 590 $BENCH --parts compile --batch 1,4 --compile-lengths 8192,32768,131072 2>&1 | tee "$OUT/compile_full.log" | summary 20
    ;;
  *) echo "unknown part $1 (round2, round3, table, compile, full)" ;;
esac
stamp done
ls "$OUT"
