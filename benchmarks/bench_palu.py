"""Palu decode attention, one layer: the fused latent kernel vs dense SDPA decode; and time per output
token of an 8B-shaped Llama.

    python benchmarks/bench_palu.py layer [--lengths 65536 131072] [--group-sizes 1 2 4]
                                          [--ratios 0.25 0.5 0.75] [--bits 16 4] [--rope rows|tables] [--smoke]
    python benchmarks/bench_palu.py sweep [--lengths 131072]   # kernel settings at one length
    python benchmarks/bench_palu.py sweep --grid round3         # the settings the H200 sweep pointed to
    python benchmarks/bench_palu.py tpot [--lengths ...]      # 8B-shaped Llama, patched vs not

``layer`` (the speed side of the frontier): one query token per row against a cache of L tokens,
Llama-3-8B attention shape (32 query heads, 8 KV heads, D 128, bf16) and an MHA shape (32/32), per
group size ``gs`` (KV heads per latent group) and kept rank ratio (per-group rank = ratio x
``gs * D``, keys and values), latents in bf16 and quantised (``--bits``, 16 = unquantised).
Rebuilding keys is compute (``2 * D * r`` FLOP per token and KV head, ``r`` the group's rank), so
only small groups can beat dense decode by the issue's margins (>= 1.5x GQA, >= 1.8x MHA, >= 2.5x
at 4 bits, at 64K and 128K). Each time is a CUDA graph replay with a cold L2
(``common.graph_time``), next to dense SDPA decode on the same shape. The rope rows are given per slot,
as the runtime keeps them (``--rope tables``: half tables gathered by position in the kernel).

``sweep``: the kernel's settings (token tile, warps, pipelining depth, programs per SM, hand
prefetch, the rotation's dtype, ...) at one length, GQA, groups of one KV head, half rank; each
setting is first checked against the reference (``max_err``). ``--tuning`` (any part) runs with the
fastest settings of the sweep JSONs given.

``tpot``: the 8B-shaped Llama with random weights (``common.build_model``), Palu factors made from
those weights at patch time (plain SVD, half rank, groups of one KV head: the speed does not depend
on the factors' values), the caches filled to L tokens with random latents / K/V (no prefill
compute), then eager decode steps: median time per output token, GPU busy time per step (the part
the kernel changes; eager transformers spends most of a step on the host), peak memory, cache bytes.

Rows are written as they come (a step cut short by a timeout keeps what it measured) to
``--out/palu_<part>_<device>.json`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common as c  # noqa: E402

import kvpress  # noqa: E402
from kvpress.kernels import palu as kernel  # noqa: E402
from kvpress.kernels import palu_reference as ref  # noqa: E402
from kvpress.methods import METHODS  # noqa: E402
from kvpress.methods.palu import Palu  # noqa: E402

METHODS.setdefault("palu", Palu)  # until kvpress.methods registers it

RESULTS = Path(__file__).parent / "results"
SHAPES = {"gqa": (32, 8), "mha": (32, 32)}  # (query heads, KV heads), D = 128
D = 128


def latent_case(T, hq, hkv, gs, ratio, bits, dev, dtype=torch.bfloat16, quant_group=32, batch=1, rope="rows"):
    """Random latents of ``T`` tokens per row and everything ``palu_decode`` takes; ``rope``: the rope
    rows per slot ``[B, T, D / 2]`` as the runtime keeps them ("rows"), or the half tables, gathered
    by position in the kernel ("tables")."""
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
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    if rope == "rows":
        cos, sin = ref.rope_rows(positions, cos, sin)
    return dict(
        q=c.rand(batch, hq, 1, D, dev=dev, dtype=dtype), k=latents(), v=latents(),
        k_up=c.rand(groups, gs * D, rank, dev=dev, dtype=dtype) / rank**0.5,
        v_up=c.rand(groups, gs * D, rank, dev=dev, dtype=dtype) / rank**0.5,
        positions=positions, cos=cos, sin=sin,
        q_rank=torch.full((batch, 1), T - 1, device=dev, dtype=torch.int32),
        k_rank=positions.int(), scale=D**-0.5,
    )


def latent_bytes(case) -> int:
    """Bytes of the cached latents (codes, scales and minima) of a case."""
    return sum(t.numel() * t.element_size() for side in (case["k"], case["v"])
               for t in (side.data, side.scale_min) if t is not None)


class Recorder:
    """Rows of one part, written to its JSON after each row."""

    def __init__(self, path: Path | None, env: dict):
        self.path, self.env, self.rows = path, env, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(row, flush=True)
        if self.path is not None:
            c.write_json(self.path, {"env": self.env, "rows": self.rows})


def dense_time(hq, hkv, T, dev):
    """Dense SDPA decode of one query token over ``T`` bf16 keys/values: (seconds, K/V bytes)."""
    k = c.rand(1, hkv, T, D, dev=dev)
    v = c.rand(1, hkv, T, D, dev=dev)
    q = c.rand(1, hq, 1, D, dev=dev)
    t = c.graph_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv))
    return t, 2 * k.numel() * k.element_size()


def layer_settings(group_sizes, ratios, bits_list):
    """(gs, ratio, bits) in the order measured: the issue's setting (groups of one, half rank) first."""
    settings = list(itertools.product(group_sizes, ratios, bits_list))
    return sorted(settings, key=lambda s: (s[0] != 1 or s[1] != 0.5, s[0], s[1]))


