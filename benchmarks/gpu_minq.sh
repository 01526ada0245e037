#!/usr/bin/env bash
# minq (issue 12, MInference quality): attention recall per layer and retrieval accuracy, patched vs
# unpatched, on needle-llama (8K) and SmolLM2-135M-Instruct (1K, 2K), on one H200 (~2 min).
#   bash benchmarks/gpu_minq.sh            everything under "$OUT/minq/"
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
    (cd /tmp && KVPRESS_KERNELS=reference timeout 60 python "$ROOT/benchmarks/minference_quality.py" "$@" \
       --out "$R/$name.json") >"$R/$name.log" 2>&1
  fi
  echo "== $name (rc $rc)"; grep -v "Loading weights" "$R/$name.log" | tail -8 | cut -c1-400
}

# 1. needle-llama at 8192 tokens (its max), fp32: the shipped searched config, the scaled rule
#    (floors 64, 128) and the runtime's no-config rule, every trained task, 5 depths x 2 samples.
quality minference_quality_needle_llama_gpu 70 --model "$ROOT/models/needle-llama" --dtype float32 \
  --config searched="$ROOT/models/needle-llama/kvpress-minference.safetensors" \
  --config scaled64=scaled:64 --config scaled128=scaled:128 --config default \
  --tasks passkey,multikey,multivalue,kvlookup --lengths 8192 --depths 5 --samples 2

# 2. SmolLM2-135M-Instruct at 1K and 2K (where it retrieves), chat prompts, fp32.
SMOL=""
for d in "${KVPRESS_CACHE:-$HOME/.cache/kvpress}/smollm2-135m-instruct" /tmp/kvc/smollm2-135m-instruct; do
  [ -f "$d/config.json" ] && [ -f "$d/model.safetensors" ] && SMOL=$d && break
done
if [ -z "$SMOL" ] && ls .smol/*.part02 >/dev/null 2>&1; then
  pip install -q --no-index --no-deps --target /tmp/minq-site .whl/gguf-*.whl >/dev/null 2>&1
  PYTHONPATH=$PYTHONPATH:/tmp/minq-site timeout 60 python models/fetch_smollm2.py --from .smol/*.part00 .smol/*.part01 \
    .smol/*.part02 --out /tmp/kvc/smollm2-135m-instruct 2>&1 | tail -2
  [ -f /tmp/kvc/smollm2-135m-instruct/model.safetensors ] && SMOL=/tmp/kvc/smollm2-135m-instruct
fi
if [ -n "$SMOL" ]; then
  quality minference_quality_smollm2_gpu 70 --model "$SMOL" --dtype float32 --chat \
    --config searched="$ROOT/benchmarks/results/minference_quality_smollm2_config.json" \
    --config scaled64=scaled:64 --config scaled128=scaled:128 --config default \
    --tasks passkey,people --lengths 1024,2048 --depths 5 --samples 2
else
  echo "SmolLM2 skipped: not converted on this machine and .smol pieces not carried" | tee "$R/smollm2_skipped.log"
fi
ls -la "$R"
