"""Where a LESS decode step's time goes per split count: the whole step, launch 1 alone and launch 2
alone (the other launch skipped: launch 2 then reads the workspaces the last full step left), one layer
of the Llama-3-8B shape, bf16, H2O 1024+1024, state per KV head, CUDA-graph replay with a cold L2.

    python benchmarks/less_parts.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402
from bench_less import filled_cache, launch_one  # noqa: E402

from kvpress.kernels import less as kernel  # noqa: E402
from kvpress.kernels import less_reference as ref  # noqa: E402
from kvpress.methods.less import FeatureMaps  # noqa: E402

SETTINGS = [dict(MAX_SPLITS=n) for n in (8, 16, 32, 64)] + [dict(MAX_SPLITS=64, STEP_STAGES=1),
                                                             dict(MAX_SPLITS=32, STEP_STAGES=2)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    hq, hkv, d, rank, hidden, L = 32, 8, 128, 8, 512, 32768
    policy = ref.Policy(0, 1024, 1024)
    torch.manual_seed(0)
    w = FeatureMaps(d, hq, hkv, rank, hidden).weights().to(dev).to(dtype)
    q = c.rand(1, hq, 1, d, dev=dev, dtype=dtype)
    k_new = c.rand(1, hkv, 1, d, dev=dev, dtype=dtype)
    v_new = c.rand(1, hkv, 1, d, dev=dev, dtype=dtype)
    q_rank = torch.full((1,), L, dtype=torch.int32, device=dev)
    rows = []
    for settings in SETTINGS:
        with mock.patch.multiple(kernel, **settings):  # the module's settings, restored afterwards
            cache = filled_cache(policy, hq, hkv, d, hkv, rank, L, dev, dtype)
            step = lambda: kernel.decode_step(q, k_new, v_new, q_rank, cache, w, policy, d ** -0.5)  # noqa: E731
            step()  # compile, workspaces
            row = {**settings, "step_us": min(c.graph_time(step), c.graph_time(step)) * 1e6,
                   "launch_1_us": launch_one(step) * 1e6}
            with c.skipped_launches(kernel, "_step_kernel"):
                row["launch_2_us"] = c.graph_time(step) * 1e6
        rows.append(row)
        print(row, flush=True)
    c.write_json(args.out / f"less_parts_{c.device_tag(c.environment())}.json", {"env": c.environment(), "rows": rows})


if __name__ == "__main__":
    main()