def layer_rows(rec, dev, lengths, shapes, group_sizes, ratios, bits_list, rope="rows"):
    dense = {}
    for shape in shapes:  # dense first: the speed-ups need it
        for T in lengths:
            hq, hkv = SHAPES[shape]
            dense[shape, T] = dense_time(hq, hkv, T, dev)
            rec.add({"shape": shape, "tokens": T, "variant": "dense-sdpa", "us": dense[shape, T][0] * 1e6,
                     "bytes": dense[shape, T][1], "speedup": 1.0})
    for gs, ratio, bits in layer_settings(group_sizes, ratios, bits_list):
        for shape in shapes:
            hq, hkv = SHAPES[shape]
            for T in lengths:
                t_dense, dense_bytes = dense[shape, T]
                try:
                    case = latent_case(T, hq, hkv, gs, ratio, bits, dev, rope=rope)
                    t = c.graph_time(lambda: kernel.palu_decode(**case))
                except Exception as error:  # a setting that does not compile or fit: recorded, the rest goes on
                    rec.add({"shape": shape, "tokens": T, "group_size": gs, "ratio": ratio, "bits": bits or 16,
                             "error": f"{type(error).__name__}: {str(error)[:300]}"})
                    continue
                nbytes = latent_bytes(case)
                rank = case["k"].rank
                flop = 2 * T * hkv * D * rank  # rebuilding keys (per KV head: its D rows of the group's up)
                plan = kernel._CHOSEN.get(_plan_key(case))
                extra = {}
                if gs == 1 and ratio == 0.5 and plan is not None:  # the merge (+ value up-projection) kernel's share
                    gp, block_rv = _plan_key(case)[6], max(16, 1 << (case["v"].rank - 1).bit_length())
                    launch = [case[n] for n in ("q", "k", "v", "k_up", "positions", "cos", "sin", "q_rank", "k_rank",
                                                "scale")] + [None, None, None, None, *plan[:2], gp, block_rv, None,
                                                             kernel.settings(bits or 0, hq // hkv), plan[2]]
                    extra["split_kernel_us"] = c.graph_time(lambda: kernel._launch_decode(*launch)) * 1e6
                rec.add({"shape": shape, "tokens": T, "variant": f"palu gs={gs} r={ratio} bits={bits or 16}",
                         "rope": rope,
                         "group_size": gs, "ratio": ratio, "rank": rank, "bits": bits or 16, "us": t * 1e6,
                         "bytes": nbytes, "speedup": t_dense / t, "bytes_ratio": nbytes / dense_bytes,
                         "read_tb_s": nbytes / t / 1e12, "rebuild_tflop_s": flop / t / 1e12, "plan": plan, **extra})
                del case
                if dev == "cuda":
                    torch.cuda.empty_cache()


def _plan_key(case):
    return kernel.plan_key(case["q"], case["k"], case["v"], case["k_up"])


@contextlib.contextmanager
def module_settings():
    """Kernel settings set on the module for the block (``TUNED`` emptied): restored afterwards."""
    saved = {name: getattr(kernel, name) for name in kernel.TUNABLE}
    tuned, kernel.TUNED = kernel.TUNED, {}
    try:
        yield saved
    finally:
        for name, value in saved.items():
            setattr(kernel, name, value)
        kernel.TUNED = tuned


def load_tuning(paths) -> dict:
    """``kernel.TUNED`` from sweep JSONs: per key-latent bits and shape (GQA: any shape; MHA: one query
    head per KV head) the settings of the fastest sweep row (among rows whose output matched the
    reference)."""
    tuned = {}
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]
            if "us" in r and "block_n" in r and r.get("max_err", 0.0) < 0.05]
    for bits, shape in {(r["bits"], r["shape"]) for r in rows}:
        best = min((r for r in rows if (r["bits"], r["shape"]) == (bits, shape)), key=lambda r: r["us"])
        key = (0 if bits == 16 else bits, 1 if shape == "mha" else None)
        tuned[key] = {name: best[name.lower()] for name in kernel.TUNABLE if name.lower() in best}
    return tuned


