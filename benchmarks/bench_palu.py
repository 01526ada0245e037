"""Palu decode attention, one layer: the fused latent kernel vs dense SDPA decode.

    python benchmarks/bench_palu.py layer [--lengths 65536 131072] [--smoke]
    python benchmarks/bench_palu.py sweep               # tile settings of the kernel at 128K
    python benchmarks/bench_palu.py e2e [--lengths ...] # TPOT of an 8B-shaped Llama, patched vs not

``layer``: one query token per row against a cache of L tokens, Llama-3-8B attention shape (32 query
heads, 8 KV heads, D 128, bf16) and an MHA shape (32/32), Palu-50% (per-group rank = half the group's
output width, keys and values), latents in bf16 and at 4 bits. By default groups of one KV head:
rebuilding keys is compute (``2 * D * r`` FLOP per token and KV head, ``r`` the group's rank), so
only small groups can beat dense decode by the issue's margins (>= 1.5x GQA, >= 1.8x MHA, >= 2.5x
at 4 bits, at 64K and 128K); ``--group-sizes 1 2 4 --bits 16 4 3`` measures the whole trade-off.
Each time is a CUDA graph replay with a cold L2 (``common.graph_time``), next to dense SDPA decode
and to "rebuild" (keys and values rebuilt from latents with torch, then SDPA: what the value
side would cost without the fused kernel). Writes ``benchmarks/results/palu_<part>_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common as c  # noqa: E402

from kvpress.kernels import palu as kernel  # noqa: E402
from kvpress.kernels import palu_reference as ref  # noqa: E402
from kvpress.methods import METHODS  # noqa: E402
from kvpress.methods.palu import Palu  # noqa: E402

METHODS.setdefault("palu", Palu)  # until kvpress.methods registers it

RESULTS = Path(__file__).parent / "results"
SHAPES = {"gqa": (32, 8), "mha": (32, 32)}  # (query heads, KV heads), D = 128


def latent_case(T, hq, hkv, gs, ratio, bits, dev, dtype=torch.bfloat16, quant_group=32, batch=1):
    """Random latents of ``T`` tokens per row and everything ``palu_decode`` takes."""
    D = 128
    groups = hkv // gs
    rank = int(gs * D * ratio)
    spec = ref.QuantSpec(bits, quant_group) if bits else None

    def latents():
        h = c.rand(batch, groups, T, rank, dev=dev, dtype=dtype)
        if spec is None:
            return ref.Latents(h, rank)
        words, scale_min = ref.quantize(h, spec)
        return ref.Latents(words, rank, spec, scale_min)

    positions = torch.arange(T, device=dev).expand(batch, T).contiguous()
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D)
    angles = torch.arange(T, device=dev)[:, None].float() * inv
    return dict(
        q=c.rand(batch, hq, 1, D, dev=dev, dtype=dtype), k=latents(), v=latents(),
        k_up=c.rand(groups, gs * D, rank, dev=dev, dtype=dtype) / rank**0.5,
        v_up=c.rand(groups, gs * D, rank, dev=dev, dtype=dtype) / rank**0.5,
        positions=positions, cos=angles.cos().to(dtype), sin=angles.sin().to(dtype),
        q_rank=torch.full((batch, 1), T - 1, device=dev, dtype=torch.int32),
        k_rank=positions.int(), scale=D**-0.5,
    )


def latent_bytes(case) -> int:
    return sum(t.numel() * t.element_size() for side in (case["k"], case["v"])
               for t in (side.data, side.scale_min) if t is not None)


def layer_rows(dev, lengths, shapes, group_sizes, bits_list, ratio=0.5):
    rows = []
    for shape in shapes:
        hq, hkv = SHAPES[shape]
        for T in lengths:
            k = c.rand(1, hkv, T, 128, dev=dev)
            v = c.rand(1, hkv, T, 128, dev=dev)
            q = c.rand(1, hq, 1, 128, dev=dev)
            dense = c.graph_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv))
            dense_bytes = 2 * k.numel() * k.element_size()
            rows.append({"shape": shape, "tokens": T, "variant": "dense-sdpa", "us": dense * 1e6, "bytes": dense_bytes,
                         "speedup": 1.0})
            del k, v
            for gs in group_sizes:
                for bits in bits_list:
                    case = latent_case(T, hq, hkv, gs, ratio, bits, dev)
                    t = c.graph_time(lambda: kernel.palu_decode(**case))
                    nbytes = latent_bytes(case)
                    rows.append({"shape": shape, "tokens": T, "variant": f"palu gs={gs} bits={bits or 16}",
                                 "group_size": gs, "bits": bits or 16, "us": t * 1e6, "bytes": nbytes,
                                 "speedup": dense / t, "bytes_ratio": nbytes / dense_bytes,
                                 "read_tb_s": nbytes / t / 1e12})
                    if bits is None and gs == 1:  # values (and keys) rebuilt with torch, then SDPA
                        def rebuild():
                            keys = ref.rebuild_keys(case["k"], case["k_up"], case["positions"], case["cos"], case["sin"])
                            values = ref.rebuild(case["v"].values(), case["v_up"], None, 128)
                            return F.scaled_dot_product_attention(case["q"], keys, values, enable_gqa=hq != hkv)
                        t = c.graph_time(rebuild)
                        rows.append({"shape": shape, "tokens": T, "variant": "rebuild+sdpa gs=1", "group_size": 1,
                                     "bits": 16, "us": t * 1e6, "speedup": dense / t})
                    print(rows[-1], flush=True)
                    del case
            torch.cuda.empty_cache() if dev == "cuda" else None
    return rows


def sweep_rows(dev, T, shape="gqa", gs=1, bits_list=(None, 4)):
    """Tile settings of the decode kernel (module constants) at one length."""
    rows = []
    hq, hkv = SHAPES[shape]
    defaults = (kernel.BLOCK_N, kernel.NUM_WARPS, kernel.NUM_STAGES, kernel.PROGRAMS_PER_SM)
    try:
        for bits in bits_list:
            case = latent_case(T, hq, hkv, gs, 0.5, bits, dev)
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        for per_sm in (1, 2, 4):
                            kernel.BLOCK_N, kernel.NUM_WARPS, kernel.NUM_STAGES, kernel.PROGRAMS_PER_SM = block_n, warps, stages, per_sm
                            try:
                                t = c.graph_time(lambda: kernel.palu_decode(**case))
                            except Exception as error:  # a tile that does not compile (resources)
                                print(f"skip {block_n}/{warps}/{stages}/{per_sm}: {type(error).__name__}")
                                continue
                            rows.append({"tokens": T, "bits": bits or 16, "block_n": block_n, "warps": warps,
                                         "stages": stages, "programs_per_sm": per_sm, "us": t * 1e6})
                            print(rows[-1], flush=True)
    finally:
        kernel.BLOCK_N, kernel.NUM_WARPS, kernel.NUM_STAGES, kernel.PROGRAMS_PER_SM = defaults
    return rows


def e2e_rows(dev, lengths, smoke):
    """TPOT of the 8B-shaped Llama (random weights, factors from the weights at 50%, groups of one KV
    head), unpatched vs Palu bf16 and 4-bit latents."""
    model = c.build_model(dev, smoke=smoke)
    names = ["unpatched", "palu-50", "palu-50-4bit"]

    def variant(model, name):
        if name in c.BASELINES:
            return c.baseline_variant(model, name)
        bits = 4 if name.endswith("4bit") else None
        return c.kvpress_variant(model, "palu", rank_ratio=0.5, group_size=1, rank_multiple=32, bits=bits)

    return c.e2e_rows(model, dev, lengths, names, variant, chunk=8 * c.K, new_tokens=16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["layer", "sweep", "e2e"])
    parser.add_argument("--lengths", type=int, nargs="*", default=[64 * c.K, 128 * c.K])
    parser.add_argument("--shapes", nargs="*", default=["gqa", "mha"], choices=list(SHAPES))
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[1])
    parser.add_argument("--bits", type=int, nargs="*", default=[16, 4], help="16 = unquantised latents")
    parser.add_argument("--smoke", action="store_true", help="tiny lengths on CPU (interpreter), checks the script")
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [256] if args.smoke else args.lengths
    bits = [None if b == 16 else b for b in args.bits]
    env = c.environment()
    if args.part == "layer":
        rows = layer_rows(dev, lengths, args.shapes, args.group_sizes, bits)
        c.table("Palu decode attention, one layer", rows,
                [("shape", "{}"), ("tokens", "{}"), ("variant", "{}"), ("us", "{:.1f}"), ("speedup", "{:.2f}x")])
    elif args.part == "sweep":
        rows = sweep_rows(dev, lengths[-1])
    else:
        rows = e2e_rows(dev, lengths, args.smoke)
    if not args.smoke:
        c.write_json(RESULTS / f"palu_{args.part}_{c.device_tag(env)}.json", {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
