#!/usr/bin/env bash
# Palu (#13) on the H200: GPU tests of the decode kernel, its settings sweep and the speed frontier.
# Everything lands in $OUT/palu/. About 2.5 min of wall time (each step has its own timeout; the
# benchmarks write their rows as they come, so a step cut short keeps what it measured).
#   bash benchmarks/gpu_palu.sh          tests, sweep (bf16 and 4-bit latents, 128K GQA), layer
#                                        frontier, SmolLM2 quality (when the model is on the machine)
#   bash benchmarks/gpu_palu.sh round3   (<= 60 s) the sweep's follow-up: hand prefetch, more programs per SM; one layer
#   bash benchmarks/gpu_palu.sh round4   (<= 4 min) GPU tests, sweep of the round4 grid (bf16, 4-bit), layer at 64K/128K with its best
#   (rounds 5-9 and 14 timed options since removed, the two-pass decode and a softmax state per warp; their recipes
#   are in the history of this file)
#   bash benchmarks/gpu_palu.sh smollm2  SmolLM2 quality (groups of all 3 KV heads) at 50% (unpatched, plain SVD,
#                                        whitening + Fisher, 4/3 bits), 60% and 75%, and groups of one head at 50%
#   bash benchmarks/gpu_palu.sh smollm2-sweep  SmolLM2 perplexity over calibration choices (64 x 2048 tokens)
#   bash benchmarks/gpu_palu.sh needle   needle-llama quality over group sizes x kept ranks (the frontier's quality side)
#   bash benchmarks/gpu_palu.sh round11  (<= 8 min) GPU tests, layer before (OLD=path of a tree with the previous
#                                        kernel) and after, round11 sweep
#   bash benchmarks/gpu_palu.sh round12  (<= 9 min) GPU tests, round12 sweep (GQA, MHA), layer with its fastest
#   bash benchmarks/gpu_palu.sh round13  (<= 8 min) GPU tests, layer and graph decode per token with TUNED
#   bash benchmarks/gpu_palu.sh round15  (<= 9 min) GPU tests, layer before (OLD) and after, round15 sweep, stall profile
#   bash benchmarks/gpu_palu.sh round16  (<= 8 min) GPU tests, round16 sweep and layer with the rope rows per slot
#   bash benchmarks/gpu_palu.sh round17  (<= 9 min) every Palu GPU test, layer, graph decode per token, stall profile
#   bash benchmarks/gpu_palu.sh round18  (<= 4 min) kernel GPU tests, layer at 128K before (OLD) and after (bf16)
#   bash benchmarks/gpu_palu.sh round20  (<= 8 min) GPU tests, round20 sweep (one softmax reference per program), layer
#   bash benchmarks/gpu_palu.sh round21  (<= 9 min) every Palu GPU test, layer, graph decode per token (TUNED as of round 20)
#   bash benchmarks/gpu_palu.sh round22  (<= 9 min) every Palu GPU test, layer before (OLD) and after, graph decode per token
#   bash benchmarks/gpu_palu.sh round23  (<= 11 min) the whole GPU suite, graph decode per token
#   bash benchmarks/gpu_palu.sh round24  (<= 5 min) every Palu GPU test, layer
#   bash benchmarks/gpu_palu.sh round25  (<= 8 min) round25 sweep (split counts), also with the tree in EXP; 2/3-bit layer
#   bash benchmarks/gpu_palu.sh round27  (<= 6 min) round27 sweep: settings for 2- and 3-bit latents
#   bash benchmarks/gpu_palu.sh round28  (<= 5 min) every Palu GPU test, the 2/3-bit layer (TUNED as of round 27)
#   bash benchmarks/gpu_palu.sh round31  (<= 3 min) kernel GPU tests at real shapes, the 4-bit layer
#   bash benchmarks/gpu_palu.sh round32  (<= 9 min) every Palu GPU test, layer (16/4/2/3 bits), graph decode per token
#   bash benchmarks/gpu_palu.sh round33  (<= 10 min) round33 sweep (quantised settings), the kernels of a graph decode step
#   bash benchmarks/gpu_palu.sh round34  (<= 9 min) Palu / fused / graph GPU tests, graph decode per token with its kernels
#   bash benchmarks/gpu_palu.sh round36  (<= 9 min) Palu / graph GPU tests, graph decode per token with its kernels
#   bash benchmarks/gpu_palu.sh round38  (<= 9 min) every Palu GPU test, layer (16/4/2/3 bits), 2-bit graph decode per token
#   bash benchmarks/gpu_palu.sh round37  (<= 10 min) round37 sweep (two KV heads per program), layer with its fastest, kernel GPU tests
#   bash benchmarks/gpu_palu.sh round40  (<= 9 min) every Palu GPU test, 3-bit sweep (round37 grid), layer (16/4/3/2 bits)
#                                        with 3-bit codes in two planes
#   bash benchmarks/gpu_palu.sh round41  (<= 4 min) 3-bit graph decode per token at 64K/128K (TUNED as of round 40)
#   bash benchmarks/gpu_palu.sh round42  (<= 7 min) kernel GPU tests, round42 sweep (only the words a block ahead), layer
#   bash benchmarks/gpu_palu.sh round43  (<= 4 min) runtime and quantisation GPU tests, 4-bit graph decode per token
#   bash benchmarks/gpu_palu.sh round44  (<= 9 min) every Palu GPU test, round44 sweeps (MHA: the query folded into the
#                                        up rows; bf16 and 4/3/2 bits), layer (16/4/3/2 bits) with their fastest
#   bash benchmarks/gpu_palu.sh round45  (<= 4 min) round45 sweep (bf16 MHA, folded query: two KV heads per program,
#                                        128-token tiles), the layer (16/4/3/2 bits) with its fastest
#   bash benchmarks/gpu_palu.sh round46  (<= 7 min) every Palu GPU test, round46 sweep (bf16 MHA), layer (16/4/3/2 bits)
#   bash benchmarks/gpu_palu.sh round50  (<= 9 min) the layer (16/4/3/2 bits) timed without and with graph_time's warm-up,
#                                        the SM clock sampled meanwhile; every Palu GPU test
#   bash benchmarks/gpu_palu.sh launch   (<= 3.5 min) the decode kernel's direct launches: GPU tests, host time per call
#   bash benchmarks/gpu_palu.sh round51  (<= 5 min) MHA (bf16, 4-bit) in four layer runs, each with fresh cases
#   bash benchmarks/gpu_palu.sh tests    the GPU tests (kernel and runtime)
#   bash benchmarks/gpu_palu.sh graph-probe  where graph decode and eager decode part (benchmarks/palu_graph_probe.py)
#   bash benchmarks/gpu_palu.sh layer    (TAG=_r19) the layer at 64K/128K, half rank (bf16, 4-bit; GQA, MHA)
#   bash benchmarks/gpu_palu.sh tpot     8B-shaped Llama: time per output token, peak memory (64K, 128K)
#                                        (VARIANTS="dense-graph palu-50-4bit-graph" TAG=_r15: some variants, tagged)
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

