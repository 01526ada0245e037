"""Triton prefill attention under the rank mask (``reference.rank_attention``), GQA-native.

One program computes a block of ``BLOCK_M`` query tokens for *all* ``G`` query heads of one KV
head (the ``G`` heads are stacked into the rows of one tile, so K/V are read once per group), with
the online softmax of FlashAttention (Dao et al., arXiv 2205.14135). Masks come from token ranks
(see ``reference``): padding, causality, the A-shape of streaming heads (``sink`` first keys plus a
``recent`` window, StreamingLLM arXiv 2309.17453 / DuoAttention arXiv 2410.10819) and the model's
own sliding ``window``.

Cost is linear in length for A-shape heads: before the launch, :func:`block_ranges` gives every
query block the key blocks it can need. When a row's key ranks are non-decreasing along the key
axis (padding anywhere; true of every prefill the Duo runtime makes), those are at most two
position ranges (the sinks, and the window up to the block's last query) found by binary search.
Rows with keys in any other order fall back to scanning every key block, skipping blocks whose rank
range cannot meet the query block's. Either way every key is masked exactly, so any ranks are right.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import OPTIONS

NO_LIMIT = 1 << 30  # stands for "no recent window" / "no sliding window" (ranks are < 2**30)
_BIG = tl.constexpr(NO_LIMIT)  # the same, for use inside kernels
# Tile settings (chosen by the sweep of benchmarks/bench_duo.py on an H100)
BLOCK_N = 32  # keys per inner step
ROWS = 64  # query rows per program: BLOCK_M tokens x (G padded to a power of two) heads
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _attend_block(acc, l_i, m_i, q, qr, K, V, KR, start_n, Lk, stride_kn, stride_vn, qk_scale,
                  sink, recent, window,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N); scores in log2 units."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kr = tl.load(KR + offs_n, mask=offs_n < Lk, other=-1)
    real = kr >= 0
    if BLOCK_D == D:  # K/V are read by bounds only (masked keys must hold finite values)
        kv_mask = (offs_n < Lk)[:, None]
    else:
        kv_mask = (offs_n < Lk)[:, None] & (offs_d[None, :] < D)
    local = tl.arange(0, BLOCK_N)[:, None]  # int32 offsets in the block; the block's start is int64
    first = tl.cast(start_n, tl.int64)
    k = tl.load(K + first * stride_kn + (local * stride_kn + offs_d[None, :]), mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    dist = qr[:, None] - kr[None, :]
    ok = real[None, :] & (dist >= 0) & ((dist < recent) | (kr[None, :] < sink)) & (dist < window)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(V + first * stride_vn + (local * stride_vn + offs_d[None, :]), mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _prefill_kernel(Q, K, V, Out, Lse, QR, KR, HEADS, RANGES, KSPAN,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                    stride_lb, stride_lh, stride_qrb, stride_krb,
                    Lq, Lk, n_heads, n_qblocks, n_kblocks, qk_scale, sink, recent, window,
                    G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, D: tl.constexpr, RANK_PER_HEAD: tl.constexpr, STORE_LSE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    slot = pid_bh % n_heads  # index into K/V's head axis
    key_row = pid_bh if RANK_PER_HEAD else b  # the row of KR / RANGES / KSPAN: per (row, K/V head) or per row
    kv_head = tl.load(HEADS + slot)  # the model's KV head: query heads kv_head * G + g
    rows = tl.arange(0, BLOCK_M * GP)
    g = rows // BLOCK_M
    t = pid_m * BLOCK_M + rows % BLOCK_M
    row_ok = (g < G) & (t < Lq)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    # int64 offsets: a head's start (slot * stride_kh) passes 2**31 elements at ~2.5M tokens x 7 heads
    b64 = b.to(tl.int64)
    q_off = (b64 * stride_qb + (kv_head.to(tl.int64) * G + g)[:, None] * stride_qh
             + t[:, None].to(tl.int64) * stride_qm + offs_d[None, :])
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    qr = tl.load(QR + b64 * stride_qrb + t, mask=row_ok, other=-1)
    qmax = tl.max(qr, 0)
    qmin = tl.min(tl.where(qr >= 0, qr, _BIG), 0)
    K += b64 * stride_kb + slot.to(tl.int64) * stride_kh
    V += b64 * stride_vb + slot.to(tl.int64) * stride_vh
    KR += key_row.to(tl.int64) * stride_krb

    acc = tl.zeros([BLOCK_M * GP, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * GP], dtype=tl.float32)
    m_i = tl.full([BLOCK_M * GP], float("-inf"), dtype=tl.float32)
    rng = RANGES + (key_row * n_qblocks + pid_m) * 6
    lo1 = tl.load(rng)
    hi1 = tl.load(rng + 1)
    lo2 = tl.maximum(tl.load(rng + 2), hi1)
    hi2 = tl.load(rng + 3)
    lo3 = tl.load(rng + 4)
    hi3 = tl.load(rng + 5)
    # Fast path (keys sorted by rank): the sink blocks, then the window blocks not seen yet.
    for nb in range(lo1, hi1):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, qr, K, V, KR, nb * BLOCK_N, Lk, stride_kn,
                                      stride_vn, qk_scale, sink, recent, window, BLOCK_N, BLOCK_D, D)
    for nb in range(lo2, hi2):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, qr, K, V, KR, nb * BLOCK_N, Lk, stride_kn,
                                      stride_vn, qk_scale, sink, recent, window, BLOCK_N, BLOCK_D, D)
    # Any other key order: every block, skipping those whose rank span [kmin, kmax] cannot match.
    for nb in range(lo3, hi3):
        kmin = tl.load(KSPAN + (key_row * n_kblocks + nb) * 2)
        kmax = tl.load(KSPAN + (key_row * n_kblocks + nb) * 2 + 1)
        if (kmax >= 0) & (kmin <= qmax) & ((kmin < sink) | (kmax > qmin - recent)) & (kmax > qmin - window):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, qr, K, V, KR, nb * BLOCK_N, Lk, stride_kn,
                                          stride_vn, qk_scale, sink, recent, window, BLOCK_N, BLOCK_D, D)

    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    o_off = (b64 * stride_ob + (kv_head.to(tl.int64) * G + g)[:, None] * stride_oh
             + t[:, None].to(tl.int64) * stride_om + offs_d[None, :])
    tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=q_mask)
    if STORE_LSE:  # natural log; -inf for a row without keys
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + b64 * stride_lb + (kv_head.to(tl.int64) * G + g) * stride_lh + t, lse, mask=row_ok)


def as_ranks(rank: torch.Tensor) -> torch.Tensor:
    """Ranks as int32 with a contiguous token axis (no copy when they already are)."""
    return rank if rank.dtype == torch.int32 and rank.stride(-1) == 1 else rank.int().contiguous()


def block_ranges(q_rank: torch.Tensor, k_rank: torch.Tensor, block_m: int, block_n: int,
                 sink: int, recent: int | None, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks each query block may need, computed on the device without a host sync.

    Returns ``ranges [B, n_qblocks, 6]`` int32 (``lo1, hi1, lo2, hi2, lo3, hi3``: key-block index
    ranges; ranges 1-2 for rows whose key ranks are non-decreasing, range 3 = all blocks for other
    rows) and ``kspan [B, n_kblocks, 2]`` int32 (min and max real rank of each key block; an empty
    block has ``(2**30, -1)``).
    """
    B, Lq = q_rank.shape
    Lk = k_rank.shape[1]
    nq, nk = triton.cdiv(Lq, block_m), triton.cdiv(Lk, block_n)
    dev = k_rank.device
    qr = torch.nn.functional.pad(q_rank.long(), (0, nq * block_m - Lq), value=-1).view(B, nq, block_m)
    qmax = qr.amax(-1)
    qmin = torch.where(qr >= 0, qr, NO_LIMIT).amin(-1)
    kr = k_rank.long()
    kp = torch.nn.functional.pad(kr, (0, nk * block_n - Lk), value=-1).view(B, nk, block_n)
    kspan = torch.stack([torch.where(kp >= 0, kp, NO_LIMIT).amin(-1), kp.amax(-1)], -1).int()

    # Padding keys take the rank of the last real key before them: sorted iff the real ranks are.
    last = torch.where(kr >= 0, torch.arange(Lk, device=dev), -1).cummax(-1).values
    filled = torch.where(last >= 0, kr.gather(1, last.clamp(min=0)), -1).contiguous()
    sorted_row = (filled[:, 1:] >= filled[:, :-1]).all(-1, keepdim=True)  # [B, 1]

    def blocks(lo_rank, hi_rank):  # key blocks holding every real key with rank in [lo, hi]
        lo = torch.searchsorted(filled, lo_rank.contiguous()) // block_n
        hi = (torch.searchsorted(filled, (hi_rank + 1).contiguous()) + block_n - 1) // block_n
        empty = (hi_rank < lo_rank) | (qmax < 0) | ~sorted_row
        return torch.where(empty, 0, lo), torch.where(empty, 0, hi)

    floor = (qmin - window + 1).clamp(min=0) if window is not None else torch.zeros_like(qmin)
    if recent is None:
        lo1 = hi1 = torch.zeros_like(qmin)
        lo2, hi2 = blocks(floor, qmax)
    else:
        lo1, hi1 = blocks(floor, torch.minimum(qmax, torch.full_like(qmax, sink - 1)))
        lo2, hi2 = blocks(torch.maximum(floor, qmin - recent + 1), qmax)
    hi3 = torch.where(sorted_row, 0, nk).expand_as(qmax)
    ranges = torch.stack([lo1, hi1, lo2, hi2, torch.zeros_like(hi3), hi3], -1)
    return ranges.int().contiguous(), kspan.contiguous()


