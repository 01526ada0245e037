#!/usr/bin/env bash
# SmolLM2 Duo quality (issue 16), for benchmarks/gpu_round.sh
export OUT=$OUT/smol
bash benchmarks/duo_mix_gpu.sh smol
