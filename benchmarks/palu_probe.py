"""Where Palu's decode kernel spends its time (H200 diagnosis): one layer at 128K tokens, half rank, groups
of one KV head, bf16, the kernel as configured against variants of its inputs and settings:

  as configured        the module's settings (kvpress/kernels/palu.py TUNED)
  prefetch             PREFETCH on (ranks, rope rows and quantised words loaded a block ahead by hand)
  positions zero       every cached token at position 0: the rope rows the kernel gathers per token all
                       hit one row (what gathering them from L2/HBM costs, by difference)
  rank 16 keys         key rank 16 instead of 64 (what rebuilding the keys costs, by difference)

    python benchmarks/palu_probe.py [OUT.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as c  # noqa: E402
from bench_palu import D, SHAPES, dense_time, latent_bytes, latent_case, module_settings  # noqa: E402

from kvpress.kernels import palu as kernel  # noqa: E402
from kvpress.kernels import palu_reference as ref  # noqa: E402


def main() -> int:
    dev = "cuda"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "palu_probe.json"
    env = c.environment()
    rows = []

    def add(row):
        rows.append(row)
        print(row, flush=True)
        c.write_json(out, {"env": env, "rows": rows})

    T = 131072
    for shape in ("gqa", "mha"):
        hq, hkv = SHAPES[shape]
        t_dense, _ = dense_time(hq, hkv, T, dev)
        add({"shape": shape, "variant": "dense-sdpa", "us": t_dense * 1e6})
        case = latent_case(T, hq, hkv, 1, 0.5, 0, dev)
        nbytes = latent_bytes(case)

        def timed(name, **overrides):
            args = {**case, **overrides}
            try:
                t = c.graph_time(lambda: kernel.palu_decode(**args))
            except Exception as error:  # noqa: BLE001  (a variant that fails is recorded)
                add({"shape": shape, "variant": name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
                return
            add({"shape": shape, "variant": name, "us": t * 1e6, "speedup": t_dense / t,
                 "read_tb_s": nbytes / t / 1e12})

        timed("as configured")
        with module_settings():
            kernel.PREFETCH = True
            timed("prefetch")
        timed("positions zero", positions=torch.zeros_like(case["positions"]))
        small = ref.Latents(case["k"].data[..., :16].contiguous(), 16)
        timed("rank 16 keys", k=small, k_up=case["k_up"][..., :16].contiguous())
        del case
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
