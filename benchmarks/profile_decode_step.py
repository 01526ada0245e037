"""Where the host time of an eager decode step goes: cProfile of decode steps of an 8B-shaped
model (random bf16 weights) over a cache filled to ``--tokens`` (``common.fill_cache``), for
each variant of ``bench_duo.variant``; prints the functions with the most own time.

    python benchmarks/profile_decode_step.py [--tokens 32768] [--steps 5] [--variants unpatched-flash,duo50]
"""
import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_duo as b  # noqa: E402
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default="unpatched-flash,duo50")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    model = common.build_model("cuda")
    arg = common.cache_argument(model)
    tok = torch.ones(1, 1, dtype=torch.long, device="cuda")
    for name in a.variants.split(","):
        with b.variant(model, name) as make_cache, torch.inference_mode():
            cache = make_cache()
            common.fill_cache(model, cache, a.tokens, 8192, "cuda")
            for _ in range(3):
                model(input_ids=tok, **{arg: cache}, logits_to_keep=1)
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(a.steps):
                model(input_ids=tok, **{arg: cache}, logits_to_keep=1)
            torch.cuda.synchronize()
            profiler.disable()
        print(f"=== {name}: {a.steps} decode steps at {a.tokens} tokens", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
