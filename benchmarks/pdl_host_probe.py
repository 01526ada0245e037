"""Host cost of launching the decode merge kernel with programmatic dependent launch (PDL) in
eager mode: wall time of a decode step of an 8B-shaped model (random bf16 weights, Duo 50%) over
a cache filled to 32K tokens, with the merge launched with PDL, without, and skipped (wrong
output, timing only); three interleaved rounds, unpatched with SDPA flash first for reference.

    python benchmarks/pdl_host_probe.py
"""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_duo as b  # noqa: E402
from kvpress.kernels import decode as dm  # noqa: E402


def step_ms(model, cache, tok, n=25):
    times = []
    for _ in range(n + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=tok, past_key_values=cache, logits_to_keep=1)
        times.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    return statistics.median(times[3:]) * 1e3


def main():
    model = b.build_model("cuda")
    tok = torch.ones(1, 1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        for name in ("unpatched-flash", "duo50"):
            with b.variant(model, name) as make_cache:
                cache = make_cache()
                b.fill_cache(model, cache, 32 * b.K, 8192, "cuda")
                if name != "duo50":
                    print(f"{name}: {step_ms(model, cache, tok):.2f} ms", flush=True)
                    continue
                use_pdl, merge = dm._use_pdl, dm._launch_merge
                try:
                    for _ in range(3):
                        dm._use_pdl = lambda device: True
                        print(f"duo50, merge with PDL: {step_ms(model, cache, tok):.2f} ms", flush=True)
                        dm._use_pdl = lambda device: False
                        print(f"duo50, plain merge launch: {step_ms(model, cache, tok):.2f} ms", flush=True)
                        dm._launch_merge = lambda *args, **kwargs: None
                        print(f"duo50, no merge launch: {step_ms(model, cache, tok):.2f} ms", flush=True)
                        dm._launch_merge = merge
                finally:
                    dm._use_pdl, dm._launch_merge = use_pdl, merge


if __name__ == "__main__":
    main()
