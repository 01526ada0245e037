"""LESS decode step at small budgets (H2O and Lambda, 128-1024 tokens per KV head, 8B shape, bf16, batch 1,
state per KV head): the whole step and launch 1 alone per kernel setting, each checked against the torch
reference first; beside dense SDPA decode at 128K. Where the step's ~12 us floor goes at small budgets, and
whether a setting moves it. Run from the repository root on a GPU:
``python benchmarks/less_budget_probe.py [--out DIR] [--smoke]`` (writes ``less_budget_probe_<device>.json``)."""
import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_less as B  # noqa: E402
import common as c  # noqa: E402

from kvpress.kernels import less as kernel  # noqa: E402
from kvpress.kernels import less_reference as ref  # noqa: E402

SETTINGS = {
    "the module's": {},
    "2 splits at most": dict(MAX_SPLITS=2),
    "4 splits at most": dict(MAX_SPLITS=4),
    "8 splits at most": dict(MAX_SPLITS=8),
    "32-slot attention blocks": dict(BLOCK_N=32),
    "128-slot attention blocks": dict(BLOCK_N=128),
    "64 slots per score step (BLOCK_E)": dict(BLOCK_E=64),
    "launch 2 in 4 warps": dict(FINISH_WARPS=4),
    "launch 1 in 1 stage": dict(STEP_STAGES=1),
    "launch 2 not a programmatic dependent launch": dict(USE_PDL=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="*", default=[128, 256, 512, 1024])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--out", default=str(B.RESULTS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (Triton interpreter): checks the script")
    args = parser.parse_args()
    if args.smoke:
        dev, dtype, (hq, hkv, d, rank, hidden, L) = "cpu", torch.float32, (4, 2, 16, 8, 32, 256)
        args.budgets = [16]
    else:
        dev, dtype, (hq, hkv, d, rank, hidden, L) = "cuda", torch.bfloat16, (32, 8, 128, 8, 512, args.length)
    q = c.rand(1, hq, 1, d, dev=dev, dtype=dtype)
    k = c.rand(1, hkv, L, d, dev=dev, dtype=dtype)
    v = c.rand(1, hkv, L, d, dev=dev, dtype=dtype)
    t_dense = c.graph_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    rows = [{"L": L, "variant": "dense SDPA", "graph_us": t_dense * 1e6}]
    del k, v
    wk = B.seeded_maps(d, hq, hkv, rank, hidden, dev).to(dtype)
    k_new = c.rand(1, hkv, 1, d, dev=dev, dtype=dtype)
    v_new = c.rand(1, hkv, 1, d, dev=dev, dtype=dtype)
    q_rank = torch.full((1,), L, dtype=torch.int32, device=dev)
    for name, policy in B.budget_policies(args.budgets).items():
        pristine = B.filled_cache(policy, hq, hkv, d, hkv, rank, L, dev, dtype)
        expected = ref.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(pristine), wk, policy, d ** -0.5)
        for what, settings in SETTINGS.items():
            row = {"L": L, "variant": f"LESS {name}", "setting": what}
            try:
                with B.kernel_settings(settings):
                    got = kernel.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(pristine), wk, policy, d ** -0.5)
                    row["max_error_vs_reference"] = (got.float() - expected.float()).abs().max().item()
                    cache = copy.deepcopy(pristine)
                    step = lambda: kernel.decode_step(q, k_new, v_new, q_rank, cache, wk, policy, d ** -0.5)  # noqa: E731
                    row["graph_us"] = min(c.graph_time(step), c.graph_time(step)) * 1e6
                    row["speedup"] = t_dense * 1e6 / row["graph_us"]
                    row["launch_1_us"] = B.launch_one(step) * 1e6
            except Exception as error:  # noqa: BLE001 (a setting this device or Triton refuses)
                row["error"] = repr(error)[:300]
            rows.append(row)
            print(row, flush=True)
    if args.smoke:  # every row must have run
        return int(any("error" in row for row in rows))
    env = c.environment()
    c.write_json(Path(args.out) / f"less_budget_probe_{c.device_tag(env)}.json", {"environment": env, "args": vars(args),
                                                                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
