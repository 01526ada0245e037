"""Whether Palu's decode programs can share the rope rows through L1 (H200 diagnosis, round 47).

Every head's program reads its split's rope rows again from L2 (MHA: half of the L2 traffic, the L2 at ~92% of
its throughput, round 37). Two programs run on each SM; if the two take heads of the same split at the same time,
the second may find the rows in the SM's L1. Here:

  placement        which SM each program of a 256- / 264-program launch runs on (``%smid``): do programs i and
                   i + SMs share one (the GPU fills its SMs a wave at a time), or i and i + 1?
  layer            one layer, half rank, groups of one KV head, at 64K / 128K: the tuned settings against the rows
                   by 8-byte async copies (ROWS_IN_L1: cached in L1; 16-byte ones bypass it) and loaded by hand
                   (PREFETCH: plain loads, cached in L1), each with and without PAIR_SPLITS (programs i and i + SMs
                   on the same split); each variant's output checked against the tuned one's (bitwise where only
                   the order differs)

  orders           (round 48) the tuned kernel with its programs' work items in other orders (a work table:
                   identity, paired, split by split, shuffled): bf16 and 2/3/4 bits, MHA and the 8B shape

  ab               (round 49) the grid's order against the identity table, each timed three times in turn

    python benchmarks/palu_pair_probe.py rows|orders|ab [OUT.json]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
import common as c  # noqa: E402
from bench_palu import SHAPES, dense_time, latent_bytes, latent_case, module_settings  # noqa: E402

from kvpress.kernels import palu as kernel  # noqa: E402


@triton.jit
def _smid_kernel(OUT, spin):
    """Writes the SM each program runs on, after ``spin`` dependent steps (so that the launch's programs overlap)."""
    pid = tl.program_id(0)
    smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
    x = pid.to(tl.float32)
    for _ in range(spin):
        x = x * 0.999 + 1.0
    tl.store(OUT + tl.program_id(0), smid + (x < -1.0).to(tl.int32))


def placement(programs: int, sms: int, warps: int) -> dict:
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    _smid_kernel[(programs,)](out, 20000, num_warps=warps)
    torch.cuda.synchronize()
    sm = out.tolist()
    wave = sum(sm[i] == sm[i + sms] for i in range(programs - sms)) if programs > sms else 0
    adjacent = sum(sm[i] == sm[i + 1] for i in range(programs - 1))
    per_sm = torch.bincount(out.long(), minlength=sms).tolist()
    return {"programs": programs, "warps": warps, "same_sm_i_i+sms": wave, "same_sm_i_i+1": adjacent,
            "max_per_sm": max(per_sm), "empty_sms": per_sm.count(0), "first_sms": sm[:16]}


VARIANTS = {  # name -> settings over the tuned ones
    "tuned": {},
    "tuned paired": dict(PAIR_SPLITS=True),
    "rows in L1": dict(ROWS_IN_L1=True),
    "rows in L1 paired": dict(ROWS_IN_L1=True, PAIR_SPLITS=True),
    "rows by hand": dict(PREFETCH=True, PREFETCH_ROWS=True),
    "rows by hand paired": dict(PREFETCH=True, PREFETCH_ROWS=True, PAIR_SPLITS=True),
}
CASES = {("mha", 0): list(VARIANTS), ("gqa", 0): list(VARIANTS)[:4], ("mha", 4): list(VARIANTS)[:4]}


def _identity(head_programs, splits, rows, sms):
    return list(range(head_programs * splits * rows))


def _splits_fastest(head_programs, splits, rows, sms):
    """Launch order split by split of each head program: a split's head programs as far apart as they go."""
    return [(b * splits + s) * head_programs + h for b in range(rows) for h in range(head_programs)
            for s in range(splits)]


def _shuffled(head_programs, splits, rows, sms):
    return torch.randperm(head_programs * splits * rows, generator=torch.Generator().manual_seed(0)).tolist()


ORDERS = {  # round 48: work tables (None: no table, the launch order of the grid)
    "grid": None,
    "identity table": _identity,
    "paired": "paired",
    "splits fastest": _splits_fastest,
    "shuffled": _shuffled,
}
ORDER_CASES = [("mha", 0), ("mha", 4), ("mha", 2), ("mha", 3), ("gqa", 4), ("gqa", 0)]


def order_rows(add, dev, cases=ORDER_CASES, orders=tuple(ORDERS), repeats=1):
    """Round 48: the same kernel with its programs' work in other orders (a table: compiled once per setting);
    ``repeats``: the orders timed in turn that many times (round 49: the grid against the identity table)."""
    paired = kernel._paired_order
    for shape, bits in cases:
        hq, hkv = SHAPES[shape]
        for T in (65536, 131072):
            t_dense, _ = dense_time(hq, hkv, T, dev)
            add({"part": "orders", "shape": shape, "bits": bits or 16, "tokens": T, "variant": "dense-sdpa",
                 "us": t_dense * 1e6})
            case = latent_case(T, hq, hkv, 1, 0.5, bits, dev)
            want = None
            for name in [name for _ in range(repeats) for name in orders]:
                order = ORDERS[name]
                with module_settings():
                    for key, value in kernel.settings(bits, hq // hkv).items():
                        setattr(kernel, key, value)
                    kernel.PAIR_SPLITS = order is not None
                    if callable(order):  # made once, before the graph capture
                        kernel._paired_order = functools.lru_cache(
                            lambda *args, order=order: torch.tensor(order(*args[:4]), dtype=torch.int32, device=dev))
                    try:
                        got = kernel.palu_decode(**case)
                        t = c.graph_time(lambda: kernel.palu_decode(**case))
                    except Exception as error:  # noqa: BLE001  (a variant that fails is recorded)
                        add({"part": "orders", "shape": shape, "bits": bits or 16, "tokens": T, "variant": name,
                             "error": f"{type(error).__name__}: {str(error)[:300]}"})
                        continue
                    finally:
                        kernel._paired_order = paired
                want = got if want is None else want
                add({"part": "orders", "shape": shape, "bits": bits or 16, "tokens": T, "variant": name,
                     "us": t * 1e6, "speedup": t_dense / t, "equal_to_grid": bool(torch.equal(got, want))})
            del case
            torch.cuda.empty_cache()


def main() -> int:
    dev = "cuda"
    part = sys.argv[1] if len(sys.argv) > 1 else "orders"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "results" / f"palu_pair_probe_{part}.json"
    env = c.environment()
    rows = []

    def add(row):
        rows.append(row)
        print(row, flush=True)
        c.write_json(out, {"env": env, "rows": rows})

    if part == "orders":
        order_rows(add, dev)
        return 0
    if part == "ab":
        order_rows(add, dev, [("mha", 4), ("mha", 0), ("mha", 3), ("gqa", 0)], ("grid", "identity table"), 3)
        return 0
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for programs in (2 * sms - 8, 2 * sms):
        for warps in (4, 16):
            add({"part": "placement", **placement(programs, sms, warps)})
    for (shape, bits), names in CASES.items():
        hq, hkv = SHAPES[shape]
        for T in (65536, 131072):
            t_dense, _ = dense_time(hq, hkv, T, dev)
            add({"part": "layer", "shape": shape, "bits": bits or 16, "tokens": T, "variant": "dense-sdpa",
                 "us": t_dense * 1e6})
            case = latent_case(T, hq, hkv, 1, 0.5, bits, dev)
            nbytes = latent_bytes(case)
            want = None
            tuned = kernel.settings(bits, hq // hkv)
            for name in names:
                values = VARIANTS[name]
                with module_settings():
                    for key, value in {**tuned, **values}.items():
                        setattr(kernel, key, value)
                    kernel._CHOSEN.clear()
                    try:
                        got = kernel.palu_decode(**case)
                        t = c.graph_time(lambda: kernel.palu_decode(**case))
                    except Exception as error:  # noqa: BLE001  (a variant that fails is recorded)
                        add({"part": "layer", "shape": shape, "bits": bits or 16, "tokens": T, "variant": name,
                             "error": f"{type(error).__name__}: {str(error)[:300]}"})
                        continue
                want = got if want is None else want
                add({"part": "layer", "shape": shape, "bits": bits or 16, "tokens": T, "variant": name,
                     "us": t * 1e6, "speedup": t_dense / t, "read_tb_s": nbytes / t / 1e12,
                     "equal_to_tuned": bool(torch.equal(got, want)),
                     "max_diff": (got.float() - want.float()).abs().max().item()})
            kernel._CHOSEN.clear()
            del case
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
