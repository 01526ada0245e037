#!/usr/bin/env bash
# The kernels under a second Triton beside the device's own (a part of gpu_round.sh; results in $OUT/triton/):
# the Triton a fresh install resolves is newer than the one the device's torch pins. The second Triton travels as
# .triton/triton.tar.xz (tools/slim_triton.sh; carried, ignored by git).
#   bash benchmarks/gpu_round.sh triton     (<= 9.5 min) kernel GPU tests under the carried Triton; the Palu layer
#                                           (64K/128K, half rank, bf16 and 4-bit) under each Triton in turn
#   bash benchmarks/gpu_round.sh triton:launch (<= 7 min) the direct launcher's and Duo decode's GPU tests under the
#                                           carried Triton; benchmarks/host_overhead.py under each Triton
#   bash benchmarks/gpu_round.sh triton:sweep  (<= 9.5 min) under the carried Triton: the Palu settings sweeps
#                                           (bench_palu.py grids triton39q / triton39b, 128K, both shapes), the layer
#                                           with their fastest
set -uo pipefail
export PYTHONUNBUFFERED=1
R=${OUT:-/tmp/kvpress-gpu}/triton
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/gpu.txt"
ALT=/tmp/triton-alt
rm -rf "$ALT" && mkdir -p "$ALT"
tar -C "$ALT" -xJf .triton/triton.tar.xz || { echo "no .triton/triton.tar.xz: carry it (tools/slim_triton.sh)"; exit 1; }
BASE=$PYTHONPATH
with_alt() { PYTHONPATH=$ALT${BASE:+:$BASE} "$@"; }
python -c "import triton; print('device triton', triton.__version__)" | tee -a "$R/gpu.txt"
with_alt python -c "import triton; print('carried triton', triton.__version__, triton.__file__)" 2>&1 | tee -a "$R/gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "the carried Triton does not import (built for another Python? tools/slim_triton.sh)"; exit 1; }

# layer TAG: bench_palu.py layer, bf16 and 4-bit latents, both shapes
layer() {
  timeout 120 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --bits 16 4 --lengths 65536 131072 \
    --tag "_$1" --out "$R" > "$R/layer_$1.log" 2>&1
  grep " | " "$R/layer_$1.log" | tail -12
}
version=$(with_alt python -c "import triton; print(triton.__version__.replace('.', ''))")
if [ "${1:-check}" = launch ]; then  # the direct launcher (kvpress/kernels/launch.py) under both
  echo "== direct-launcher and Duo decode GPU tests, Triton $version"
  with_alt timeout 150 pytest -m gpu -q -p no:cacheprovider tests/test_foundation.py tests/test_kernels.py 2>&1 \
    | tee "$R/gpu_tests_launch_triton$version.log" | tail -3
  for which in device "$version"; do
    echo "== host time per call, Triton $which"
    if [ "$which" = device ]; then run=(); else run=(with_alt); fi
    "${run[@]}" timeout 120 python benchmarks/host_overhead.py --out "$R/host_overhead_triton_$which.json" 2>&1 \
      | tee "$R/host_overhead_triton_$which.log" | tail -14
  done
  exit 0
fi
if [ "${1:-check}" = sweep ]; then
  for grid_bits in triton39q:4 triton39b:16; do
    for shape in mha gqa; do
      tag=_${grid_bits%:*}_$shape
      with_alt timeout $([ "${grid_bits#*:}" = 16 ] && echo 80 || echo 130) python benchmarks/bench_palu.py sweep --grid "${grid_bits%:*}" --bits "${grid_bits#*:}" \
        --shapes $shape --tag "$tag" --out "$R" > "$R/sweep$tag.log" 2>&1
      python - "$R"/palu_sweep${tag}_*.json <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    keys = ("num_stages", "programs_per_sm", "prefetch", "heads_per_program", "max_registers")
    print(row["shape"], row.get("bits", "dense"), *(f"{k}={row[k]}" for k in keys if k in row),
          f"{row['us']:.1f} us" if "us" in row else row.get("error", "")[:80], f"err={row.get('max_err', 0):.3g}")
PY
    done
  done
  echo "== the Palu layer, Triton $version, with the sweeps' fastest"
  with_alt timeout 100 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_triton39*_NVIDIA*.json \
    --group-sizes 1 --ratios 0.5 --bits 16 4 --tag "_triton${version}_tuned" --out "$R" > "$R/layer_tuned.log" 2>&1
  grep " | " "$R/layer_tuned.log" | tail -12
  exit 0
fi
echo "== the Palu layer, device Triton"; layer triton_device
echo "== the Palu layer, Triton $version"; with_alt layer "triton$version"
# each file on its own clock, so that one cut short still reports the others
for name_s in palu_kernels:170 kernels:60 minference_kernels:50 less_kernels:90 fused:40; do
  echo "== tests/test_${name_s%:*}.py (GPU tests), Triton $version"
  with_alt timeout "${name_s#*:}" pytest -m gpu -q -p no:cacheprovider "tests/test_${name_s%:*}.py" 2>&1 \
    | tee "$R/gpu_tests_${name_s%:*}_triton$version.log" | tail -3
done
