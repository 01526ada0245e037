#!/usr/bin/env bash
# Where the LESS step's and the Palu decode's time goes (a part of gpu_round.sh), under $OUT/profile/:
# kernel durations (torch profiler), then Nsight Compute counters of each kernel (when ncu can read them).
# With the LESS layer bench and GPU tests: bash benchmarks/gpu_round.sh profile less:tests less:layer
# The Palu decode's stalls per SASS instruction: bash benchmarks/gpu_round.sh profile:stalls (CASES=palu palu4)
set -uo pipefail
export PYTHONUNBUFFERED=1
R=${OUT:-/tmp/kvpress-gpu}/profile
mkdir -p "$R"
stamp() { echo "== $(date +%T) $*"; }
stamp durations
timeout 120 python benchmarks/profile_kernels.py --profiler --out "$R" ${CASES:+--cases $CASES} 2>&1 | grep -v "^STAGE\|USDT" | tee "$R/durations.log" | tail -30
SECTIONS="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters"
ncu_case() {  # $1: case, $2: kernel regex, $3: launches to skip, $4: launches to profile
  stamp "ncu $1"
  # shellcheck disable=SC2086
  timeout 150 ncu --clock-control none -k "regex:$2" --launch-skip "$3" --launch-count "$4" $SECTIONS \
    python benchmarks/profile_kernels.py --cases "$1" --iters 3 > "$R/ncu_$1.txt" 2>&1
  echo "rc=$?"; grep -E "Duration|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occupancy|Stall|Block Limit|Shared Memory Config|Dynamic Shared" "$R/ncu_$1.txt" | head -40
}
ncu --version | tail -1
if [ "${1:-}" = stalls ]; then  # where the Palu decode's warps wait, per SASS instruction (PC sampling), TUNED settings
  for case in ${CASES:-palu palu4}; do
    stamp "ncu stalls $case"
    timeout 240 ncu --clock-control none -k regex:_palu_decode_kernel --launch-skip 3 --launch-count 1 --set full \
      --import-source no -f -o "$R/stalls_$case" python benchmarks/profile_kernels.py --cases "$case" --iters 1 \
      > "$R/ncu_stalls_$case.log" 2>&1
    echo "rc=$?"
    ncu -i "$R/stalls_$case.ncu-rep" --page source --csv --print-source sass > "$R/sass_stalls_$case.csv" 2>&1 ||
      ncu -i "$R/stalls_$case.ncu-rep" --page source --csv > "$R/sass_stalls_$case.csv" 2>&1
    ncu -i "$R/stalls_$case.ncu-rep" --page raw --csv > "$R/raw_$case.csv" 2>&1
    ncu -i "$R/stalls_$case.ncu-rep" --page details --print-details all > "$R/details_$case.txt" 2>&1
    head -c 600 "$R/sass_stalls_$case.csv"; echo; grep -c . "$R/sass_stalls_$case.csv"
    grep -E "Duration|Registers Per|Warp Cycles Per Issued|Eligible Warps|Stall" "$R/details_$case.txt" | head -20
    rm -f "$R/stalls_$case.ncu-rep"
  done
  stamp done; exit 0
fi
if [ "${1:-}" = l2 ]; then  # where the bytes come from: DRAM and L2 throughput of the Palu decode and of dense SDPA
  for case in ${CASES:-palu-mha palu dense-mha dense}; do
    stamp "ncu l2 $case"
    timeout 150 ncu --clock-control none -k "regex:_palu_decode_kernel|flash|fmha|attention" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
      --metrics lts__t_bytes.sum.per_second,lts__t_bytes.sum.pct_of_peak_sustained_elapsed,dram__bytes_read.sum.per_second,lts__t_sectors_srcunit_tex_op_read.sum,l1tex__m_xbar2l1tex_read_bytes.sum.per_second \
      python benchmarks/profile_kernels.py --cases "$case" --iters 1 > "$R/ncu_l2_$case.txt" 2>&1
    echo "rc=$?"; grep -E "Duration|Throughput|Busy|Bandwidth|Hit Rate|lts__|dram__|l1tex__|Registers Per|Shared Memory Config|Achieved Occ" "$R/ncu_l2_$case.txt" | head -30
  done
  stamp done; exit 0
fi
ncu_case less "_step_kernel|_finish_kernel" 6 2
ncu_case palu "_palu_decode_kernel" 3 1
ncu_case palu4 "_palu_decode_kernel" 3 1
stamp done
