"""Triton kernels of MInference 1.0 (Jiang et al., arXiv 2407.02490) sparse prefill, GQA-native.

Each kernel computes, exactly, attention under an index built by ``minference_reference``
(``vs_index`` / ``block_index``; read that module's docstring for the patterns' definitions), with
the online softmax of FlashAttention (Dao et al., arXiv 2205.14135). One program = one 64-rank
query block of one query head: K/V are read from the head's KV head in place (never repeated).
Query blocks are aligned in *rank* space (``64 * (rank // 64)``), so padding never shifts them.

* :func:`vs_attention`: the chosen diagonals, merged into *runs* (sorted offsets whose gaps are
  <= 64 make one contiguous key range per query block: ``[base - last, base - first + 63]``), are
  cut once per head into 64-key *tiles* in distance space (``base - key``), the same for every
  query block; a program walks the tiles at or below its block in one flat, software-pipelined
  loop (no loop per run, so no short inner loops that the pipeliner cannot overlap), then gathers
  the chosen columns 64 at a time, skipping any column that a chosen diagonal range already
  covers (a prefix count over chosen offsets answers that with two loads), so no key is counted
  twice. :func:`vs_prepare` builds these tables and :func:`vs_work` counts the tiles a launch
  runs (the work the benchmark divides by the time).
* :func:`vs_union_attention`: the same attention with one program per query block and *unit* of
  2 or 4 query heads of a KV head: the unit walks the union of its heads' indices once, each K/V
  tile read once for the unit's ``64 * per`` query rows (a taller tile, as the A-shape kernel
  does for whole KV groups), each head masked to its own index (its offset counts and column bits),
  so the result is the same.
* :func:`block_sparse_attention`: the kept 64-key blocks of each query block.

The A-shape pattern is served by ``prefill.prefill_attention`` (``sink``/``recent``).

Per-query-head programs vs a union per KV group (measured on the H200, one Llama-3-8B-shaped
layer, ``rope`` inputs, ``benchmarks/results/minference_layer_1m_NVIDIA_H200.json``): the union
of the 4 heads of a KV head runs 1.06-1.71x the per-head tiles for VS (1000, 6096) on every head
and 1.53-2.40x for the reference's published Llama-3-8B mix (32K-512K: the heads share the near
diagonals and many columns, not the scattered diagonals). Even a union kernel at dense SDPA's
FLOP/s would gain at most 1.5x (default, 128K) and lose for the published mix from 256K; the union
kernel here runs 0.62-0.70x the per-head kernel's throughput per tile for units of 2 heads and
0.33x for 4 (not profiled: its per-row masks and taller tiles cost more than the shared K/V loads
save), so it is slower in every measured case (128K: 337 / 799 ms vs 200 ms, default; 275 / 694 ms vs 119 ms,
published). The runtime therefore uses per-query-head programs (``MInferenceConfig.union_heads =
1``); the union kernel stays as an exact option (2, 4).

Programs run heaviest query block first (the last block of a head has the most keys),
consecutive programs are consecutive query blocks of one head, whose diagonal ranges are the same
keys shifted by 64, so K/V tiles are mostly read from L2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import OPTIONS
from .minference_reference import BLOCK, SENTINEL, first_query_block, query_blocks

NO_LIMIT = 1 << 30
BLOCK_N = 64  # keys per tile (= BLOCK: a diagonal range and a key block are one tile wide)
NUM_WARPS = 4
NUM_STAGES = 3  # Hopper: 3 stages of a 64x128 bf16 K and V tile = 96 KiB of shared memory
UNION_WARPS = 4  # per head of a unit (vs_union_attention: a 64 * per-row query tile)


@triton.jit
def _attend(acc, l_i, m_i, q, qr, K, V, kidx, kr, keep, stride_kn, stride_vn, qk_scale, window,
            BLOCK_D: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr = True):
    """One online-softmax step over the keys at tensor rows ``kidx`` (ranks ``kr``, used where
    ``keep``); scores in log2 units. Causal and window masks come from the ranks; ``CAUSAL=False``
    (keys before every query of the tile, no window) masks by ``keep`` alone, one select per score."""
    return _attend_rows(acc, l_i, m_i, q, qr, K, V, kidx, kr, keep, keep[None, :], stride_kn, stride_vn,
                        qk_scale, window, BLOCK_D, D, CAUSAL)


@triton.jit
def _setup(Q, LAYOUT, HEADS, b, slot, m, stride_qb, stride_qh, stride_qm,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Query tile of query block ``m`` of row ``b`` for the head in ``HEADS[slot]``."""
    head = tl.load(HEADS + slot)
    q_shift = tl.load(LAYOUT + b * 5)
    k_shift = tl.load(LAYOUT + b * 5 + 1)
    q_lo = tl.load(LAYOUT + b * 5 + 2)
    q_hi = tl.load(LAYOUT + b * 5 + 3)
    base = (tl.load(LAYOUT + b * 5 + 4) + m) * BLOCK_M
    rank = base + tl.arange(0, BLOCK_M)
    row_ok = (rank >= q_lo) & (rank <= q_hi)
    qr = tl.where(row_ok, rank, -1)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    # int64 offsets: head * stride_qh alone passes 2**31 elements at 1M tokens x 32 heads
    q_off = (b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
             + (rank + q_shift)[:, None].to(tl.int64) * stride_qm + offs_d[None, :])
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    return head, k_shift, q_hi, base, qr, q, q_off, q_mask


