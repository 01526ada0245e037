#!/usr/bin/env bash
# One device call: run benchmarks/gpu_<part>.sh for each named part, each writing under $OUT/<part>/,
# then pack that folder as $OUT/<part>.tar.gz (a device call returns at most 8 files).
#   bash benchmarks/gpu_round.sh mink palu less graph      each part with its default argument
#   bash benchmarks/gpu_round.sh mink:round3 palu:tpot     PART:ARG passes ARG (output folder PART-ARG)
# SmolLM2's GGUF travels in 32 MiB pieces (.smol/, see models/fetch_smollm2.py --split), one or two per
# call: each call adds the pieces it carries to /tmp/smol, which stays while the machine is held.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/kvpress-gpu}
mkdir -p "$OUT" /tmp/smol
cp .smol/*.part* /tmp/smol/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
# the tree installed (not editable) under /tmp: ./kvpress in the repository root lacks the kvpress.calibration mapping
rm -rf /tmp/kvpress-new
pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-new . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
export PYTHONPATH=/tmp/kvpress-new
for spec in "$@"; do
  script=${spec%%:*}; arg=${spec#"$script"}; arg=${arg#:}
  part=$script${arg:+-$arg}
  mkdir -p "$OUT/$script"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${PART_TIMEOUT:-300}" bash "benchmarks/gpu_$script.sh" $arg >"$OUT/$script/run.log" 2>&1
  echo "== $part: rc=$? in $(( $(date +%s) - start )) s"; tail -n "${TAIL:-15}" "$OUT/$script/run.log"
  mv "$OUT/$script" "$OUT/$part.tmp" && tar czf "$OUT/$part.tar.gz" -C "$OUT" "$part.tmp" && rm -rf "${OUT:?}/$part.tmp"
done