def _grid(block_n, warps, stages, per_sm, prefetch=True, rope_in_dtype=False, **more):
    return [dict(BLOCK_N=block_n, NUM_WARPS=warps, NUM_STAGES=stages, PROGRAMS_PER_SM=n, PREFETCH=prefetch,
                 ROPE_IN_DTYPE=rope_in_dtype, **more) for n in per_sm]


# The first H200 sweep (benchmarks/results/palu_sweep*_NVIDIA_H200.json, no PREFETCH yet): time per
# loop step hardly depended on the tile (32 or 64 tokens) and halved with twice the programs per SM:
# latency-bound. Its best: 64-token tiles / 4 warps / 3 stages / 2 per SM (bf16), 32 / 2 / 3 / 4 (4-bit).
GRIDS = {
    "full": [g for block_n, warps, stages in [(64, 4, 3), (128, 8, 3), (64, 8, 3), (64, 4, 2), (32, 2, 3), (128, 4, 2),
                                              (32, 4, 3), (128, 8, 2), (16, 1, 3), (64, 8, 2)]
             for g in _grid(block_n, warps, stages, (2, 1, 4))],
    "round3": [*_grid(64, 4, 3, (2,), prefetch=False), *_grid(64, 4, 3, (2, 3)), *_grid(32, 2, 3, (4,), prefetch=False),
               *_grid(32, 2, 3, (4, 6, 8)), *_grid(32, 4, 3, (3, 4)), *_grid(16, 1, 3, (8, 16)), *_grid(16, 1, 2, (16,))],
    # round 4 (palu_sweep_r4_NVIDIA_H200.json) also timed the keys rebuilt a block ahead (an option since
    # removed: 164 us vs 166 us without the prefetch, 240 vs 151 us with it); its rows without that option:
    "round4": [*_grid(64, 4, 3, (2,), prefetch=False), *_grid(64, 4, 3, (2,)), *_grid(128, 8, 3, (1, 2)),
               *_grid(64, 4, 3, (3,)), *_grid(64, 4, 2, (2,)), *_grid(32, 2, 3, (4,))],
    # (rounds 5-9 timed the two-pass decode, TWO_PASS, and round 14 a softmax state per warp, SOFTMAX_SLICES: options
    # removed on 2026-12-03, measured no faster than one pass and one reference per program; their rows are in
    # palu_sweep_r5..r9, r12, r14, r16, r20 *_NVIDIA_H200.json, their grids in the history of this file)
    # round 11: fp32 -> bf16 conversions two per instruction and 4-bit words split in the thread that loads
    # them (offline sm_90a build, triton 3.6: 606 instead of 702 instructions per block in bf16, 904 instead
    # of 1370 and 230 instead of 255 registers at 4 bits): the tuned setting against more programs per SM
    "round11": [*_grid(64, 4, 3, (2, 3), rope_in_dtype=True), *_grid(64, 4, 2, (2, 3), rope_in_dtype=True),
                *_grid(32, 2, 3, (4, 6), rope_in_dtype=True)],
    # round 12: the softmax sums kept elementwise (565 instructions per block in bf16, 211 registers), a register
    # cap (MAX_REGISTERS) for three or four programs per SM, query heads padded to 8 instead of 16 (QUERY_TILE:
    # mma.sync instead of wgmma for the score and value dots); without the hand prefetch the rope rows come
    # through shared memory in the layout the rotation needs (offline: 447-525 instructions, 0-24 bytes spilled)
    "round12": [*_grid(64, 4, 3, (2,), rope_in_dtype=True), *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 3, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168),
                *_grid(64, 4, 3, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168, QUERY_TILE=8),
                *_grid(64, 4, 2, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168, QUERY_TILE=8),
                *_grid(64, 4, 2, (3,), rope_in_dtype=True, MAX_REGISTERS=168),
                *_grid(64, 4, 3, (4,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=128, QUERY_TILE=8),
                *_grid(64, 4, 2, (4,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=128, QUERY_TILE=8)],
    # round 15: bf16 value latents loaded transposed, as the value dot takes them (an async copy through shared
    # memory instead of a register tile whose repacking waited on its global load: 16% of the stall samples;
    # offline 442 instead of 467 instructions per block), with the settings around the tuned one
    "round15": [*_grid(64, 4, 3, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168, QUERY_TILE=8),
                *_grid(64, 4, 2, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168, QUERY_TILE=8),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 3, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=152, QUERY_TILE=8),
                *_grid(64, 4, 3, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168, QUERY_TILE=16)],
    # round 16, with the rope rows per slot (now the default input; round 16's JSONs say rope_by_slot): loaded like
    # the latents, so the pipeliner double-buffers them and issues them a block ahead (offline: 388 instructions per
    # block, 94 KB of shared memory at 3 stages: two programs per SM; 368 and 61 KB at 2 stages, single buffers)
    "round16": [*_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 2, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168, QUERY_TILE=8),
                *_grid(64, 4, 3, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=152, QUERY_TILE=8),
                *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8)],
    # round 20: one softmax reference per program (FIXED_MAX: no running maximum, so no block reduces across warps;
    # offline 332 instead of 372 instructions per block in bf16, 180 registers; 4 bits without the hand prefetch 656
    # instead of 743) against the tuned bf16 and 4-bit settings
    "round20": [*_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FIXED_MAX=True),
                *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8, FIXED_MAX=True),
                *_grid(64, 4, 2, (3,), prefetch=False, rope_in_dtype=True, MAX_REGISTERS=168, QUERY_TILE=8,
                       FIXED_MAX=True),
                *_grid(64, 4, 2, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FIXED_MAX=True),
                *_grid(128, 8, 2, (1,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FIXED_MAX=True)],
    # round 25: the split count (PROGRAMS_PER_SM 2: MHA runs 8 splits x 32 heads = 256 programs on 264 slots; 8: 33
    # splits, four whole waves) and four stages, around the tuned bf16 setting
    "round25": [*_grid(64, 4, 3, (2, 8, 4), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FIXED_MAX=True),
                *_grid(64, 4, 4, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FIXED_MAX=True)],
    # round 27: 2- and 3-bit latents (their settings came from the first sweep, before every change since) against
    # the 4-bit and bf16 settings
    "round27": [*_grid(32, 2, 3, (4,), prefetch=False), *_grid(32, 2, 3, (4,), rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8)],
    # round 33: 2- and 4-bit codes made in pairs (offline 517 / 523 instead of 556 / 886 instructions per block, 255
    # registers) made 2 bits as fast as 4 but 4 bits no faster (round 32): more warps per SM, smaller tiles, the
    # pipeliner instead of the hand prefetch
    "round33": [*_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 3, (3,), rope_in_dtype=True, QUERY_TILE=8, MAX_REGISTERS=168),
                *_grid(64, 4, 3, (4,), rope_in_dtype=True, QUERY_TILE=8, MAX_REGISTERS=128),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 4, 2, (3,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, MAX_REGISTERS=168),
                *_grid(32, 4, 3, (4,), rope_in_dtype=True, QUERY_TILE=8),
                *_grid(32, 2, 3, (4, 8), rope_in_dtype=True, QUERY_TILE=8),
                *_grid(128, 8, 3, (1, 2), rope_in_dtype=True, QUERY_TILE=8),
                *_grid(64, 8, 3, (2,), rope_in_dtype=True, QUERY_TILE=8)],
    # round 37: two KV heads per program (HEADS_PER_PROGRAM: each block's rope rows, ranks and masks loaded once for
    # both; ncu, profile:l2: the MHA decode at 92% of the L2's throughput and 81% of DRAM's, reading twice as many
    # bytes from L2 as from DRAM). Offline: 557-571 instructions per block of two heads (337 for one), 244-250
    # registers, 104 KB of shared memory at 2 stages (two programs per SM), 153 KB at 3 (one)
    "round37": [*_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),  # bf16 as tuned
                *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8),  # quantised as tuned
                *_grid(64, 4, 3, (1, 2), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2),
                *_grid(64, 4, 2, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2),
                *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2),
                *_grid(64, 4, 3, (1,), rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2)],
    # round 42: with quantised latents only the words a block ahead by hand, the ranks and rope rows left to Triton's
    # pipeliner (PREFETCH_ROWS=False: staged through shared memory, read there in the rotation's layout instead of
    # converted from registers). Offline, 4 bits: 471 instead of 517 instructions per block, 9 barriers instead of 13
    "round42": [*_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8),  # quantised as tuned (one head)
                *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8, PREFETCH_ROWS=False),
                *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, PREFETCH_ROWS=False),
                *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2),  # two heads as tuned
                *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2, PREFETCH_ROWS=False)],
    # round 44: one query head per KV head (MHA) with the query folded into the up rows (FOLD_QUERY): the block's MMA
    # gives the query's products with the keys per rotary pair, summed against the rope rows by one MMA against ones.
    # Offline (sm_90a, MHA): bf16 301 instead of 337 instructions per block, 170 instead of 185 registers (286 under a
    # 168-register cap at two stages: three programs per SM); 4 bits 433 instead of 471, 239 instead of 253 registers
    "round44": [*_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=False),  # as tuned
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True),
                *_grid(64, 4, 2, (3,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True,
                       MAX_REGISTERS=168)],
    "round44q": [*_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8, PREFETCH_ROWS=False, FOLD_QUERY=False),
                 *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8, PREFETCH_ROWS=False, FOLD_QUERY=True),
                 *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2, PREFETCH_ROWS=False,
                        FOLD_QUERY=False),  # 4 bits as tuned
                 *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2, PREFETCH_ROWS=False,
                        FOLD_QUERY=True),
                 *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2, FOLD_QUERY=True)],
    # round 45: bf16 MHA with the query folded (round 44: 266.3 against 275.6 us at 128K) reads its rope rows from L2 at
    # ~8 TB/s (each head's program reads them again): two KV heads per program read them once (offline: 477
    # instructions per block of two heads, 238 registers at two stages), 128-token tiles over 8 warps (307 per block)
    "round45": [*_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True),  # as tuned
                *_grid(64, 4, 2, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True,
                       HEADS_PER_PROGRAM=2),
                *_grid(64, 4, 3, (1,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True,
                       HEADS_PER_PROGRAM=2),
                *_grid(128, 8, 3, (1,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True),
                *_grid(128, 8, 2, (1,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=False),
                *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True)],  # again
    # round 46: the masks as unsigned comparisons, the scale in the folded query (offline, bf16 MHA: 293 instead of 301
    # instructions per block); two stages against three
    "round46": [*_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True),  # as tuned
                *_grid(64, 4, 2, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, FOLD_QUERY=True)],
    # Triton 3.9 (what a fresh install with the newest torch gets; the device's torch pins 3.6) compiles the quantised
    # loop to fewer registers without the hand prefetch (offline, 4 bits: 205-224 instead of 227-255): the quantised
    # settings and bf16's again under it (benchmarks/gpu_triton.sh sweep)
    "triton39q": [*_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8, PREFETCH_ROWS=False),  # as tuned (one head)
                  *_grid(64, 4, 2, (2,), rope_in_dtype=True, QUERY_TILE=8, PREFETCH_ROWS=False,
                         HEADS_PER_PROGRAM=2),  # as tuned for MHA
                  *_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                  *_grid(64, 4, 2, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, HEADS_PER_PROGRAM=2),
                  *_grid(64, 4, 4, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                  *_grid(64, 4, 2, (3,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8, MAX_REGISTERS=168)],
    "triton39b": [*_grid(64, 4, 3, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),  # as tuned
                  *_grid(64, 4, 2, (2,), prefetch=False, rope_in_dtype=True, QUERY_TILE=8),
                  *_grid(64, 4, 3, (2,), rope_in_dtype=True, QUERY_TILE=8)],
}