@triton.jit
def _finish(Out, acc, l_i, q_off, q_mask):
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=q_mask)


@triton.jit
def _vs_kernel(Q, K, V, Out, LAYOUT, HEADS, TILE_LO, TILE_HI, NTILE, VERT, NVERT, COUNT,
               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, n_slots, n_qblocks, n_tiles, n_vert, count_w,
               qk_scale, window,
               G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, D: tl.constexpr, WINDOWED: tl.constexpr):
    m = n_qblocks - 1 - tl.program_id(0)  # heaviest (last) query block first
    pid = tl.program_id(1)
    b = pid // n_slots
    slot = pid % n_slots
    head, k_shift, q_hi, base, qr, q, q_off, q_mask = _setup(
        Q, LAYOUT, HEADS, b, slot, m, stride_qb, stride_qh, stride_qm, BLOCK_M, BLOCK_D, D)
    K += b.to(tl.int64) * stride_kb + (head // G).to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + (head // G).to(tl.int64) * stride_vh
    hb = b * n_slots + slot
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # Diagonal tiles: distances [d_lo, d_hi] (d_hi - d_lo < BLOCK_N) are key ranks [base - d_hi, base - d_lo].
    # Tiles ascend in distance and only the first can reach below distance 0 (runs are > 64 apart):
    # every other tile's keys precede the block's first query, so it needs no causal mask.
    TILE_LO += hb * n_tiles
    TILE_HI += hb * n_tiles
    n_t = tl.load(NTILE + hb * n_qblocks + m)
    n_near = tl.minimum(n_t, (tl.load(TILE_LO) < 0).to(tl.int32))
    for t in range(0, n_near):
        kr, keep = _diagonal_keys(TILE_LO, TILE_HI, t, base, q_hi, offs_n)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, qr, K, V, kr + k_shift, kr, keep,
                                stride_kn, stride_vn, qk_scale, window, BLOCK_D, D)
    for t in range(n_near, n_t):
        kr, keep = _diagonal_keys(TILE_LO, TILE_HI, t, base, q_hi, offs_n)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, qr, K, V, kr + k_shift, kr, keep,
                                stride_kn, stride_vn, qk_scale, window, BLOCK_D, D, WINDOWED)

    # Columns not covered by a chosen diagonal range: offsets in [d, d + 63] with d = base - j.
    # At most 64 of the block's nv columns (ascending) lie in the block itself: the chunks before
    # the last nv - 64 columns precede every query of the block and need no causal mask.
    COUNT += hb * count_w
    nv = tl.load(NVERT + hb * n_qblocks + m)
    n_far = tl.maximum(nv - BLOCK_M, 0) // BLOCK_N * BLOCK_N
    for c0 in range(0, n_far, BLOCK_N):
        col, keep = _columns(VERT + hb * n_vert, COUNT, c0 + offs_n, nv, n_vert, base, q_hi, count_w, BLOCK_M)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, qr, K, V, col + k_shift, col, keep,
                                stride_kn, stride_vn, qk_scale, window, BLOCK_D, D, WINDOWED)
    for c0 in range(n_far, nv, BLOCK_N):
        col, keep = _columns(VERT + hb * n_vert, COUNT, c0 + offs_n, nv, n_vert, base, q_hi, count_w, BLOCK_M)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, qr, K, V, col + k_shift, col, keep,
                                stride_kn, stride_vn, qk_scale, window, BLOCK_D, D)
    _finish(Out, acc, l_i, q_off, q_mask)


