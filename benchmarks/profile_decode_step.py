"""Where the wall time of one eager decode step goes (CPU side): an 8B-shaped model, unpatched vs
Duo 50%, at a short context so the GPU time is small. Prints TPOT and the top CPU ops of each.

    python benchmarks/profile_decode_step.py [--tokens 8192] [--layers 32]
"""
import argparse
import contextlib
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_duo as b  # noqa: E402
import kvpress  # noqa: E402
from transformers import DynamicCache  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    model = b.build_model("cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, a.tokens), device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, frac in (("unpatched", None), ("unpatched-flash", None), ("duo50", 0.5)):
        backend = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if name == "unpatched-flash" else contextlib.nullcontext()
        if frac is not None:
            kvpress.patch(model, "duo", config=b.random_duo_config(frac))
        cache = kvpress.make_cache(model) if frac else DynamicCache(config=model.config)
        with torch.inference_mode(), backend:
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(a.steps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model(input_ids=tok, past_key_values=cache, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(3):
                out = model(input_ids=tok, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
            profiler.disable()
        print(f"{name}: TPOT median {sorted(times)[len(times) // 2] * 1e3:.2f} ms", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        if frac is not None:
            kvpress.unpatch(model)


if __name__ == "__main__":
    main()