def max_error(hq, hkv, gs, ratio, bits, dev, T=2000, rope="rows"):
    """Largest |kernel - reference| at ``T`` tokens (the same compiled kernel as the timed case)."""
    case = latent_case(T, hq, hkv, gs, ratio, bits, dev, rope=rope)
    want = ref.latent_attention(**case).float()
    return (kernel.palu_decode(**case).float() - want).abs().max().item()


def sweep_rows(rec, dev, T, bits_list, shape="gqa", gs=1, ratio=0.5, grid="full", rope="rows"):
    """Settings of the decode kernel (module constants, ``GRIDS[grid]``) at one length, each checked
    against the reference at 2000 tokens (``max_err``); the defaults are restored."""
    hq, hkv = SHAPES[shape]
    t_dense, _ = dense_time(hq, hkv, T, dev)
    rec.add({"shape": shape, "tokens": T, "variant": "dense-sdpa", "us": t_dense * 1e6})
    with module_settings() as defaults:
        for bits in bits_list:
            case = latent_case(T, hq, hkv, gs, ratio, bits, dev, rope=rope)
            for values in GRIDS[grid] if isinstance(grid, str) else grid:
                for name, value in {**defaults, **values}.items():  # what a row does not name: the module's default
                    setattr(kernel, name, value)
                row = {"shape": shape, "tokens": T, "bits": bits or 16, "group_size": gs, "ratio": ratio,
                       "rope": rope,
                       **{name.lower(): value for name, value in values.items()}}
                try:
                    err = max_error(hq, hkv, gs, ratio, bits, dev, rope=rope) if dev == "cuda" else 0.0
                    t = c.graph_time(lambda: kernel.palu_decode(**case))
                except Exception as error:  # a setting that does not compile (resources)
                    rec.add({**row, "error": f"{type(error).__name__}: {str(error)[:200]}"})
                    continue
                rec.add({**row, "us": t * 1e6, "speedup": t_dense / t, "max_err": err,
                         "plan": kernel._CHOSEN.get(_plan_key(case))})
            del case