@triton.jit
def _diagonal_keys(TILE_LO, TILE_HI, t, base, q_hi, offs_n):
    """Key ranks of diagonal tile ``t`` for the query block at rank ``base`` and which of them exist
    (from rank 0 to the tile's near end, at most the last query's rank)."""
    k_hi = tl.minimum(base - tl.load(TILE_LO + t), q_hi)
    kr = base - tl.load(TILE_HI + t) + offs_n
    return kr, (kr >= 0) & (kr <= k_hi)


@triton.jit
def _columns(VERT, COUNT, ci, nv, n_vert, base, q_hi, count_w, BLOCK_M: tl.constexpr):
    """Chosen columns ``ci`` of a head and which of them to attend: in range, causal for the block's
    last row, and not inside a chosen diagonal range (the offset counts at ``d`` and ``d + 64``)."""
    col = tl.load(VERT + ci, mask=ci < n_vert, other=0)
    d = base - col
    below = tl.load(COUNT + tl.minimum(tl.maximum(d, 0), count_w - 1))
    upto = tl.load(COUNT + tl.minimum(tl.maximum(d + BLOCK_M, 0), count_w - 1))
    return col, (ci < nv) & (col <= q_hi) & (upto == below)


@triton.jit
def _block_kernel(Q, K, V, Out, LAYOUT, HEADS, BLOCKS,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, n_slots, n_qblocks, n_keep,
                  qk_scale, window,
                  G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, D: tl.constexpr):
    m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // n_slots
    slot = pid % n_slots
    head, k_shift, q_hi, base, qr, q, q_off, q_mask = _setup(
        Q, LAYOUT, HEADS, b, slot, m, stride_qb, stride_qh, stride_qm, BLOCK_M, BLOCK_D, D)
    K += b.to(tl.int64) * stride_kb + (head // G).to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + (head // G).to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    BLOCKS += ((b * n_slots + slot) * n_qblocks + m) * n_keep
    for i in range(0, n_keep):
        kb = tl.load(BLOCKS + i)
        if kb >= 0:
            kr = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qr, K, V, kr + k_shift, kr, kr <= q_hi,
                                    stride_kn, stride_vn, qk_scale, window, BLOCK_D, D)
    _finish(Out, acc, l_i, q_off, q_mask)


