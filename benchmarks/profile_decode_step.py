"""Where the wall time of an eager decode step goes (CPU side): an 8B-shaped model (random bf16
weights) at a short context, so the GPU time is small, for the variants of ``bench_duo.variant``.
Prints the time per output token and a cProfile of three decode steps of each.

    python benchmarks/profile_decode_step.py [--tokens 8192] [--steps 20]
"""
import argparse
import cProfile
import pstats
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_duo as b  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    model = b.build_model("cuda")
    for name in ("unpatched", "unpatched-flash", "duo50"):
        with b.variant(model, name) as make_cache:
            _, tpot, *_ = b.run_context(model, a.tokens, a.tokens, a.steps, "cuda", make_cache)
            cache = make_cache()
            with torch.inference_mode():
                tok = model(input_ids=torch.ones(1, a.tokens, dtype=torch.long, device="cuda"), past_key_values=cache,
                            logits_to_keep=1).logits.argmax(-1)
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(3):
                    tok = model(input_ids=tok, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
                torch.cuda.synchronize()
                profiler.disable()
        print(f"{name}: TPOT median {tpot * 1e3:.2f} ms", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
