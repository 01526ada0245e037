#!/usr/bin/env bash
# LESS (#14) on the H200: GPU tests, the decode-step layer bench, maps trained on needle-llama (quality),
# end to end on the 8B shape and flat memory. Everything lands in $OUT/less/; each step has its own
# timeout and the scripts write their rows as they come (a step cut short keeps what it measured).
#   bash benchmarks/gpu_less.sh            round 2: tests, layer bench, needle-llama training + quality (~2.5 min)
#   bash benchmarks/gpu_less.sh round3     e2e TPOT / peak memory (32K, 128K), memory over 10K tokens, quality again
#   bash benchmarks/gpu_less.sh smol       SmolLM2-135M-Instruct H2O quality (benchmarks/gpu_smol_model.sh makes the model; <= 5 min)
#   bash benchmarks/gpu_less.sh e2e|memory|quality|layer|tests|prefill   one part (prefill: the prefill kernels' GPU tests)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvpress-gpu}
R="$OUT/less"
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R/gpu.txt"
# The tree must be importable as installed (not from the repository root): install it unless the caller did.
if ! (cd /tmp && python -c "import kvpress.kernels.less, kvpress.calibration.less" >/dev/null 2>&1); then
  pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-less . >"$R/install.log" 2>&1 || tail -5 "$R/install.log"
  export PYTHONPATH=/tmp/kvpress-less${PYTHONPATH:+:$PYTHONPATH}
fi
part=${1:-round2}
start=$(date +%s)
quality() {  # $1: timeout (s), $2: tag, then extra arguments
  local limit=$1 tag=$2
  shift 2
  timeout "$limit" python benchmarks/less_quality.py --device cuda --train-samples 256 --train-length 1024 \
    --capture-batch 32 --batch-size 2 --val-fraction 0.1 --eval-windows 32 --save-maps "$R/maps$tag" \
    --out "$R/less_quality_needle_llama$tag.json" "$@" > "$R/quality$tag.log" 2>&1
  grep "^\[\|^| " "$R/quality$tag.log" | tail -30 || tail -5 "$R/quality$tag.log"
}
case $part in
  round2)
    bash "$0" tests
    bash "$0" layer
    quality 60 _gpu --epochs 16 --halve-every 4 --lr 1e-2 --maps r8h128,r8h512 ;;
  round3)
    bash "$0" e2e
    bash "$0" memory
    quality 60 _gpu3 --epochs 16 --halve-every 4 --lr 1e-2 --maps r8h512 ;;
  tests)
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_less_kernels.py tests/test_less.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -8 ;;
  prefill)
    timeout 150 pytest -m gpu -q -p no:cacheprovider -k prefill tests/test_less_kernels.py 2>&1 \
      | tee "$R/gpu_tests_prefill.log" | tail -5 ;;
  layer)
    timeout 120 python benchmarks/bench_less.py layer --out "$R" > "$R/layer.log" 2>&1; grep -A40 "^LESS decode step" "$R/layer.log" || tail -5 "$R/layer.log" ;;
  e2e)
    timeout ${E2E_TIMEOUT:-90} python benchmarks/bench_less.py e2e --out "$R" > "$R/e2e.log" 2>&1; grep "^e2e\|^LESS end\|^variant\|^unpatched\|^LESS h2o" "$R/e2e.log" || tail -5 "$R/e2e.log" ;;
  memory)
    timeout 40 python benchmarks/bench_less.py memory --out "$R" > "$R/memory.log" 2>&1; tail -14 "$R/memory.log" ;;
  quality)
    quality 150 _gpu --epochs 16 --halve-every 4 --lr 1e-2 --maps r8h128,r8h512 ;;
  smol)
    smol=$(bash benchmarks/gpu_smol_model.sh) || exit 0
    # H2O (Lambda met the target on the CPU): the CPU run's settings (less_quality_smollm2_cpu_h2o_w64_e16.json)
    # with twice its windows and both map sizes
    timeout ${SMOL_TIMEOUT:-280} python benchmarks/less_quality.py --device cuda --model "$smol" --chat --policies h2o \
      --train-samples 128 --train-length 1024 --capture-batch 16 --batch-size 2 --val-fraction 0.1 --eval-windows 32 \
      --epochs 16 --halve-every 6 --lr 1e-2 --maps r8h128,r8h512 --save-maps "$R/maps_smol" ${SMOL_ARGS:-} \
      --out "$R/less_quality_smollm2_gpu.json" > "$R/quality_smol.log" 2>&1
    grep "^\[\|^| " "$R/quality_smol.log" | tail -30 || tail -5 "$R/quality_smol.log"
    # each trained map folder comes back beside the part's archive, in pieces under the 16 MiB a returned file may hold
    for maps in "$R"/maps_smol/*/; do
      [ -d "$maps" ] || continue
      name=$(basename "$maps")
      tar czf - -C "$R/maps_smol" "$name" | split -b 15m - "$OUT/maps_smol_$name.tar.gz.part"
      rm -rf "$maps"
    done
    ls -la "$OUT" ;;
  *) echo "unknown part $part (round2, round3, tests, prefill, layer, e2e, memory, quality, smol)" ;;
esac
echo "less $part: $(( $(date +%s) - start )) s"