# -- time per output token of the 8B shape -------------------------------------------------------


def fill_palu(model, cache, tokens, chunk, dev):
    """Append ``tokens`` random latents per layer to a Palu cache, ``chunk`` at a time (what a chunked
    prefill leaves in it, without its compute)."""
    plans = [module._kvpress_method.plans[i] for i, module in enumerate(kvpress.adapters.describe(model).attention_modules)]
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        kvpress.cache.begin_forward(cache, None, 1, n, dev)
        for i, plan in enumerate(plans):
            hk = torch.randn(1, plan.groups, n, plan.k_up.shape[-1], device=dev, dtype=model.dtype)
            hv = torch.randn(1, plan.groups, n, plan.v_up.shape[-1], device=dev, dtype=model.dtype)
            cache.layers[i].update(hk, hv)
        kvpress.cache.end_forward(cache)


# name -> (method, options, decode): the dense baselines and Palu-50% (groups of one KV head) in eager
# and CUDA-graph decode
TPOT_VARIANTS = {
    "unpatched": (None, {}, "eager"),
    "palu-50": ("palu", dict(bits=None), "eager"),
    "palu-50-4bit": ("palu", dict(bits=4), "eager"),
    "dense-graph": ("dense", {}, "graph"),
    "palu-50-graph": ("palu", dict(bits=None), "graph"),
    "palu-50-4bit-graph": ("palu", dict(bits=4), "graph"),
    "palu-50-2bit-graph": ("palu", dict(bits=2), "graph"),
    "palu-50-3bit-graph": ("palu", dict(bits=3), "graph"),
}
PALU_50 = dict(rank_ratio=0.5, group_size=1, rank_multiple=32)