# layer_before_after TAG [bench_palu.py layer options...]: the layer with the tree in $OLD (when set) and with this one,
# in the same run (half rank, groups of one KV head), as palu_layer_<TAG>_{before,after}_<GPU>.json
layer_before_after() {
  local tag=$1 tree; shift
  for tree in ${OLD:+before} after; do
    PYTHONPATH=$([ $tree = before ] && echo "$OLD" || echo "$PYTHONPATH") timeout 100 python benchmarks/bench_palu.py layer \
      --group-sizes 1 --ratios 0.5 "$@" --tag "_${tag}_$tree" --out "$R" > "$R/layer_${tag}_$tree.log" 2>&1
    grep " | " "$R/layer_${tag}_$tree.log" | tail -8
  done
}
case $part in
  main)
    timeout 35 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py 2>&1 | tee "$R/gpu_tests.log" | tail -5
    timeout 28 python benchmarks/bench_palu.py sweep --bits 16 --out "$R" > "$R/sweep.log" 2>&1; tail -2 "$R/sweep.log"
    timeout 22 python benchmarks/bench_palu.py sweep --bits 4 --tag _4bit --out "$R" > "$R/sweep_4bit.log" 2>&1; tail -2 "$R/sweep_4bit.log"
    timeout 25 python benchmarks/bench_palu.py layer --out "$R" > "$R/layer.log" 2>&1; tail -2 "$R/layer.log"
    bash "$0" smollm2
    python - "$R" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("palu_*.json")):
    rows = json.loads(f.read_text())["rows"]
    best = sorted((r for r in rows if "speedup" in r and r.get("variant") != "dense-sdpa"), key=lambda r: -r["speedup"])
    print(f.name, len(rows), "rows; best:", best[:2])
