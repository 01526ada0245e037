#!/usr/bin/env bash
# Duo gates from each calibration data mix, and their quality, on needle-llama and SmolLM2 (issue 16).
#   bash benchmarks/duo_mix_gpu.sh needle   calibrate needle-llama per mix (in the background)
#   bash benchmarks/duo_mix_gpu.sh smol     join SmolLM2 (.smol pieces, gguf wheel in .whl), calibrate it,
#                                           then the quality of every config on both models
# Results under $OUT (gates) and benchmarks/results (quality JSON, copied to $OUT).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/kvpress-gpu}
RES=/tmp/duo-mix; mkdir -p $RES "$OUT"
[ -d /tmp/kvpress-new ] || pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-new . >/dev/null 2>&1
export PYTHONPATH=/tmp/kvpress-new${PYTHONPATH:+:$PYTHONPATH}
ROOT=$PWD
# the python that has torch, run outside the repository root (whose ./kvpress lacks the kvpress.kernels mapping)
cal() { (cd /tmp && python -c "import sys; from kvpress.calibration.cli import main; sys.exit(main())" "$@"); }
MIXES="passkey passkey,kvlookup,multivalue"
case ${1:-} in
  needle)  # per mix, in parallel on one GPU: calibrate (500 steps, 2K-8K tokens), then every task + perplexity
    EVAL="--dtype float32 --sparsity 0.5,0.75,0.9 --inverted 0.5 --tasks passkey,multikey,multivalue,kvlookup,ppl
      --lengths 1024,2048,4096,8192 --depths 5 --samples 1 --ppl-context 8192 --ppl-tokens 65536"
    quality() { timeout 330 python benchmarks/duo_quality.py --model models/needle-llama $EVAL --config "$1=$2" \
      --out $OUT/needle_duo_$1.json > $OUT/needle_duo_$1.log 2>&1; }
    quality shipped models/needle-llama/kvpress-duo.safetensors &
    for d in $MIXES passkey,kvlookup; do n=${d//,/+}
      ( timeout 240 bash -c "$(declare -f cal); cal duo --model $ROOT/models/needle-llama --out $OUT/nl_$n.safetensors \
          --data $d --steps 500 --min-length 2048 --max-length 8192 --num-passkeys 4 --passkey-words 6 --no-progress" \
          > $OUT/nl_$n.log 2>&1 && quality $n $OUT/nl_$n.safetensors ) &
    done
    wait; tail -n 2 $OUT/nl_*.log; grep -h "^| " $OUT/needle_duo_*.log ;;
  all)
    bash "$0" needle; bash "$0" smol ;;  # longer than one device call: run the parts separately
  smol)
    if [ ! -f /tmp/kvc/smollm2-135m-instruct/config.json ]; then
      mkdir -p /tmp/smol && cp .smol/*.part* /tmp/smol/ 2>/dev/null
      pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl >/dev/null 2>&1
      PYTHONPATH=$PYTHONPATH:/tmp/site python models/fetch_smollm2.py --from /tmp/smol/*.part00 /tmp/smol/*.part01 \
        /tmp/smol/*.part02 --out /tmp/kvc/smollm2-135m-instruct 2>&1 | tail -2
    fi
    SMOL=/tmp/kvc/smollm2-135m-instruct
    for d in $MIXES; do n=${d//,/+}
      cal duo --model $SMOL --out $RES/smol_$n.safetensors --data $d --steps 500 \
        --min-length 1024 --max-length 4096 --num-passkeys 4 --passkey-words 6 --no-progress 2>&1 | tail -1
    done
    while [ ! -f $RES/needle.done ]; do sleep 5; done; tail -n 1 $RES/nl_*.log
    python benchmarks/duo_quality.py --model models/needle-llama --dtype float32 \
      --config shipped=models/needle-llama/kvpress-duo.safetensors \
      --config passkey=$RES/nl_passkey.safetensors --config mix=$RES/nl_passkey+kvlookup+multivalue.safetensors \
      --sparsity 0.5,0.75,0.9 --tasks passkey,multikey,multivalue,kvlookup --lengths 1024,2048,4096,8192 \
      --depths 5 --samples 1 --out $OUT/needle_llama_duo_mix.json 2>&1 | tail -30
    python benchmarks/duo_quality.py --model $SMOL --dtype float32 --chat \
      --config passkey=$RES/smol_passkey.safetensors --config mix=$RES/smol_passkey+kvlookup+multivalue.safetensors \
      --sparsity 0.5,0.75,0.9 --tasks passkey,people --lengths 1024,2048 --depths 5 --samples 2 \
      --out $OUT/smollm2_duo_mix.json 2>&1 | tail -30
    cp $RES/*.safetensors "$OUT"/ 2>/dev/null ;;
esac
