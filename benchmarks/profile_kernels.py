"""Where the time of one decode-attention call goes, kernel by kernel: the LESS step and the Palu
decode on the 8B attention shape, for the torch profiler (kernel durations) or for Nsight Compute
(``ncu``: hardware counters; run this script under it).

    python benchmarks/profile_kernels.py --cases less palu --profiler --out DIR
    ncu --clock-control none -k regex:_step_kernel --launch-skip 4 --launch-count 1 \\
        python benchmarks/profile_kernels.py --cases less

Cases: ``less`` (H2O 1024 + 1024, state per KV head, R 8, 512 hidden units), ``less-off`` (the same
with the state off), ``less-lambda`` (4 + 2044), ``palu`` / ``palu4`` (128K tokens, groups of one KV
head, half rank, bf16 / 4-bit latents, the settings of ``kernels.palu.TUNED``), ``palu-mha`` /
``palu4-mha`` (32 KV heads), ``dense`` / ``dense-mha`` (SDPA decode at 128K, 8 / 32 KV heads). Each case runs ``--iters``
calls after 3 warm-up calls (compilation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_less  # noqa: E402
import bench_palu  # noqa: E402
import common as c  # noqa: E402

from kvpress.kernels import less as less_kernel  # noqa: E402
from kvpress.kernels import palu as palu_kernel  # noqa: E402
from kvpress.methods.less import FeatureMaps  # noqa: E402

POLICIES = {"less": "h2o 1024+1024", "less-off": "h2o 1024+1024", "less-lambda": "lambda 4+2044"}  # bench_less's


def less_case(name, dev):
    hq, hkv, d, rank, hidden = 32, 8, 128, 8, 512
    policy, state = bench_less.POLICIES[POLICIES[name]], name != "less-off"
    torch.manual_seed(0)
    w = FeatureMaps(d, hq, hkv, rank, hidden).weights().to(dev).to(torch.bfloat16)
    cache = bench_less.filled_cache(policy, hq, hkv, d, hkv, rank, 131072, dev, torch.bfloat16)
    q = c.rand(1, hq, 1, d, dev=dev)
    k_new, v_new = c.rand(1, hkv, 1, d, dev=dev), c.rand(1, hkv, 1, d, dev=dev)
    q_rank = torch.full((1,), 131072, dtype=torch.int32, device=dev)
    return lambda: less_kernel.decode_step(q, k_new, v_new, q_rank, cache, w, policy, d ** -0.5, state=state)


TUNED = dict(palu_kernel.TUNED)
PALU = {"palu": (8, 0, {}), "palu4": (8, 4, {}), "palu-mha": (32, 0, {}), "palu4-mha": (32, 4, {})}  # KV heads, bits, settings


def palu_case(name, dev):
    hkv, bits, settings = PALU[name]
    palu_kernel.TUNED = {**TUNED, (bits, 32 // hkv): {**TUNED.get((bits, 32 // hkv), {}), **settings}}
    case = bench_palu.latent_case(131072, 32, hkv, 1, 0.5, bits or None, dev)
    return lambda: palu_kernel.palu_decode(**case)


def dense_case(dev, hkv=8):
    q, k, v = c.rand(1, 32, 1, 128, dev=dev), c.rand(1, hkv, 131072, 128, dev=dev), c.rand(1, hkv, 131072, 128, dev=dev)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def make(name, dev):
    if name.startswith("less"):
        return less_case(name, dev)
    if name.startswith("palu"):
        return palu_case(name, dev)
    return dense_case(dev, 32 if name == "dense-mha" else 8)


def kernel_times(fn, iters):
    """Mean device time per call of each kernel ``fn`` launches (us), from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.count:
            times[event.key[:80]] = {"us_per_call": event.device_time_total / iters, "launches_per_call": event.count / iters}
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["less", "less-off", "less-lambda", "palu", "palu4", "dense"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--profiler", action="store_true", help="print the kernels' times (torch profiler)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dev = "cuda"
    report = {"environment": c.environment(), "cases": {}}
    for name in args.cases:
        fn = make(name, dev)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        if args.profiler:
            report["cases"][name] = kernel_times(fn, args.iters)
            for kernel, t in report["cases"][name].items():
                print(f"{name:12s} {t['us_per_call']:8.2f} us  x{t['launches_per_call']:.0f}  {kernel}", flush=True)
        else:
            for _ in range(args.iters):
                fn()
            torch.cuda.synchronize()
    if args.out is not None and args.profiler:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_times.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