PY
    ;;
  round3)  # <= 60 s: the settings the first sweep pointed to, with and without the hand prefetch (each checked
           # against the reference), then one layer at 128K with the fastest of them (GQA and MHA, bf16 and 4-bit)
    timeout 38 python benchmarks/bench_palu.py sweep --grid round3 --bits 16 4 --tag _r3 --out "$R" > "$R/sweep_r3.log" 2>&1
    tail -1 "$R/sweep_r3.log"
    timeout 20 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r3_*.json --group-sizes 1 --ratios 0.5 \
      --lengths 131072 --tag _r3 --out "$R" > "$R/layer_r3.log" 2>&1
    grep "kernel settings\| | " "$R/layer_r3.log" | tail -8 ;;
  round4)
    timeout 90 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 | tee "$R/gpu_tests.log" | tail -5
    timeout 170 python benchmarks/bench_palu.py sweep --grid round4 --bits 16 4 --tag _r4 --out "$R" > "$R/sweep_r4.log" 2>&1
    tail -1 "$R/sweep_r4.log"
    timeout 60 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r4_*.json --group-sizes 1 --ratios 0.5 \
      --lengths 65536 131072 --tag _r4 --out "$R" > "$R/layer_r4.log" 2>&1
    grep "kernel settings\| | " "$R/layer_r4.log" | tail -12 ;;
  round11)  # GPU tests; the layer at 64K/128K before (OLD: a tree installed with the previous kernel) and after the
            # change, in the same run; the round11 sweep (GQA bf16 and 4-bit, 128K)
    timeout 150 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 | tee "$R/gpu_tests.log" | tail -5
    if [ -n "${OLD:-}" ]; then
      PYTHONPATH=$OLD timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --lengths 65536 131072 \
        --tag _r11_before --out "$R" > "$R/layer_r11_before.log" 2>&1
      grep " | " "$R/layer_r11_before.log" | tail -8
    fi
    timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --lengths 65536 131072 \
      --tag _r11 --out "$R" > "$R/layer_r11.log" 2>&1
    grep " | " "$R/layer_r11.log" | tail -8
    timeout 100 python benchmarks/bench_palu.py sweep --grid round11 --bits 16 4 --tag _r11 --out "$R" > "$R/sweep_r11.log" 2>&1
    tail -1 "$R/sweep_r11.log" ;;
  round15)  # GPU tests; the layer at 64K/128K before (OLD: a tree installed with the previous kernel) and after; the
            # round15 sweep (GQA and MHA, bf16, 128K); where the decode's warps wait now (ncu, the stalls part of gpu_profile.sh)
    timeout 150 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 | tee "$R/gpu_tests.log" | tail -5
    layer_before_after r15 --lengths 65536 131072
    for shape in gqa mha; do
      tag=_r15$([ $shape = mha ] && echo _mha)
      timeout 100 python benchmarks/bench_palu.py sweep --grid round15 --bits 16 --shapes $shape --tag "$tag" --out "$R" \
        > "$R/sweep$tag.log" 2>&1
      tail -1 "$R/sweep$tag.log"
    done
    OUT=$R CASES=palu timeout 120 bash benchmarks/gpu_profile.sh stalls 2>&1 | tail -25 ;;
  round17)  # the rope rows per slot in the runtime and TUNED: every Palu GPU test, the layer at 64K/128K, graph decode
            # per token at 64K/128K, where the decode's warps wait now
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/ -k "palu or Palu" 2>&1 | tee "$R/gpu_tests.log" | tail -5
    timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --lengths 65536 131072 \
      --tag _r17 --out "$R" > "$R/layer_r17.log" 2>&1
    grep " | " "$R/layer_r17.log" | tail -8
    timeout 200 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph --tag _r17 \
      --out "$R" 2>&1 | tee "$R/tpot_r17.log" | grep -v "^{" | tail -4
    OUT=$R CASES=palu timeout 100 bash benchmarks/gpu_profile.sh stalls 2>&1 | grep -E "Duration|Stall (Long|Short|Wait|Barrier)" ;;
  round18)  # the keys rebuilt by one MMA chain of the whole head (then split in halves): GPU tests of the kernel, the layer
            # at 128K with bf16 latents before (OLD: the previous tree) and after, in the same run
    timeout 150 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py 2>&1 | tee "$R/gpu_tests.log" | tail -3
    layer_before_after r18 --bits 16 --lengths 131072 ;;
  round21)  # one softmax reference per program in TUNED and the merge as a dependent launch: every Palu GPU test, the
            # layer at 64K/128K, graph decode per token at 64K/128K
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/ -k "palu or Palu" 2>&1 | tee "$R/gpu_tests.log" | tail -3
    timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --lengths 65536 131072 \
      --tag _r21 --out "$R" > "$R/layer_r21.log" 2>&1
    grep " | " "$R/layer_r21.log" | tail -8
    timeout 200 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph --tag _r21 \
      --out "$R" 2>&1 | tee "$R/tpot_r21.log" | grep -v "^{" | tail -4 ;;
  round22)  # loads of whole token tiles without masks (WHOLE_BLOCKS): every Palu GPU test, the layer at 64K/128K before
            # (OLD: the previous tree) and after in the same run, graph decode per token at 64K/128K
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/ -k "palu or Palu" 2>&1 | tee "$R/gpu_tests.log" | tail -3
    layer_before_after r22 --lengths 65536 131072
    timeout 200 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph --tag _r22 \
      --out "$R" 2>&1 | tee "$R/tpot_r22.log" | grep -v "^{" | tail -4 ;;
  round23)  # the new tokens' quantisation in one launch: every GPU test of the project (the whole suite), graph decode
            # per token at 64K/128K
    timeout 420 pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$R/gpu_tests_all.log" | tail -3
    timeout 200 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph --tag _r23 \
      --out "$R" 2>&1 | tee "$R/tpot_r23.log" | grep -v "^{" | tail -4 ;;
  round24)  # every Palu GPU test (the quantisation bit for bit on the GPU), the layer at 64K/128K (run on a tree with the
            # two softmax branches of the decode kernel merged into one: reverted after, its 4-bit layer was 4% slower)
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --lengths 65536 131072 \
      --tag _r24 --out "$R" > "$R/layer_r24.log" 2>&1
    grep " | " "$R/layer_r24.log" | tail -8 ;;
  round25)  # the round25 sweep (split counts, four stages; bf16, GQA and MHA, 128K), also with the tree in $EXP (when
            # set); the layer with 2- and 3-bit latents at 64K/128K
    for shape in gqa mha; do
      tag=_r25$([ $shape = mha ] && echo _mha)
      for tree in now ${EXP:+exp}; do
        PYTHONPATH=$([ $tree = exp ] && echo "$EXP" || echo "$PYTHONPATH") timeout 150 python benchmarks/bench_palu.py sweep \
          --grid round25 --bits 16 --shapes $shape --tag "$tag$([ $tree = exp ] && echo _exp)" --out "$R" > "$R/sweep${tag}_$tree.log" 2>&1
        tail -1 "$R/sweep${tag}_$tree.log"
      done
    done
    timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --bits 3 2 --lengths 65536 131072 \
      --tag _r25_bits --out "$R" > "$R/layer_r25_bits.log" 2>&1
    grep " | " "$R/layer_r25_bits.log" | tail -8 ;;
  round27)  # 2- and 3-bit latents: the round27 sweep (GQA and MHA, 128K)
    for shape in gqa mha; do
      tag=_r27$([ $shape = mha ] && echo _mha)
      timeout 200 python benchmarks/bench_palu.py sweep --grid round27 --bits 3 2 --shapes $shape --tag "$tag" --out "$R" \
        > "$R/sweep$tag.log" 2>&1
      tail -1 "$R/sweep$tag.log"
    done ;;
  round28)  # 2 and 3 bits with the 4-bit setting in TUNED: every Palu GPU test, the 2/3-bit layer at 64K/128K
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --bits 3 2 --lengths 65536 131072 \
      --tag _r28_bits --out "$R" > "$R/layer_r28_bits.log" 2>&1
    grep " | " "$R/layer_r28_bits.log" | tail -8 ;;
  round31)  # 4-bit codes straight to bf16/fp16 (the mantissa of 2^7 / 2^10 and an FMA): the kernel's GPU tests at
            # real shapes, the 4-bit layer at 64K/128K
    timeout 120 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py -k decode_kernel_gpu 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    timeout 60 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --bits 4 --lengths 65536 131072 \
      --tag _r31 --out "$R" > "$R/layer_r31.log" 2>&1
    grep " | " "$R/layer_r31.log" | tail -8 ;;
  round32)  # neighbouring channels 16 bits apart in the words (2- and 4-bit codes made in pairs): every Palu GPU test,
            # the layer at 64K/128K (bf16, 4, 2, 3 bits), graph decode per token at 64K/128K
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    timeout 150 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --bits 16 4 2 3 \
      --lengths 65536 131072 --tag _r32 --out "$R" > "$R/layer_r32.log" 2>&1
    grep " | " "$R/layer_r32.log" | tail -20
    timeout 200 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph \
      palu-50-2bit-graph --tag _r32 --out "$R" 2>&1 | tee "$R/tpot_r32.log" | grep -v "^{" | tail -6 ;;
  round33)  # the quantised settings again (round33 sweep: 4 and 2 bits on the 8B shape, 4 bits MHA, 128K); the kernels of
            # a graph decode step at 64K (dense and Palu-50%)
    for spec in "gqa 4 2" "mha 4"; do
      set -- $spec; shape=$1; shift
      tag=_r33$([ "$shape" = mha ] && echo _mha)
      timeout 220 python benchmarks/bench_palu.py sweep --grid round33 --bits "$@" --shapes "$shape" --tag "$tag" \
        --out "$R" > "$R/sweep$tag.log" 2>&1
      tail -1 "$R/sweep$tag.log"
    done
    timeout 150 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph --lengths 65536 --kernels \
      --tag _r33_kernels --out "$R" 2>&1 | tee "$R/tpot_r33.log" | grep -v "^{" | tail -4 ;;
  round34)  # the decode step's glue (one GEMM for both latents, the queries' RoPE in one kernel, the slot once per step):
            # every Palu and fused-op GPU test, graph decode per token with its kernels at 64K/128K
    timeout 240 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py tests/test_fused.py \
      tests/test_graph.py 2>&1 | tee "$R/gpu_tests.log" | tail -3
    timeout 300 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph \
      palu-50-2bit-graph --kernels --tag _r34 --out "$R" 2>&1 | tee "$R/tpot_r34.log" | grep -v "^{" | tail -4 ;;
  round36)  # the query projection in the latents' GEMM (q_proj's weight a view of it): Palu / graph GPU tests, graph
            # decode per token with its kernels at 64K/128K
    timeout 240 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py tests/test_graph.py \
      2>&1 | tee "$R/gpu_tests.log" | tail -3
    timeout 300 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph \
      --kernels --tag _r36 --out "$R" 2>&1 | tee "$R/tpot_r36.log" | grep -v "^{" | tail -4 ;;
  round37)  # two KV heads per program: the round37 sweep (MHA first, then GQA; bf16 and 4-bit, 128K), the layer at
            # 64K/128K with its fastest, then the kernel's GPU tests
    for shape in mha gqa; do
      tag=_r37$([ $shape = mha ] && echo _mha)
      timeout 190 python benchmarks/bench_palu.py sweep --grid round37 --bits 16 4 --shapes $shape --tag "$tag" --out "$R" \
        > "$R/sweep$tag.log" 2>&1
      tail -1 "$R/sweep$tag.log"
    done
    timeout 100 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r37*_NVIDIA*.json --group-sizes 1 --ratios 0.5 \
      --lengths 65536 131072 --tag _r37 --out "$R" > "$R/layer_r37.log" 2>&1
    grep "kernel settings\| | " "$R/layer_r37.log" | tail -12
    timeout 90 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py 2>&1 | tee "$R/gpu_tests.log" | tail -5 ;;
  round38)  # two KV heads per program for 4-bit MHA in TUNED, the shared-memory estimate: every Palu GPU test, the layer
            # at 64K/128K (bf16, 4, 2, 3 bits), graph decode per token with 2-bit latents at 64K/128K
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    timeout 150 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --bits 16 4 2 3 \
      --lengths 65536 131072 --tag _r38 --out "$R" > "$R/layer_r38.log" 2>&1
    grep " | " "$R/layer_r38.log" | tail -20
    timeout 150 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-2bit-graph --tag _r38 --out "$R" 2>&1 \
      | tee "$R/tpot_r38.log" | grep -v "^{" | tail -4 ;;
  round40)  # 3-bit codes as a 2-bit and a 1-bit plane (split word by word): every Palu GPU test, the layer at 64K/128K
            # (bf16, 4, 3, 2 bits)
    timeout 220 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    for shape in mha gqa; do  # 3 bits over the round37 grid (the bf16 and quantised settings, two heads per program)
      tag=_r40_3bit$([ $shape = mha ] && echo _mha)
      timeout 80 python benchmarks/bench_palu.py sweep --grid round37 --bits 3 --shapes $shape --tag "$tag" --out "$R" \
        > "$R/sweep$tag.log" 2>&1
      tail -1 "$R/sweep$tag.log"
    done
    timeout 150 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r40_3bit*_NVIDIA*.json --group-sizes 1 \
      --ratios 0.5 --bits 16 4 3 2 --lengths 65536 131072 --tag _r40 --out "$R" > "$R/layer_r40.log" 2>&1
    grep " | " "$R/layer_r40.log" | tail -20 ;;
  round41)  # 3-bit settings in TUNED: graph decode per token with 3-bit latents (and dense) at 64K/128K
    timeout 200 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-3bit-graph --tag _r41 --out "$R" 2>&1 \
      | tee "$R/tpot_r41.log" | grep -v "^{" | tail -4 ;;
  round42)  # only the quantised words a block ahead (PREFETCH_ROWS=False): the round42 sweep (MHA, GQA; 4, 3, 2 bits,
            # 128K), the layer at 64K/128K with its fastest, the kernel's GPU tests
    timeout 100 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py 2>&1 | tee "$R/gpu_tests.log" | tail -3
    for shape in mha gqa; do
      tag=_r42$([ $shape = mha ] && echo _mha)
      timeout 110 python benchmarks/bench_palu.py sweep --grid round42 --bits 4 3 2 --shapes $shape --tag "$tag" --out "$R" \
        > "$R/sweep$tag.log" 2>&1
      tail -1 "$R/sweep$tag.log"
    done
    timeout 100 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r42*_NVIDIA*.json --group-sizes 1 --ratios 0.5 \
      --bits 16 4 3 2 --lengths 65536 131072 --tag _r42 --out "$R" > "$R/layer_r42.log" 2>&1
    grep "kernel settings\| | " "$R/layer_r42.log" | tail -20 ;;
  round43)  # a static step's quantised token written at its slot by the quantisation launch: the runtime's GPU tests and
            # the quantisation kernel's, then graph decode per token with 4-bit latents (and dense) at 64K/128K
    timeout 100 pytest -m gpu -q -p no:cacheprovider tests/test_palu.py tests/test_palu_kernels.py -k "not decode_kernel" \
      2>&1 | tee "$R/gpu_tests.log" | tail -3
    timeout 120 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-4bit-graph --tag _r43 --out "$R" 2>&1 \
      | tee "$R/tpot_r43.log" | grep -v "^{" | tail -4 ;;
  round44)  # MHA with the query folded into the up rows (FOLD_QUERY): every Palu GPU test, the round44 sweeps (MHA, 128K;
            # bf16, then 4/3/2 bits), the layer at 64K/128K with their fastest
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    timeout 60 python benchmarks/bench_palu.py sweep --grid round44 --bits 16 --shapes mha --tag _r44_mha --out "$R" \
      > "$R/sweep_r44_mha.log" 2>&1
    tail -1 "$R/sweep_r44_mha.log"
    timeout 110 python benchmarks/bench_palu.py sweep --grid round44q --bits 4 3 2 --shapes mha --tag _r44q_mha --out "$R" \
      > "$R/sweep_r44q_mha.log" 2>&1
    tail -1 "$R/sweep_r44q_mha.log"
    timeout 100 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r44*_NVIDIA*.json --group-sizes 1 --ratios 0.5 \
      --bits 16 4 3 2 --lengths 65536 131072 --tag _r44 --out "$R" > "$R/layer_r44.log" 2>&1
    grep "kernel settings\| | " "$R/layer_r44.log" | tail -20 ;;
  round45)  # bf16 MHA with the query folded: two KV heads per program, 128-token tiles (the round45 sweep, 128K), the
            # layer at 64K/128K (bf16 with the sweep's fastest, 4/3/2 bits as tuned)
    timeout 100 python benchmarks/bench_palu.py sweep --grid round45 --bits 16 --shapes mha --tag _r45_mha --out "$R" \
      > "$R/sweep_r45_mha.log" 2>&1
    tail -1 "$R/sweep_r45_mha.log"
    timeout 110 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r45*_NVIDIA*.json --group-sizes 1 --ratios 0.5 \
      --bits 16 4 3 2 --lengths 65536 131072 --tag _r45 --out "$R" > "$R/layer_r45.log" 2>&1
    grep "kernel settings\| | " "$R/layer_r45.log" | tail -20 ;;
  round46)  # the masks as unsigned comparisons, the scale in the folded query: every Palu GPU test, the round46 sweep
            # (bf16 MHA, 128K), the layer at 64K/128K (bf16 MHA with the sweep's fastest)
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3
    timeout 60 python benchmarks/bench_palu.py sweep --grid round46 --bits 16 --shapes mha --tag _r46_mha --out "$R" \
      > "$R/sweep_r46_mha.log" 2>&1
    tail -1 "$R/sweep_r46_mha.log"
    timeout 110 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep_r46*_NVIDIA*.json --group-sizes 1 --ratios 0.5 \
      --bits 16 4 3 2 --lengths 65536 131072 --tag _r46 --out "$R" > "$R/layer_r46.log" 2>&1
    grep "kernel settings\| | " "$R/layer_r46.log" | tail -20 ;;
  round50)  # the layer (16/4/3/2 bits, 64K/128K) timed without and with the 50 ms warm-up of common.graph_time (rounds
            # 47-49: the first timing after an idle spell up to 9% slow), the SM clock sampled meanwhile; GPU tests
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 250 > "$R/clocks_r50.csv" &
    sampler=$!
    for w in 0 0.05; do
      tag=_r50$([ $w = 0 ] && echo _cold)
      GRAPH_WARMUP_S=$w timeout 150 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --bits 16 4 3 2 \
        --lengths 65536 131072 --tag "$tag" --out "$R" > "$R/layer$tag.log" 2>&1
      grep " | " "$R/layer$tag.log" | tail -20
    done
    kill $sampler
    timeout 230 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 \
      | tee "$R/gpu_tests.log" | tail -3 ;;
  launch)  # the decode kernel through the direct launcher (kernels/launch.py): its GPU test, the measured settings and
            # graph decode; host time per call (benchmarks/host_overhead.py)
    timeout 120 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py \
      -k "directly or (decode_kernel_gpu and tuned) or graph_decode" 2>&1 | tee "$R/gpu_tests_launch.log" | tail -4
    timeout 90 python benchmarks/host_overhead.py --out "$R/host_overhead.json" 2>&1 | tee "$R/host_overhead.log" | tail -18 ;;
  round51)  # MHA (bf16, 4-bit) at 64K/128K in four layer runs, each with its own freshly allocated cases (the spread
            # between cases and runs: round 50's bf16 MHA took 269.5 us cold and 283.0 warm, each once)
    for i in 1 2 3 4; do
      timeout 80 python benchmarks/bench_palu.py layer --shapes mha --group-sizes 1 --ratios 0.5 --bits 16 4 \
        --lengths 65536 131072 --tag "_r51_$i" --out "$R" > "$R/layer_r51_$i.log" 2>&1
      grep " | " "$R/layer_r51_$i.log" | tail -6
    done ;;
  round12|round16|round20)  # GPU tests; that round's sweep (GQA and MHA, bf16 and 4-bit, 128K); the layer at
            # 64K/128K with its fastest (round16: rope rows per slot; round20: one softmax reference per program)
    t=_r${part#round}
    timeout 150 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 | tee "$R/gpu_tests.log" | tail -5
    for shape in gqa mha; do
      tag=$t$([ $shape = mha ] && echo _mha)
      timeout 150 python benchmarks/bench_palu.py sweep --grid "$part" --bits 16 4 --shapes $shape --tag "$tag" --out "$R" \
        > "$R/sweep$tag.log" 2>&1
      tail -1 "$R/sweep$tag.log"
    done
    timeout 100 python benchmarks/bench_palu.py layer --tuning "$R"/palu_sweep${t}*_NVIDIA*.json --group-sizes 1 --ratios 0.5 \
      --lengths 65536 131072 --tag "$t" --out "$R" > "$R/layer$t.log" 2>&1
    grep "kernel settings\| | " "$R/layer$t.log" | tail -12 ;;
  round13)  # the settings of round 12 in TUNED: GPU tests, the layer at 64K/128K, graph decode per token at 64K/128K
    timeout 150 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 | tee "$R/gpu_tests.log" | tail -5
    timeout 100 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --lengths 65536 131072 \
      --tag _r13 --out "$R" > "$R/layer_r13.log" 2>&1
    grep " | " "$R/layer_r13.log" | tail -8
    timeout 240 python benchmarks/bench_palu.py tpot --variants dense-graph palu-50-graph palu-50-4bit-graph --tag _r13 \
      --out "$R" 2>&1 | tee "$R/tpot_r13.log" | tail -8 ;;
  smollm2|smollm2-sweep)  # quality on SmolLM2-135M-Instruct at 50% kept rank (needs the converted model, see gpu_round.sh)
    SMOL=$(bash benchmarks/gpu_smol_model.sh)
    if [ -n "$SMOL" ]; then
      if [ "$part" = smollm2-sweep ]; then
        timeout 240 python benchmarks/palu_quality.py --model $SMOL --device cuda --sweep --group-size 3 --multiple 16 \
          --calib-samples 64 --calib-len 2048 --sweep-snapshots 4,16 --ppl-tokens 65536 --ppl-context 2048 \
          --out "$R/palu_quality_smollm2_sweep_gpu.json" > "$R/smollm2_sweep.log" 2>&1; tail -3 "$R/smollm2_sweep.log"
      else
        timeout 240 python benchmarks/palu_quality.py --model $SMOL --device cuda --chat --group-size 3 --ratio 0.5 \
          --frontier 3:0.6,3:0.75,1:0.5 --multiple 16 --tasks ppl,passkey,people --lengths 1024,2048 --depths 5 --samples 4 \
          --ppl-tokens 65536 --ppl-context 2048 --calib-samples 32 --calib-len 2048 \
          --out "$R/palu_quality_smollm2_gpu.json" > "$R/smollm2.log" 2>&1
        grep "^| \|calibrated" "$R/smollm2.log" || tail -3 "$R/smollm2.log"
      fi
    else
      echo "SmolLM2 not here: quality skipped"
    fi ;;
  needle)  # the quality side of the frontier on needle-llama: group sizes 1/2/4 x kept ranks 25/50/75%
    timeout 60 python benchmarks/palu_quality.py --device cuda --group-size 1 --ratio 0.5 \
      --frontier 1:0.25,1:0.75,2:0.25,2:0.5,2:0.75,4:0.25,4:0.5,4:0.75 --multiple 8 --lengths 1024,2048 --depths 5 \
      --samples 2 --out "$R/palu_quality_needle_frontier.json" > "$R/needle.log" 2>&1
    grep "^| \|calibrated" "$R/needle.log" || tail -3 "$R/needle.log" ;;
  tests)
    timeout 200 pytest -m gpu -q -p no:cacheprovider tests/test_palu_kernels.py tests/test_palu.py 2>&1 | tee "$R/gpu_tests.log" | tail -5 ;;
  graph-probe)  # where graph decode and eager decode part (the GPU test test_gpu_graph_decode_equals_eager)
    timeout 150 python benchmarks/palu_graph_probe.py --out "$R" > "$R/graph_probe.log" 2>&1; grep "^{" "$R/graph_probe.log" || tail -20 "$R/graph_probe.log" ;;
  layer)  # the layer at 64K/128K, half rank, groups of one KV head, bf16 and 4-bit, GQA and MHA (TAG: the JSON's tag)
    timeout 150 python benchmarks/bench_palu.py layer --group-sizes 1 --ratios 0.5 --lengths 65536 131072 \
      ${TAG:+--tag $TAG} --out "$R" > "$R/layer${TAG:-}.log" 2>&1
    grep " | " "$R/layer${TAG:-}.log" | tail -12 ;;
  tpot)  # VARIANTS / TAG: bench_palu.py tpot's --variants / --tag
    # shellcheck disable=SC2086
    timeout 200 python benchmarks/bench_palu.py tpot ${VARIANTS:+--variants $VARIANTS} ${TAG:+--tag $TAG} --out "$R" 2>&1 \
      | tee "$R/tpot${TAG:-}.log" | tail -8 ;;
  *) echo "unknown part $part (main, round3, round4, round11, round12, round13, round15, round16, round17, round18, round20, round21, round22, round23, round24, round25, round27, round28, round31, round32, round33, round34, round36, round37, round38, layer, tests, smollm2, smollm2-sweep, needle, graph-probe, tpot)" ;;
esac
echo "palu $part: $(( $(date +%s) - start )) s"
