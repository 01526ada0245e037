#!/usr/bin/env bash
# minq (issue 12, MInference quality): attention recall per layer and retrieval accuracy, patched vs
# unpatched, on needle-llama (8K) and SmolLM2-135M-Instruct (1K, 2K), on one H200 (~2 min).
#   bash benchmarks/gpu_minq.sh            everything under "$OUT/minq/" (SAMPLES=1 per cell by default)
#   bash benchmarks/gpu_minq.sh round3     <= 60 s: needle-llama at 8K, unpatched / shipped search / scaled
#                                          rule, 5 depths x 2 samples (+ SmolLM2 at 2K if already converted)
# SmolLM2 is taken from $KVPRESS_CACHE/smollm2-135m-instruct or /tmp/kvc/smollm2-135m-instruct when
# a previous call converted it there, else converted from .smol/*.part00-02 (+ .whl/gguf-*.whl) if
# they were carried; without them its part is skipped (said in the summary).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvpress-gpu}
R="$OUT/minq"; mkdir -p "$R"
ROOT=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R/gpu.txt"
# The tree installed (not editable) under /tmp and run with PYTHONPATH (see benchmarks/gpu_session.sh).
rm -rf /tmp/kvpress-minq
timeout 90 pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-minq . >"$R/install.log" 2>&1 \
  || { echo "install failed"; tail -5 "$R/install.log"; }
export PYTHONPATH=/tmp/kvpress-minq

# quality NAME LIMIT ARGS...: one benchmarks/minference_quality.py run (outside the repository root);
# if it fails with a Python error (not a timeout), once more on the torch reference kernels.
quality() {
  local name=$1 limit=$2; shift 2
  (cd /tmp && timeout "$limit" python "$ROOT/benchmarks/minference_quality.py" "$@" --out "$R/$name.json") \
    >"$R/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
    echo "$name: rc $rc, again with KVPRESS_KERNELS=reference"; grep -v "Loading weights" "$R/$name.log" | tail -4
    mv "$R/$name.log" "$R/$name.triton_error.log"
    (cd /tmp && KVPRESS_KERNELS=reference timeout 45 python "$ROOT/benchmarks/minference_quality.py" "$@" \
       --out "$R/$name.json") >"$R/$name.log" 2>&1
  fi
  echo "== $name (rc $rc)"; grep -v "Loading weights" "$R/$name.log" | tail -8 | cut -c1-400
}

if [ "${1:-}" = round3 ]; then
  quality minference_quality_needle_llama_gpu 35 --model "$ROOT/models/needle-llama" --dtype float32 \
    --config searched="$ROOT/models/needle-llama/kvpress-minference.safetensors" --config scaled64=scaled:64 \
    --tasks passkey,multikey,multivalue,kvlookup --recall-tasks passkey,kvlookup --lengths 8192 --depths 5 --samples 2
  for d in "${KVPRESS_CACHE:-$HOME/.cache/kvpress}/smollm2-135m-instruct" /tmp/kvc/smollm2-135m-instruct; do
    if [ -f "$d/model.safetensors" ]; then
      quality minference_quality_smollm2_gpu 15 --model "$d" --dtype float32 --chat \
        --config searched="$ROOT/benchmarks/results/minference_quality_smollm2_config.json" --config scaled64=scaled:64 \
        --tasks passkey,people --recall-tasks passkey --lengths 2048 --depths 5 --samples 1
      break
    fi
  done
  exit 0
fi

# search NAME MODEL LENGTH START CANDIDATES: kvpress-calibrate minference with equal-budget candidates
# (tokens per query, unscaled) at the model's longest length.
search() {
  (cd /tmp && timeout 25 python -c "import sys; from kvpress.calibration.cli import main; sys.exit(main())" \
     minference --model "$2" --length "$3" --start "$4" --no-scale --candidates "$5" \
     --out "$R/$1.safetensors" --reference-json "$R/$1.json" --no-progress) 2>&1 | grep -v "Loading weights" | tail -2
}

# 1. needle-llama at 8192 tokens (its max), fp32: the shipped search (the reference's candidates scaled
#    by 8192 / 30000), searches with candidates of equal budget (1024 and 512 keys per query), the
#    scaled rule (floor 64) and the runtime's no-config rule; every trained task, 5 depths x $SAMPLES samples.
NL="$ROOT/models/needle-llama"
search nl_eq1024 "$NL" 8192 683 "ashape:64:960,vs:30:994,vs:128:896,vs:512:512,vs:960:64,block:16"
search nl_eq512 "$NL" 8192 683 "ashape:32:480,vs:30:482,vs:64:448,vs:256:256,vs:448:64,block:8"
quality minference_quality_needle_llama_gpu 60 --model "$NL" --dtype float32 \
  --config searched="$NL/kvpress-minference.safetensors" --config eq1024="$R/nl_eq1024.safetensors" \
  --config scaled64=scaled:64 --config eq512="$R/nl_eq512.safetensors" --config default \
  --tasks passkey,multikey,multivalue,kvlookup --lengths 8192 --depths 5 --samples ${SAMPLES:-1}

# 2. SmolLM2-135M-Instruct at 1K and 2K (where it retrieves), chat prompts, fp32.
SMOL=$(bash benchmarks/gpu_smol_model.sh)
if [ -n "$SMOL" ]; then
  search smol_eq256 "$SMOL" 2048 171 "ashape:32:224,vs:30:226,vs:64:192,vs:128:128,vs:192:64,block:4"
  search smol_eq480 "$SMOL" 2048 171 "ashape:64:416,vs:30:450,vs:128:352,vs:240:240,vs:416:64,block:7"
  quality minference_quality_smollm2_gpu 55 --model "$SMOL" --dtype float32 --chat \
    --config searched="$ROOT/benchmarks/results/minference_quality_smollm2_config.json" \
    --config eq256="$R/smol_eq256.safetensors" --config scaled64=scaled:64 \
    --config eq480="$R/smol_eq480.safetensors" --config default \
    --tasks passkey,people --lengths 1024,2048 --depths 5 --samples ${SAMPLES:-1}
else
  echo "SmolLM2 skipped: not converted on this machine and .smol pieces not carried" | tee "$R/smollm2_skipped.log"
fi
ls -la "$R"
