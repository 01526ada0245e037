"""Triton kernels of MInference 1.0 (Jiang et al., arXiv 2407.02490) sparse prefill, GQA-native.

Each kernel computes, exactly, attention under an index built by ``minference_reference``
(``vs_index`` / ``block_index``; read that module's docstring for the patterns' definitions), with
the online softmax of FlashAttention (Dao et al., arXiv 2205.14135). One program = one 64-rank
query block of one query head: K/V are read from the head's KV head in place (never repeated).
Query blocks are aligned in *rank* space (``64 * (rank // 64)``), so padding never shifts them.

* :func:`vs_attention`: the chosen diagonals, merged into *runs* (sorted offsets whose gaps are
  <= 64 make one contiguous key range per query block: ``[base - last, base - first + 63]``), are
  read as key ranges in 64-key tiles, then the chosen columns are gathered 64 at a time, skipping
  any column that a chosen diagonal range already covers (a prefix count over chosen offsets
  answers that with two loads), so no key is counted twice.
* :func:`block_sparse_attention`: the kept 64-key blocks of each query block.

The A-shape pattern is served by ``prefill.prefill_attention`` (``sink``/``recent``).

Per-query-head programs (not one union index per KV group): a head's cost is its own budget, and
the G heads of a KV head read the same K/V tiles close in time, mostly from L2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .minference_reference import BLOCK, SENTINEL, first_query_block, query_blocks

NO_LIMIT = 1 << 30
BLOCK_N = 64  # keys per tile (= BLOCK: a diagonal range and a key block are one tile wide)
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _attend(acc, l_i, m_i, q, qr, K, V, kidx, kr, keep, stride_kn, stride_vn, qk_scale, window,
            BLOCK_D: tl.constexpr, D: tl.constexpr):
    """One online-softmax step over the keys at tensor rows ``kidx`` (ranks ``kr``, used where
    ``keep``); scores in log2 units. Causal and window masks come from the ranks."""
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        kv_mask = keep[:, None]
    else:
        kv_mask = keep[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + kidx[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    dist = qr[:, None] - kr[None, :]
    ok = keep[None, :] & (qr[:, None] >= 0) & (dist >= 0) & (dist < window)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(V + kidx[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


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
def _vs_kernel(Q, K, V, Out, LAYOUT, HEADS, RUN_LO, RUN_HI, NRUN, VERT, NVERT, COUNT,
               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, n_slots, n_qblocks, n_runs, n_vert, count_w,
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
    hb = b * n_slots + slot
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # Diagonal runs: the run of offsets [o1, o2] covers key ranks [base - o2, base - o1 + 63].
    for r in range(0, tl.load(NRUN + hb * n_qblocks + m)):
        o1 = tl.load(RUN_LO + hb * n_runs + r)
        o2 = tl.load(RUN_HI + hb * n_runs + r)
        lo = tl.maximum(base - o2, 0)
        hi = tl.minimum(base - o1 + BLOCK_M - 1, q_hi)
        for n0 in range(lo, hi + 1, BLOCK_N):
            kr = n0 + offs_n
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qr, K, V, kr + k_shift, kr, kr <= hi,
                                    stride_kn, stride_vn, qk_scale, window, BLOCK_D, D)

    # Columns not covered by a chosen diagonal range: offsets in [d, d + 63] with d = base - j.
    COUNT += hb * count_w
    nv = tl.load(NVERT + hb * n_qblocks + m)
    for c0 in range(0, nv, BLOCK_N):
        ci = c0 + offs_n
        col = tl.load(VERT + hb * n_vert + ci, mask=ci < n_vert, other=0)
        d = base - col
        below = tl.load(COUNT + tl.minimum(tl.maximum(d, 0), count_w - 1))
        upto = tl.load(COUNT + tl.minimum(tl.maximum(d + BLOCK_M, 0), count_w - 1))
        keep = (ci < nv) & (col <= q_hi) & (upto == below)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, qr, K, V, col + k_shift, col, keep,
                                stride_kn, stride_vn, qk_scale, window, BLOCK_D, D)
    _finish(Out, acc, l_i, q_off, q_mask)


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


def vs_attention(q, k, v, q_rank, k_rank, vertical, slash, scale, window=None, heads=None, out=None):
    """Triton version of ``minference_reference.vs_attention``.

    ``vertical [B, n, NV]`` / ``slash [B, n, NS]``: the VS index (``vs_index``) of the query heads
    ``heads [n]`` (indices into ``q``'s head axis; default all). Only those heads of ``out``
    (default: zeros like ``q``) are written. Returns ``out``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    heads = _heads(heads, Hq, q.device)
    out = torch.zeros_like(q) if out is None else out
    n = heads.shape[0]
    if n == 0 or Lq == 0:
        return out
    lay = layout(q_rank, k_rank)
    nqb = query_blocks(Lq)
    base = (lay[:, 4:5].long() + torch.arange(nqb, device=q.device)) * BLOCK  # [B, NQB]
    limit = (base + BLOCK - 1)[:, None].expand(B, n, nqb).contiguous()
    empty = ((base + BLOCK - 1 < lay[:, 2:3]) | (base > lay[:, 3:4]))[:, None]  # no query in the block
    run_lo, run_hi = slash_runs(slash)
    vertical = vertical.int().contiguous()
    n_run = torch.searchsorted(run_lo, limit, right=True).masked_fill(empty, 0).int()
    n_vert = torch.searchsorted(vertical, limit, right=True).masked_fill(empty, 0).int()
    count = offset_counts(slash, T)
    grid = (nqb, B * n)
    _vs_kernel[grid](
        q, k, v, out, lay, heads, run_lo, run_hi, n_run, vertical, n_vert, count,
        *_launch_args(q, k, v, out), n, nqb, run_lo.shape[-1], vertical.shape[-1], count.shape[-1],
        scale * 1.4426950408889634, window if window is not None else NO_LIMIT,
        G=Hq // Hkv, BLOCK_M=BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D), D=D,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
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
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