@torch.inference_mode()
def tpot_rows(rec, dev, lengths, smoke, steps=8, chunk=8 * c.K, names=tuple(TPOT_VARIANTS), kernels=False):
    model = c.build_model(dev, smoke=smoke)
    arg = c.cache_argument(model)
    for name in names:
        method, options, decode = TPOT_VARIANTS[name]
        t0 = time.perf_counter()
        if method is None:
            context = c.baseline_variant(model, name)
        else:
            extra = dict(PALU_50, **options) if method == "palu" else options
            context = c.kvpress_variant(model, method, decode=decode, **extra)
        with context as make_cache:
            print(f"{name}: patched in {time.perf_counter() - t0:.1f} s", flush=True)
            for L in lengths:
                cache = make_cache()
                if method == "palu":
                    fill_palu(model, cache, L, chunk, dev)
                else:
                    c.fill_cache(model, cache, L, chunk, dev)
                c._sync(dev)
                c._empty_cache(dev)
                c._reset_peak(dev)
                tok = torch.ones(1, 1, dtype=torch.long, device=dev)
                times = []
                for _ in range(steps + 3):
                    c._sync(dev)
                    t = time.perf_counter()
                    model(input_ids=tok, **{arg: cache}, use_cache=True, logits_to_keep=1)
                    c._sync(dev)
                    times.append(time.perf_counter() - t)
                times = sorted(times[3:])
                peak = c._peak(dev)
                runner = vars(model).get("_kvpress_graph")
                busy = c.gpu_busy(lambda: model(input_ids=tok, **{arg: cache}, use_cache=True, logits_to_keep=1)) \
                    if decode == "eager" else float("nan")
                step_kernels = c.gpu_kernels(lambda: model(input_ids=tok, **{arg: cache}, use_cache=True,
                                                           logits_to_keep=1)) if kernels else {}
                rec.add({"variant": name, "tokens": L, "decode": decode, "tpot_ms": times[len(times) // 2] * 1e3,
                         "gpu_ms_per_token": busy * 1e3, "peak_decode_GiB": peak / 2**30,
                         "kernels_us_per_token": {k: round(us, 1) for k, (us, _) in list(step_kernels.items())[:25]},
                         "launches_per_token": {k: count for k, (_, count) in list(step_kernels.items())[:25]},
                         "kv_GiB": kvpress.kv_cache_bytes(cache) / 2**30,
                         "graph_captures": None if runner is None else runner.captures,
                         "factors": "plain SVD of the random weights" if method == "palu" else None})
                del cache
                c._empty_cache(dev)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["layer", "sweep", "tpot"])
    parser.add_argument("--grid", default="full", choices=list(GRIDS), help="sweep: the settings to measure")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--shapes", nargs="*", default=["gqa", "mha"], choices=list(SHAPES))
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.25, 0.75])
    parser.add_argument("--bits", type=int, nargs="*", default=[16, 4], help="16 = unquantised latents")
    parser.add_argument("--variants", nargs="*", choices=list(TPOT_VARIANTS), help="tpot: the variants (default all)")
    parser.add_argument("--kernels", action="store_true", help="tpot: each step's kernels (torch profiler)")
    parser.add_argument("--tuning", nargs="*", default=[], help="sweep JSONs: run with the fastest settings")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON")
    parser.add_argument("--tag", default="", help="added to the JSON's name")
    parser.add_argument("--rope", default="rows", choices=["rows", "tables"],
                        help="layer, sweep: rope rows per slot (as the runtime keeps them) or tables gathered "
                             "by position")
    parser.add_argument("--smoke", action="store_true", help="tiny lengths on CPU (interpreter), checks the script")
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    default_lengths = {"layer": [64 * c.K, 128 * c.K], "sweep": [128 * c.K], "tpot": [64 * c.K, 128 * c.K]}
    lengths = args.lengths or default_lengths[args.part]
    bits = [None if b == 16 else b for b in args.bits]
    env = c.environment()
    path = None if args.smoke else args.out / f"palu_{args.part}{args.tag}_{c.device_tag(env)}.json"
    if args.tuning:
        kernel.TUNED.update(load_tuning(args.tuning))
        env = {**env, "kernel_tuned": {str(k): v for k, v in kernel.TUNED.items()}}
        print("kernel settings:", kernel.TUNED, flush=True)
    rec = Recorder(path, env)
    try:
        if args.part == "layer":
            layer_rows(rec, dev, [256] if args.smoke else lengths, args.shapes, args.group_sizes, args.ratios, bits,
                       args.rope)
            c.table("Palu decode attention, one layer", [r for r in rec.rows if "us" in r],
                    [("shape", "{}"), ("tokens", "{}"), ("variant", "{}"), ("us", "{:.1f}"), ("speedup", "{:.2f}x")])
        elif args.part == "sweep":
            if args.smoke:
                sweep_rows(rec, dev, 256, bits, grid=[*_grid(16, 4, 1, (1,)), *_grid(16, 4, 1, (1,), prefetch=False)])
            else:
                sweep_rows(rec, dev, lengths[-1], bits, shape=args.shapes[0], grid=args.grid,
                           rope=args.rope)
        else:
            tpot_rows(rec, dev, [1024] if args.smoke else lengths, args.smoke, steps=2 if args.smoke else 8,
                      chunk=512 if args.smoke else 8 * c.K, names=args.variants or tuple(TPOT_VARIANTS),
                      kernels=args.kernels)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        print(f"palu {args.part}: {len(rec.rows)} rows" + (f" -> {path}" if path else ""), flush=True)


if __name__ == "__main__":
    main()