def prefill_attention(q, k, v, q_rank, k_rank, scale, sink=0, recent=None, window=None,
                      heads=None, group=None, out=None, lse=None):
    """Triton version of ``reference.rank_attention``, optionally for a subset of the KV heads.

    ``q [B, Hq, Lq, D]``; ``k``/``v [B, n, Lk, D]``; ranks ``[B, Lq]`` / ``[B, Lk]`` (int), or key
    ranks per K/V head, ``[B, n, Lk]`` (each head's keys in their own order, as LESS keeps them). With
    ``heads=None`` K/V hold all KV heads (``group = Hq // n``). Otherwise K/V head ``i`` is the
    model's KV head ``heads[i]`` (int64 tensor on the device) and serves query heads
    ``heads[i] * group + g``, ``g < group``: only those heads of ``out`` are written (``out``
    defaults to zeros shaped like ``q``). ``scale`` multiplies ``q . k``; the last dimension of q, k,
    v and out must be contiguous. ``lse``: a float32 ``[B, Hq, Lq]`` tensor that receives each
    query's log-sum-exp of its scores (natural log, ``-inf`` without keys), the token axis
    contiguous. Returns ``out``.
    """
    B, Hq, Lq, D = q.shape
    n, Lk = k.shape[1], k.shape[2]
    if heads is None:
        heads, group = torch.arange(n, device=q.device), Hq // n
        out = torch.empty_like(q) if out is None else out
    else:
        out = torch.zeros_like(q) if out is None else out
    if n == 0 or Lq == 0:
        return out
    for t in (q, k, v, out):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    gp = triton.next_power_of_2(group)
    block_m = max(1, ROWS // gp)
    per_head = k_rank.dim() == 3
    if per_head:  # one row of key ranks per (row, K/V head), each with the row's query ranks
        k_rank = k_rank.reshape(B * n, Lk)
        ranges, kspan = block_ranges(q_rank.repeat_interleave(n, dim=0), k_rank, block_m, BLOCK_N, sink, recent, window)
    else:
        ranges, kspan = block_ranges(q_rank, k_rank, block_m, BLOCK_N, sink, recent, window)
    q_rank, k_rank = as_ranks(q_rank), as_ranks(k_rank)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.stride(-1) == 1, "lse: float32 with a contiguous token axis"
    grid = (triton.cdiv(Lq, block_m), B * n)
    _prefill_kernel[grid](
        q, k, v, out, out if lse is None else lse, q_rank, k_rank, heads, ranges, kspan,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *((0, 0) if lse is None else (lse.stride(0), lse.stride(1))), q_rank.stride(0), k_rank.stride(0),
        Lq, Lk, n, grid[0], kspan.shape[1], scale * 1.4426950408889634,
        sink if recent is not None else 0, recent if recent is not None else NO_LIMIT,
        window if window is not None else NO_LIMIT,
        G=group, GP=gp, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D), D=D,
        RANK_PER_HEAD=per_head, STORE_LSE=lse is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **OPTIONS,
    )
    return out
