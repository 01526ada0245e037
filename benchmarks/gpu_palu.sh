#!/usr/bin/env bash
# Palu (#13) on the H200: GPU tests of the decode kernel, its settings sweep and the speed frontier.
# Everything lands in $OUT/palu/. About 2.5 min of wall time (each step has its own timeout; the
# benchmarks write their rows as they come, so a step cut short keeps what it measured).
#   bash benchmarks/gpu_palu.sh          tests, sweep (bf16 and 4-bit latents, 128K GQA), layer frontier
#   bash benchmarks/gpu_palu.sh tpot     8B-shaped Llama: time per output token, peak memory (64K, 128K)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvpress-gpu}
R="$OUT/palu"
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$R/gpu.txt"
# The tree must be importable as installed (not from the repository root): install it unless the caller did.
if ! (cd /tmp && python -c "import kvpress.kernels.palu" >/dev/null 2>&1); then
  pip install -q --no-deps --no-build-isolation --target /tmp/kvpress-palu . >"$R/install.log" 2>&1 || tail -5 "$R/install.log"
  export PYTHONPATH=/tmp/kvpress-palu${PYTHONPATH:+:$PYTHONPATH}
fi
part=${1:-main}
start=$(date +%s)
case $part in
  main)
    timeout 45 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py 2>&1 | tee "$R/gpu_tests.log" | tail -5
    timeout 35 python benchmarks/bench_palu.py sweep --bits 16 --out "$R" > "$R/sweep.log" 2>&1; tail -3 "$R/sweep.log"
    timeout 30 python benchmarks/bench_palu.py sweep --bits 4 --tag _4bit --out "$R" > "$R/sweep_4bit.log" 2>&1; tail -3 "$R/sweep_4bit.log"
    timeout 40 python benchmarks/bench_palu.py layer --out "$R" > "$R/layer.log" 2>&1; tail -3 "$R/layer.log"
    python - "$R" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("palu_*.json")):
    rows = json.loads(f.read_text())["rows"]
    best = sorted((r for r in rows if "us" in r and r.get("variant") != "dense-sdpa"), key=lambda r: -r.get("speedup", 0))
    print(f.name, len(rows), "rows; best:", best[:2])
PY
    ;;
  tpot)
    timeout 200 python benchmarks/bench_palu.py tpot --out "$R" 2>&1 | tee "$R/tpot.log" | tail -8 ;;
  *) echo "unknown part $part (main, tpot)" ;;
esac
echo "palu $part: $(( $(date +%s) - start )) s"
