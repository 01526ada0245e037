"""Decode attention as a graph-decode step runs it (device lengths, the new token written in
place), per split setting: the kvpress dense cache (8 KV heads) and Duo 25% (2 retrieval heads +
6 streaming) at equal cache bytes, CUDA graph, L2 flushed; time and achieved bandwidth.

    python benchmarks/decode_split_probe.py   # H200: ~1 min
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

from kvpress.kernels import decode as D  # noqa: E402

HQ, HKV, HD, SINK, RECENT = 32, 8, 128, 64, 256


def case(n_full: int, T: int, dev="cuda"):
    """Inputs of ``decode_attention`` for ``n_full`` split-K heads over ``T`` keys (capacity
    T + 4096) and ``HKV - n_full`` streaming heads; returns the call and its cache bytes."""
    cap = T + 4096
    r = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)  # noqa: E731
    fk, fv = r(1, n_full, cap, HD), r(1, n_full, cap, HD)
    fr = torch.arange(cap, device=dev, dtype=torch.int32)[None]
    n_s = HKV - n_full
    C = SINK + RECENT + 1
    sk, sv = r(1, max(n_s, 1), C, HD)[:, :n_s], r(1, max(n_s, 1), C, HD)[:, :n_s]
    sr = torch.cat([torch.arange(SINK), torch.arange(T - RECENT - 1, T)]).int().to(dev)[None]
    q = r(1, HQ, 1, HD)
    qr = torch.tensor([[T - 1]], device=dev, dtype=torch.int32)
    f_len = torch.tensor(T, device=dev, dtype=torch.int32)
    s_len = torch.tensor(C, device=dev, dtype=torch.int32)
    heads = torch.arange(HKV, device=dev, dtype=torch.int32)
    new = (r(1, HKV, 1, HD), r(1, HKV, 1, HD))
    out = torch.empty_like(q)
    split = (fk, fv, fr, heads[:n_full], 0, None, f_len)
    single = (sk, sv, sr, heads[n_full:], SINK, RECENT, s_len)  # no heads: no programs
    call = lambda: D.decode_attention(q, qr, HD ** -0.5, HQ // HKV, split, single, out=out, new_kv=new)  # noqa: E731
    return call, 2 * (n_full * T + n_s * C) * HD * 2


def main():
    bw = c.copy_bandwidth("cuda")
    env = c.environment()
    shapes = [("dense 32K", 8, 32 * c.K), ("dense 128K", 8, 128 * c.K), ("duo25 128K", 2, 128 * c.K),
              ("duo25 512K", 2, 512 * c.K), ("duo50 128K", 4, 128 * c.K)]
    settings = list(itertools.product((1, 2, 3, 4), (32, 64), (2, 3, 4)))  # programs per SM, BLOCK_N, stages
    base = (D.PROGRAMS_PER_SM, D.BLOCK_N, D.NUM_STAGES)
    rows = []
    print(f"{env['device']}: copy bandwidth {bw / 1e12:.2f} TB/s; default (per SM, BLOCK_N, stages) = {base}")
    for label, n_full, T in shapes:
        call, nbytes = case(n_full, T)
        line = []
        for per_sm, block_n, stages in settings:
            D.PROGRAMS_PER_SM, D.BLOCK_N, D.NUM_STAGES = per_sm, block_n, stages
            try:
                t = c.graph_time(call)
            except Exception as error:  # e.g. shared memory of a tile setting
                rows.append({"shape": label, "per_sm": per_sm, "block_n": block_n, "stages": stages, "error": str(error)[:200]})
                continue
            finally:
                D.PROGRAMS_PER_SM, D.BLOCK_N, D.NUM_STAGES = base
            rows.append({"shape": label, "per_sm": per_sm, "block_n": block_n, "stages": stages, "us": t * 1e6,
                         "vs_floor": t / (nbytes / bw)})
            line.append((t, per_sm, block_n, stages))
        line.sort()
        default = next(r for r in rows if r["shape"] == label and (r["per_sm"], r["block_n"], r["stages"]) == base)
        print(f"{label}: floor {nbytes / bw * 1e6:.0f} us; default {default['us']:.0f} us ({default['vs_floor']:.2f}x); best "
              + ", ".join(f"{t * 1e6:.0f} us @ {p}/{b}/{s}" for t, p, b, s in line[:4]), flush=True)
        del call
        torch.cuda.empty_cache()
    out = Path(__file__).resolve().parent / "results" / f"decode_split_probe_{c.device_tag(env)}.json"
    c.write_json(out, {"env": env, "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