@triton.jit
def _attend_rows(acc, l_i, m_i, q, qr, K, V, kidx, kr, load_ok, keep, stride_kn, stride_vn, qk_scale, window,
                 BLOCK_D: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr = True):
    """``_attend`` with a keep mask per (row, key) ``keep [M, N]``: rows of different query heads
    keep different keys of the same tile; ``load_ok [N]``: keys loaded (some row keeps them)."""
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        kv_mask = load_ok[:, None]
    else:
        kv_mask = load_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + kidx[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k))
    if CAUSAL:
        dist = qr[:, None] - kr[None, :]
        ok = keep & (qr[:, None] >= 0) & (dist >= 0) & (dist < window)
    else:  # padding query rows compute something finite that is never stored
        ok = keep
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_safe[:, None])  # the scale in one multiply-add with the max
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(V + kidx[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _vs_union_kernel(Q, K, V, Out, LAYOUT, HEADS, SLOTS, TILE_LO, TILE_HI, NTILE, VERT, NVERT, COUNT, VBITS,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, n_units, n_slots, n_qblocks, n_tiles, n_vert, count_w, bits_w,
                     qk_scale, window,
                     G: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, D: tl.constexpr):
    """One program = one 64-rank query block of ``P`` query heads of one KV head (a *unit*): the
    ``P * 64`` query rows walk the union of the heads' indices once (K/V tiles read once for the
    ``P`` heads), each row keeping exactly its own head's keys (per-head offset counts and column
    bits), so the result equals ``_vs_kernel``'s."""
    m = n_qblocks - 1 - tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // n_units
    unit = pid % n_units
    offs_r = tl.arange(0, P * BLOCK_M)
    part = offs_r // BLOCK_M  # which head of the unit a row belongs to
    head = tl.load(HEADS + unit * P + part)  # [P * 64], -1 where the unit has fewer heads
    q_shift = tl.load(LAYOUT + b * 5)
    k_shift = tl.load(LAYOUT + b * 5 + 1)
    q_lo = tl.load(LAYOUT + b * 5 + 2)
    q_hi = tl.load(LAYOUT + b * 5 + 3)
    base = (tl.load(LAYOUT + b * 5 + 4) + m) * BLOCK_M
    rank = base + offs_r % BLOCK_M
    row_ok = (rank >= q_lo) & (rank <= q_hi) & (head >= 0)
    qr = tl.where(row_ok, rank, -1)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q_off = (b.to(tl.int64) * stride_qb + tl.maximum(head, 0).to(tl.int64)[:, None] * stride_qh
             + (rank + q_shift)[:, None].to(tl.int64) * stride_qm + offs_d[None, :])
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    kv_head = tl.load(HEADS + unit * P) // G
    K += b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    acc = tl.zeros([P * BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([P * BLOCK_M], dtype=tl.float32)
    m_i = tl.full([P * BLOCK_M], float("-inf"), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    hu = b * n_units + unit

    # Union diagonal tiles; a key is kept for a row when its own head has an offset in [d, d + 63].
    TILE_LO += hu * n_tiles
    TILE_HI += hu * n_tiles
    for t in range(0, tl.load(NTILE + hu * n_qblocks + m)):
        k_lo = base - tl.load(TILE_HI + t)
        k_hi = tl.minimum(base - tl.load(TILE_LO + t), q_hi)
        kr = k_lo + offs_n
        load_ok = (kr >= 0) & (kr <= k_hi)
        d = base - kr
        keep = tl.zeros([P * BLOCK_M, BLOCK_N], dtype=tl.int1)
        for i in tl.static_range(P):
            slot = tl.load(SLOTS + unit * P + i)
            cnt = COUNT + (b * n_slots + tl.maximum(slot, 0)).to(tl.int64) * count_w
            below = tl.load(cnt + tl.minimum(tl.maximum(d, 0), count_w - 1))
            upto = tl.load(cnt + tl.minimum(tl.maximum(d + BLOCK_M, 0), count_w - 1))
            mine = load_ok & (upto > below) & (slot >= 0)
            keep = keep | ((part[:, None] == i) & mine[None, :])
        acc, l_i, m_i = _attend_rows(acc, l_i, m_i, q, qr, K, V, kr + k_shift, kr, load_ok, keep,
                                     stride_kn, stride_vn, qk_scale, window, BLOCK_D, D)

    # Union columns; kept for a row when they are its head's column and not in its diagonal ranges.
    nv = tl.load(NVERT + hu * n_qblocks + m)
    for c0 in range(0, nv, BLOCK_N):
        ci = c0 + offs_n
        col = tl.load(VERT + hu * n_vert + ci, mask=ci < n_vert, other=0)
        load_ok = (ci < nv) & (col <= q_hi)
        d = base - col
        keep = tl.zeros([P * BLOCK_M, BLOCK_N], dtype=tl.int1)
        for i in tl.static_range(P):
            slot = tl.load(SLOTS + unit * P + i)
            row = (b * n_slots + tl.maximum(slot, 0)).to(tl.int64)
            cnt = COUNT + row * count_w
            below = tl.load(cnt + tl.minimum(tl.maximum(d, 0), count_w - 1))
            upto = tl.load(cnt + tl.minimum(tl.maximum(d + BLOCK_M, 0), count_w - 1))
            bit = tl.load(VBITS + row * bits_w + tl.minimum(tl.maximum(col, 0), bits_w - 1))
            mine = load_ok & (bit != 0) & (upto == below) & (slot >= 0)
            keep = keep | ((part[:, None] == i) & mine[None, :])
        acc, l_i, m_i = _attend_rows(acc, l_i, m_i, q, qr, K, V, col + k_shift, col, load_ok, keep,
                                     stride_kn, stride_vn, qk_scale, window, BLOCK_D, D)
    _finish(Out, acc, l_i, q_off, q_mask)


# ----------------------------------------------------------------------------------------------
# Host side


def layout(q_rank: torch.Tensor, k_rank: torch.Tensor) -> torch.Tensor:
    """``[B, 5]`` int32 per row: tensor row minus rank for queries and keys (left padding: real
    tokens are contiguous and last), first and last real query rank, first query rank block."""
    Lq, T = q_rank.shape[1], k_rank.shape[1]
    last_q, last_k = q_rank[:, -1].long(), k_rank[:, -1].long()
    q_lo = torch.where(q_rank >= 0, q_rank.long(), SENTINEL).amin(-1)
    return torch.stack([(Lq - 1) - last_q, (T - 1) - last_k, q_lo, last_q, first_query_block(q_rank)],
                       -1).int().contiguous()


def slash_runs(slash: torch.Tensor):
    """Runs of sorted offsets ``slash [B, H, NS]`` (``SENTINEL``-padded) with gaps <= 64:
    ``(run_lo, run_hi)`` ``[B, H, NS]`` int32, ascending, ``SENTINEL``-padded."""
    s = slash.long()
    valid = s < SENTINEL
    gap = s[..., 1:] - s[..., :-1] > BLOCK
    true = torch.ones_like(s[..., :1], dtype=torch.bool)
    starts = torch.cat([true, gap], -1) & valid
    ends = torch.cat([gap, true], -1) & valid  # the last valid entry is followed by SENTINEL: gap
    run_lo = torch.where(starts, s, SENTINEL).sort(-1).values
    run_hi = torch.where(ends, s, SENTINEL).sort(-1).values
    return run_lo.int().contiguous(), run_hi.int().contiguous()


def slash_tiles(slash: torch.Tensor):
    """64-key tiles of the diagonal ranges of ``slash [B, H, NS]``, in distance space.

    A run of offsets ``[o1, o2]`` covers the distances ``base - key`` in ``[o1 - 63, o2]`` for every
    query block; it is cut into ``BLOCK_N``-wide tiles from its near end. Returns ``(tile_lo,
    tile_hi)`` ``[B, H, NT]`` int32 (smallest and largest distance of each tile, ``tile_hi -
    tile_lo < BLOCK_N``), ascending, ``SENTINEL``-padded. One host sync (the longest tile list).
    """
    run_lo, run_hi = slash_runs(slash)
    valid = run_lo < SENTINEL
    d_lo = run_lo.long() - (BLOCK - 1)
    d_hi = run_hi.long()
    n = torch.where(valid, (d_hi - d_lo + BLOCK_N) // BLOCK_N, 0)  # tiles per run
    ends = n.cumsum(-1).contiguous()
    per_head = ends[..., -1:]
    nt = max(1, int(per_head.max()))
    j = torch.arange(nt, device=slash.device).expand(*slash.shape[:2], nt).contiguous()
    r = torch.searchsorted(ends, j, right=True).clamp(max=n.shape[-1] - 1)  # the run of tile j
    lo = d_lo.gather(-1, r) + BLOCK_N * (j - (ends - n).gather(-1, r))
    hi = torch.minimum(lo + BLOCK_N - 1, d_hi.gather(-1, r))
    used = j < per_head
    return (torch.where(used, lo, SENTINEL).int().contiguous(),
            torch.where(used, hi, SENTINEL).int().contiguous())


def offset_counts(slash: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, T + 65]`` int32: ``count[x]`` = chosen offsets below ``x``."""
    width = T + BLOCK + 1
    ind = torch.zeros(*slash.shape[:2], width + 1, dtype=torch.int32, device=slash.device)
    ind.scatter_(2, slash.long().clamp(max=width), 1)
    return F.pad(ind[..., :-1].cumsum(-1, dtype=torch.int32), (1, 0))[..., :width].contiguous()


def _launch_args(q, k, v, out):
    for t in (q, k, v, out):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))


def _heads(heads, n, device):
    if heads is None:
        return torch.arange(n, device=device, dtype=torch.int32)
    return heads.to(device=device, dtype=torch.int32).contiguous()


class VSPlan(NamedTuple):
    """What :func:`vs_attention` launches with (built by :func:`vs_prepare`; ``n`` heads, ``NQB``
    query blocks)."""

    layout: torch.Tensor  # [B, 5] int32, see layout()
    tile_lo: torch.Tensor  # [B, n, NT] int32, slash_tiles()
    tile_hi: torch.Tensor  # [B, n, NT] int32
    n_tile: torch.Tensor  # [B, n, NQB] int32: diagonal tiles at or below each query block
    vertical: torch.Tensor  # [B, n, NV] int32 key ranks, ascending
    n_vert: torch.Tensor  # [B, n, NQB] int32: columns at or below each query block
    count: torch.Tensor  # [B, n, T + 65] int32, offset_counts()


def vs_prepare(q_rank, k_rank, vertical, slash, counts=True) -> VSPlan:
    """The tile tables of a VS index (``vs_index``) for queries ``q_rank`` and keys ``k_rank``
    (``counts=False``: without ``count``, which only ``vs_attention`` reads)."""
    B, Lq = q_rank.shape
    n, T = vertical.shape[1], k_rank.shape[1]
    lay = layout(q_rank, k_rank)
    nqb = query_blocks(Lq)
    base = (lay[:, 4:5].long() + torch.arange(nqb, device=q_rank.device)) * BLOCK  # [B, NQB]
    empty = ((base + BLOCK - 1 < lay[:, 2:3]) | (base > lay[:, 3:4]))[:, None]  # no query in the block
    tile_lo, tile_hi = slash_tiles(slash)
    vertical = vertical.int().contiguous()
    n_tile = torch.searchsorted(tile_lo, base[:, None].expand(B, n, nqb).int().contiguous(), right=True)
    limit = (base + BLOCK - 1)[:, None].expand(B, n, nqb).int().contiguous()
    n_vert = torch.searchsorted(vertical, limit, right=True)
    return VSPlan(lay, tile_lo, tile_hi, n_tile.masked_fill(empty, 0).int(), vertical,
                  n_vert.masked_fill(empty, 0).int(), offset_counts(slash, T) if counts else None)


def vs_work(plan: VSPlan) -> dict:
    """Work of one :func:`vs_attention` launch: 64-key tiles run (diagonal, column) and the query
    blocks that run them. One tile is ``4 * 64 * BLOCK_N * D`` FLOPs (QK^T and PV)."""
    diagonal = int(plan.n_tile.sum())
    columns = int(((plan.n_vert + BLOCK_N - 1) // BLOCK_N).sum())
    widths = (plan.tile_hi - plan.tile_lo + 1).masked_fill(plan.tile_lo == SENTINEL, 0).long()
    keys = torch.cat([torch.zeros_like(widths[..., :1]), widths.cumsum(-1)], -1).gather(-1, plan.n_tile.long())
    blocks = int(((plan.n_tile > 0) | (plan.n_vert > 0)).sum())
    return {"diagonal_tiles": diagonal, "column_tiles": columns, "query_blocks": blocks,
            "diagonal_keys": int(keys.sum())}  # keys in the diagonal tiles (those below rank 0 included)


def vs_attention(q, k, v, q_rank, k_rank, vertical, slash, scale, window=None, heads=None, out=None, plan=None):
    """Triton version of ``minference_reference.vs_attention``.

    ``vertical [B, n, NV]`` / ``slash [B, n, NS]``: the VS index (``vs_index``) of the query heads
    ``heads [n]`` (indices into ``q``'s head axis; default all). Only those heads of ``out``
    (default: zeros like ``q``) are written. ``plan``: :func:`vs_prepare` of the same index (built
    here when None). Returns ``out``.
    """
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    heads = _heads(heads, Hq, q.device)
    out = torch.zeros_like(q) if out is None else out
    n = heads.shape[0]
    if n == 0 or Lq == 0:
        return out
    plan = vs_prepare(q_rank, k_rank, vertical, slash) if plan is None else plan
    nqb = plan.n_tile.shape[-1]
    grid = (nqb, B * n)
    _vs_kernel[grid](
        q, k, v, out, plan.layout, heads, plan.tile_lo, plan.tile_hi, plan.n_tile, plan.vertical,
        plan.n_vert, plan.count,
        *_launch_args(q, k, v, out), n, nqb, plan.tile_lo.shape[-1], plan.vertical.shape[-1],
        plan.count.shape[-1], scale * 1.4426950408889634, window if window is not None else NO_LIMIT,
        G=Hq // Hkv, BLOCK_M=BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D), D=D,
        WINDOWED=window is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **OPTIONS,
    )
    return out



def union_units(heads: list[int], group: int, per: int) -> list[list[int]]:
    """Positions in ``heads`` (query heads) cut into units of at most ``per`` heads of one KV head."""
    by_kv: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        by_kv.setdefault(h // group, []).append(i)
    return [pos[s:s + per] for pos in by_kv.values() for s in range(0, len(pos), per)]


def union_of(index: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``index [B, n, N]`` (ascending, ``SENTINEL``-padded) united over each unit's rows (``units
    [U, P]``, -1 = none): ``[B, U, N']`` ascending, ``SENTINEL``-padded."""
    B, _, N = index.shape
    padded = torch.cat([index, torch.full_like(index[:, :1], SENTINEL)], 1)  # row n: nothing
    rows = torch.where(units >= 0, units, index.shape[1]).long()
    x = padded[:, rows.flatten()].view(B, units.shape[0], -1).long().sort(-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = x.masked_fill(dup, SENTINEL).sort(-1).values
    return x.int().contiguous()


class UnionPlan(NamedTuple):
    """What :func:`vs_union_attention` launches with (built by :func:`union_prepare`)."""

    table: torch.Tensor  # [U, P] int32: positions in ``heads`` of each unit's heads, -1 = none
    unit_heads: torch.Tensor  # [U, P] int32: the query heads themselves, -1 = none
    plan: VSPlan  # the tile tables of the units' union indices (no ``count``)
    count: torch.Tensor  # [B, n, T + 65] int32: each head's own offset counts
    bits: torch.Tensor  # [B, n, T + 1] int8: each head's own columns (by key rank)


def union_prepare(q_rank, k_rank, vertical, slash, heads: torch.Tensor, group: int, per: int) -> UnionPlan:
    """Units of ``per`` heads of a KV head (:func:`union_units`), their union indices' tile tables
    and each head's own membership tables, for the VS index ``vertical`` / ``slash`` of ``heads``."""
    B, n, T = vertical.shape[0], vertical.shape[1], k_rank.shape[1]
    units = union_units(heads.tolist(), group, per)
    table = torch.tensor([u + [-1] * (per - len(u)) for u in units], dtype=torch.int32, device=vertical.device)
    unit_heads = torch.where(table >= 0, heads.to(vertical.device)[table.clamp(min=0).long()], -1).int().contiguous()
    plan = vs_prepare(q_rank, k_rank, union_of(vertical, table), union_of(slash, table), counts=False)
    bits = torch.zeros(B, n, T + 1, dtype=torch.int8, device=vertical.device)
    bits.scatter_(2, vertical.long().clamp(max=T), 1)
    return UnionPlan(table, unit_heads, plan, offset_counts(slash, T), bits)


def tiles_run(plan: VSPlan) -> torch.Tensor:
    """64-key tiles a launch over ``plan`` runs per 64-row query tile (diagonal + column tiles), summed."""
    return plan.n_tile.long().sum() + ((plan.n_vert.long() + BLOCK_N - 1) // BLOCK_N).sum()


def vs_union_attention(q, k, v, q_rank, k_rank, vertical, slash, scale, window=None, heads=None, out=None, per=2,
                       prepared: UnionPlan | None = None):
    """:func:`vs_attention` with one program per query block and *unit* of ``per`` query heads of a
    KV head (``_vs_union_kernel``): the unit walks the union of its heads' indices, reading each K/V
    tile once for them in a ``per * 64``-row tile, every head masked to its own index. Equal to
    :func:`vs_attention`; faster where the heads of a unit choose mostly the same keys (the union
    is little more than each), slower where they do not (every head pays the union's keys).
    ``prepared``: :func:`union_prepare` of the same index and ``per`` (built here when None)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    heads = _heads(heads, Hq, q.device)
    out = torch.zeros_like(q) if out is None else out
    n = heads.shape[0]
    if n == 0 or Lq == 0:
        return out
    u = union_prepare(q_rank, k_rank, vertical, slash, heads, Hq // Hkv, per) if prepared is None else prepared
    per = u.table.shape[1]
    nqb = u.plan.n_tile.shape[-1]
    grid = (nqb, B * u.table.shape[0])
    _vs_union_kernel[grid](
        q, k, v, out, u.plan.layout, u.unit_heads, u.table, u.plan.tile_lo, u.plan.tile_hi, u.plan.n_tile,
        u.plan.vertical, u.plan.n_vert, u.count, u.bits,
        *_launch_args(q, k, v, out), u.table.shape[0], n, nqb, u.plan.tile_lo.shape[-1], u.plan.vertical.shape[-1],
        u.count.shape[-1], u.bits.shape[-1], scale * 1.4426950408889634, window if window is not None else NO_LIMIT,
        G=Hq // Hkv, P=per, BLOCK_M=BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D), D=D,
        num_warps=min(16, UNION_WARPS * per), num_stages=NUM_STAGES, **OPTIONS,
    )
    return out


def block_sparse_attention(q, k, v, q_rank, k_rank, blocks, scale, window=None, heads=None, out=None):
    """Triton version of ``minference_reference.block_sparse_attention``; ``blocks [B, n, NQB, K]``
    (``block_index``) for the query heads ``heads [n]`` (default all); writes those heads of ``out``."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    heads = _heads(heads, Hq, q.device)
    out = torch.zeros_like(q) if out is None else out
    n = heads.shape[0]
    if n == 0 or Lq == 0:
        return out
    blocks = blocks.int().contiguous()
    nqb = blocks.shape[2]
    grid = (nqb, B * n)
    _block_kernel[grid](
        q, k, v, out, layout(q_rank, k_rank), heads, blocks,
        *_launch_args(q, k, v, out), n, nqb, blocks.shape[-1],
        scale * 1.4426950408889634, window if window is not None else NO_LIMIT,
        G=Hq // Hkv, BLOCK_M=BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D), D=D,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, **OPTIONS,
    )
    return out
