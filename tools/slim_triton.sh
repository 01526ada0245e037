#!/usr/bin/env bash
# A Triton for the device (sm_90 only) small enough to travel in one device call: the wheel of the Triton installed
# here, for the device's Python, without the AMD code generator, CUPTI, Proton, the pre-Hopper ptxas and nvdisasm,
# its libtriton stripped of the symbols it does not export (~50 MiB as .tar.xz instead of ~1 GB installed). The
# device's torch pins an older Triton; `benchmarks/gpu_triton.sh` runs the kernels under this one beside it.
#   bash tools/slim_triton.sh [PYTHON_VERSION [OUT.tar.xz]]   (default 3.12, .triton/triton.tar.xz; ~3 min)
set -euo pipefail
py=${1:-3.12}
out=$(realpath -m "${2:-.triton/triton.tar.xz}")
version=$(python -c "import triton; print(triton.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download -q "triton==$version" --no-deps --only-binary=:all: --python-version "$py" \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$work/wheel"
python -m zipfile -e "$work"/wheel/triton-*.whl "$work/unpacked"
mv "$work/unpacked/triton" "$work/triton"
cd "$work/triton"
# The AMD backend's Python stays: Triton discovers its backends from the installed entry points.
rm -rf backends/amd/lib instrumentation plugins FileCheck _C/libproton.so backends/nvidia/lib/cupti* \
  backends/nvidia/bin/ptxas backends/nvidia/bin/nvdisasm
find . -name __pycache__ -prune -exec rm -rf {} +
strip --strip-unneeded _C/libtriton.so
chmod +x backends/nvidia/bin/*
mkdir -p "$(dirname "$out")"
tar -C "$work" -cf - triton | xz -T0 -9 > "$out"
echo "triton $version for Python $py: $(du -h "$out")"
