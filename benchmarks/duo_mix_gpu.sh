#!/usr/bin/env bash
# Duo gates from each calibration data mix, and their quality, on needle-llama and SmolLM2 (issue 16).
#   bash benchmarks/duo_mix_gpu.sh needle   calibrate needle-llama per mix (in the background)
#   bash benchmarks/duo_mix_gpu.sh smol     SmolLM2 (pieces in /tmp/smol, gguf wheel in .whl): quality of both
#                                           gate files (passkey data, the mix)
# Results under $OUT (gates) and benchmarks/results (quality JSON, copied to $OUT).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/kvpress-gpu}
RES=/tmp/duo-mix; mkdir -p $RES "$OUT"
[ -d /tmp/kvpress-new ] || pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-new . >/dev/null 2>&1
export PYTHONPATH=/tmp/kvpress-new${PYTHONPATH:+:$PYTHONPATH}
ROOT=$PWD
# the python that has torch, run outside the repository root (whose ./kvpress lacks the kvpress.calibration mapping)
cal() { (cd /tmp && python -c "import sys; from kvpress.calibration.cli import main; sys.exit(main())" "$@"); }
MIXES="passkey passkey,kvlookup,multivalue"  # file names join the kinds with "-"
case ${1:-} in
  needle)  # per mix, in parallel on one GPU: calibrate (500 steps, 2K-8K tokens), then every task + perplexity
    EVAL="--dtype float32 --sparsity 0.5,0.75,0.9 --inverted 0.5 --tasks passkey,multikey,multivalue,kvlookup,ppl
      --lengths 1024,2048,4096,8192 --depths 5 --samples 1 --ppl-context 8192 --ppl-tokens 65536"
    quality() { timeout 330 python benchmarks/duo_quality.py --model models/needle-llama $EVAL --config "$1=$2" \
      --out $OUT/needle_duo_$1.json > $OUT/needle_duo_$1.log 2>&1; }
    [ -n "${SKIP_SHIPPED:-}" ] || quality shipped models/needle-llama/kvpress-duo.safetensors &
    for d in ${NEEDLE_MIXES:-$MIXES passkey,kvlookup}; do n=${d//,/-}
      ( timeout 240 bash -c "$(declare -f cal); cal duo --model $ROOT/models/needle-llama --out $OUT/nl_$n.safetensors \
          --data $d --steps 500 --min-length 2048 --max-length 8192 --num-passkeys 4 --passkey-words 6 --no-progress" \
          > $OUT/nl_$n.log 2>&1 && quality $n $OUT/nl_$n.safetensors ) &
    done
    wait; tail -n 2 $OUT/nl_*.log; grep -h "^| " $OUT/needle_duo_*.log ;;
  all)
    bash "$0" needle; bash "$0" smol ;;  # longer than one device call: run the parts separately
  smol)  # SmolLM2 (pieces joined from /tmp/smol, see gpu_round.sh): every task of both gate files, side by side
    SMOL=$(bash benchmarks/gpu_smol_model.sh) || exit 0
    EVAL="--dtype float32 --chat --sparsity 0.5,0.75,0.9 --inverted 0.5 --lengths 1024,2048 --depths 5 --samples 4
      --tasks passkey,multikey,multivalue,kvlookup,people,ppl --ppl-context 2048 --ppl-tokens 65536"
    for g in passkey=benchmarks/results/smollm2-duo-gates-passkey.safetensors mix=kvpress/data/duo/smollm2-135m-instruct.safetensors; do
      timeout 420 python benchmarks/duo_quality.py --model $SMOL $EVAL --config $g \
        --out $OUT/smollm2_duo_${g%%=*}.json > $OUT/smollm2_duo_${g%%=*}.log 2>&1 &
    done
    wait; grep -h "^| " $OUT/smollm2_duo_*.log ;;
esac
