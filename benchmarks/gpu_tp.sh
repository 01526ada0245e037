#!/usr/bin/env bash
# Issue #17 on two H200s (device kind nvidia-h200-x2), one device call of at most ~8 minutes, all under $OUT/tp:
#   GPU tests of tests/test_parallel.py (device_map across 2 GPUs per method, tensor parallel over 2 NCCL ranks);
#   TPOT at 128K on one GPU and with device_map; TPOT at 128K tensor parallel (torchrun, 2 ranks, the
#   model's config saved for from_pretrained; every weight if that fails); the longest context on one GPU and with device_map
#   in the time left (a search cut short says so in its JSON: complete=false).
# Installs this tree under /tmp and runs it with PYTHONPATH (as benchmarks/gpu_session.sh does). At most 7 files
# under $OUT/tp (a device call returns at most 8): 4 logs and 3 JSON files.
#   bash benchmarks/gpu_tp.sh           all of the above
#   bash benchmarks/gpu_tp.sh round2    the tests, then the device_map search of duo50 and duo25 alone (the one-GPU
#                                       and unpatched rows of the last full run stand): multigpu_maxctx_*_dmap.json
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/kvpress-gpu}/tp
TOTAL=${TP_TOTAL_S:-465}  # seconds this script may take in all
CKPT=/tmp/kvpress-tp-8b
mkdir -p "$OUT"
stamp() { echo "== $(date +%T) (+${SECONDS}s) $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
rm -rf /tmp/kvpress-tp "$CKPT"
pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-tp . >/tmp/kvpress-tp-install.log 2>&1 \
  || cat /tmp/kvpress-tp-install.log
export PYTHONPATH=/tmp/kvpress-tp
BENCH=benchmarks/bench_multigpu.py

stamp "tests/test_parallel.py"
timeout 150 pytest -v -p no:cacheprovider -rs -k "not gloo" tests/test_parallel.py 2>&1 | tee "$OUT/tests.log" \
  | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" | tail -24

if [ "${1:-all}" = round2 ]; then
  stamp "longest context: device_map, duo50 and duo25"
  timeout $(( TOTAL - SECONDS )) python $BENCH --parts maxctx --schemes device_map --variants duo50,duo25 --tag _dmap \
    --budget-s $(( TOTAL - SECONDS - 20 )) --out "$OUT" 2>&1 | tee "$OUT/maxctx.log" | grep -E "^maxctx .*:|tokens|Error" | tail -12
  tail -6 "$OUT/maxctx.log"; stamp done; ls "$OUT"; exit 0
fi

stamp "TPOT 128K: one GPU, device_map"
timeout 150 python $BENCH --parts tpot --out "$OUT" 2>&1 | tee "$OUT/tpot.log" | grep -v "^wrote" | tail -14

stamp "TPOT 128K: tensor parallel, 2 ranks (weights initialised at random by from_pretrained)"
tp() {
  timeout "$1" torchrun --nproc_per_node 2 $BENCH --tp --checkpoint "$CKPT" --out "$OUT" 2>&1 | tee -a "$OUT/tp.log" \
    | grep -E "^(rank|tpot)|Error" | tail -10
}
python $BENCH --save-checkpoint "$CKPT" --weights none 2>&1 | tail -1
tp 100
if ! ls "$OUT"/multigpu_tp_*.json >/dev/null 2>&1 && [ "$SECONDS" -lt 220 ]; then
  stamp "tensor parallel again, every weight saved (16 GB)"
  rm -rf "$CKPT"; timeout 150 python $BENCH --save-checkpoint "$CKPT" --weights all 2>&1 | tail -1
  tp 100
fi
rm -rf "$CKPT"

left=$(( TOTAL - SECONDS - 25 ))
stamp "longest context: one GPU, device_map (budget ${left} s)"
if [ "$left" -gt 60 ]; then
  timeout $(( left + 20 )) python $BENCH --parts maxctx --budget-s "$left" --out "$OUT" 2>&1 | tee "$OUT/maxctx.log" \
    | grep -E "^maxctx .*:|tokens|Error" | tail -12
  tail -9 "$OUT/maxctx.log"
fi
stamp "done"
ls "$OUT"
