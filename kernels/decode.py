"""Triton decode attention (one query token) over a split DuoAttention cache, in one launch.

DuoAttention (arXiv 2410.10819) keeps the whole context only for *retrieval* KV heads and a
sink + recent window for *streaming* KV heads. At decode, time is the bytes of cache read, so the
retrieval heads are split along the keys (flash-decoding, split-K: one long sequence still fills
every SM) and the streaming heads, whose buffer is a few hundred tokens, are served by one program
each in the same launch. Masks come from token ranks (``reference``), so batch rows may hold
different lengths (padding rank -1) and empty streaming slots (-1) are skipped.

The splits are combined in the same launch by the programs that finish last (no second kernel):
each split writes its partial output and log-sum-exp to a workspace, then counts itself in with
an atomic add; the last split to finish in each chunk of consecutive splits (``REDUCE_SPLITS``)
merges the chunk, and the last chunk of a head merges the chunks and writes the output (two small
merges, so no one program reads every split's partial). Whoever merges resets its counter to zero, so the workspace and counters
are allocated (and zeroed) once per shape and device and then reused without a memset: a decode is
one launch with no host sync, and can be captured in a CUDA graph. Calls sharing a workspace (same
device and shape) must not run concurrently on two streams.

``decode_attention`` takes two head groups, ``split`` (split along keys) and ``single`` (one
program per head); each is ``(k, v, k_rank, heads, sink, recent)`` or None, with K/V
``[B, n, Lk, D]`` holding the model's KV heads ``heads [n]``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .prefill import NO_LIMIT, as_ranks

# Tile settings (the best of the sweep in benchmarks/bench_duo.py on an H100; all were within 5%)
BLOCK_N = 32  # keys per inner step
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 2  # split-K fills one wave of this many programs per SM
MAX_SPLITS = 128  # splits per head
# Merging the splits: chunks of at most REDUCE_SPLITS splits, and at most REDUCE_VALUES fp32
# partial values loaded per merge step (64 registers per thread at 4 warps)
REDUCE_SPLITS = 16
REDUCE_VALUES = 8192


@triton.jit
def _attend_range(q, qr, K, V, KR, start, stop, stride_kn, stride_vn, qk_scale, sink, recent, window,
                  GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Online softmax of ``q [GP, BLOCK_D]`` (one query rank ``qr``) over keys [start, stop).

    Returns the unnormalised output, the row sums and maxima (log2 units)."""
    acc = tl.zeros([GP, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kr = tl.load(KR + offs_n, mask=offs_n < stop, other=-1)
        dist = qr - kr
        ok = (kr >= 0) & (dist >= 0) & ((dist < recent) | (kr < sink)) & (dist < window)
        if BLOCK_D == D:  # K/V are read by bounds only (masked keys must hold finite values)
            kv_mask = (offs_n < stop)[:, None]
        else:
            kv_mask = (offs_n < stop)[:, None] & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _last_to_arrive(counter, count):
    """True in the last of the ``count`` programs that call this on ``counter`` (a zero int32),
    which then resets it to zero; what the others stored before calling is visible to that one."""
    # Memory model: the barrier orders every thread's stores before the atomic, which one thread
    # runs (acq_rel at GPU scope: release of those stores, acquire of the other programs'); its
    # result reaches the other threads through shared memory behind a second barrier.
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel") == count - 1
    if last:
        tl.store(counter, 0)  # no other program touches it again in this launch
    return last


@triton.jit
def _merge(PO, PL, first, count, G: tl.constexpr, GR: tl.constexpr, BLOCK_D: tl.constexpr,
           CHUNK: tl.constexpr):
    """Merge the partials in rows [first, first + count) of ``PO [rows, G, BLOCK_D]`` (outputs,
    each normalised by its own sum) and ``PL [rows, G]`` (their log2-sum-exps), ``CHUNK`` rows per
    step. Returns the merged output ``[GR, BLOCK_D]`` (normalised) and log2-sum-exp ``[GR]``."""
    g = tl.arange(0, GR)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([GR, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([GR], dtype=tl.float32)
    m_i = tl.full([GR], float("-inf"), dtype=tl.float32)
    for start in range(0, count, CHUNK):
        s = start + tl.arange(0, CHUNK)
        row = (first + s)[:, None] * G + g[None, :]  # [CHUNK, GR]
        ok = (s < count)[:, None] & (g < G)[None, :]
        # .cg: read at L2, where the other programs' stores are (never a stale L1 line)
        lse = tl.load(PL + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(PO + row[:, :, None] * BLOCK_D + d[None, None, :], mask=ok[:, :, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m_i, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_safe[None, :])
        alpha = tl.exp2(m_i - m_safe)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    return out, tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))


@triton.jit
def _decode_kernel(Q, Out, QR, PO, PL, PO2, PL2, CNT,
                   FK, FV, FR, FH, SK, SV, SR, SH,
                   stride_qb, stride_qh, stride_qrb, stride_ob, stride_oh,
                   stride_fkb, stride_fkh, stride_fkn, stride_fvb, stride_fvh, stride_fvn, stride_frb,
                   stride_skb, stride_skh, stride_skn, stride_svb, stride_svh, stride_svn, stride_srb,
                   n_single, n_f, n_s, T, C, n_splits, split_len, qk_scale,
                   f_sink, f_recent, s_sink, s_recent, window,
                   G: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr):
    """Programs [0, n_single): one streaming head of one row each. Then ``n_splits`` programs per
    (row, retrieval head) ``bh``: a split each; partials go to rows ``bh * n_splits + split`` of
    ``PO``/``PL``, chunk merges to rows ``bh * n_chunks + chunk`` of ``PO2``/``PL2``; ``CNT`` holds
    ``n_chunks`` chunk counters then one head counter per ``bh`` (all zero between launches)."""
    pid = tl.program_id(0)
    g = tl.arange(0, GP)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        q_mask = (g < G)[:, None]
    else:
        q_mask = (g < G)[:, None] & (offs_d[None, :] < D)
    if pid < n_single:  # a single-program head (streaming): the whole buffer, final output
        b = pid // n_s
        slot = pid % n_s
        head = tl.load(SH + slot)
        qr = tl.load(QR + b * stride_qrb)
        q = tl.load(Q + b * stride_qb + (head * G + g)[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        acc, l_i, m_i = _attend_range(q, qr, SK + b * stride_skb + slot * stride_skh,
                                      SV + b * stride_svb + slot * stride_svh, SR + b * stride_srb,
                                      0, C, stride_skn, stride_svn, qk_scale, s_sink, s_recent, window,
                                      GP, BLOCK_N, BLOCK_D, D)
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(Out + b * stride_ob + (head * G + g)[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=q_mask)
    else:  # one split of a split-K head (retrieval): a partial output and its log2-sum-exp
        pid -= n_single
        bh = pid // n_splits  # b * n_f + slot
        split = pid % n_splits
        b = bh // n_f
        slot = bh % n_f
        head = tl.load(FH + slot)
        qr = tl.load(QR + b * stride_qrb)
        q = tl.load(Q + b * stride_qb + (head * G + g)[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        start = split * split_len
        acc, l_i, m_i = _attend_range(q, qr, FK + b * stride_fkb + slot * stride_fkh,
                                      FV + b * stride_fvb + slot * stride_fvh, FR + b * stride_frb,
                                      start, tl.minimum(start + split_len, T), stride_fkn, stride_fvn,
                                      qk_scale, f_sink, f_recent, window, GP, BLOCK_N, BLOCK_D, D)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PO + (pid * G + g)[:, None] * BLOCK_D + offs_d[None, :], out, mask=(g < G)[:, None])
        tl.store(PL + pid * G + g, lse, mask=g < G)
        # the last split of a chunk merges the chunk; the last chunk of the head merges the chunks
        n_chunks = tl.cdiv(n_splits, CHUNK)
        chunk = split // CHUNK
        in_chunk = tl.minimum(CHUNK, n_splits - chunk * CHUNK)
        counters = CNT + bh * (n_chunks + 1)  # one per chunk, then the head's
        if _last_to_arrive(counters + chunk, in_chunk):
            c_out, c_lse = _merge(PO, PL, bh * n_splits + chunk * CHUNK, in_chunk, G, GR, BLOCK_D, CHUNK)
            r = tl.arange(0, GR)
            row2 = bh * n_chunks + chunk
            tl.store(PO2 + (row2 * G + r)[:, None] * BLOCK_D + offs_d[None, :], c_out, mask=(r < G)[:, None])
            tl.store(PL2 + row2 * G + r, c_lse, mask=r < G)
            if _last_to_arrive(counters + n_chunks, n_chunks):
                h_out, _ = _merge(PO2, PL2, bh * n_chunks, n_chunks, G, GR, BLOCK_D, CHUNK)
                tl.store(Out + b * stride_ob + (head * G + r)[:, None] * stride_oh + offs_d[None, :],
                         h_out.to(Out.dtype.element_ty), mask=(r < G)[:, None] & (offs_d[None, :] < D))


@functools.lru_cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_splits(batch_heads: int, single_programs: int, device: torch.device) -> int:
    """Splits per split-K head that fill one wave of ``PROGRAMS_PER_SM`` programs per SM next to
    the single-program heads, at most ``MAX_SPLITS``."""
    sms = _sm_count(device.index) if device.type == "cuda" else 4
    return min(MAX_SPLITS, max(1, (PROGRAMS_PER_SM * sms - single_programs) // max(batch_heads, 1)))


def num_splits(batch_heads: int, single_programs: int, length: int, device: torch.device) -> tuple[int, int]:
    """Splits per split-K head (at most :func:`max_splits`) and keys per split (a multiple of ``BLOCK_N``)."""
    return _split(length, max_splits(batch_heads, single_programs, device))


def _split(length: int, most: int) -> tuple[int, int]:
    split_len = _cdiv(_cdiv(max(length, 1), most), BLOCK_N) * BLOCK_N
    return _cdiv(max(length, 1), split_len), split_len


def _cdiv(a: int, b: int) -> int:  # plain Python: triton.cdiv is a slower jit-wrapped function
    return -(-a // b)


_WORKSPACES: dict = {}


def _workspace(device, batch_heads, splits, chunk, group, block_d):
    """Room for the partials of ``splits`` splits and of their chunks of ``chunk``, and zeroed
    counters, for ``batch_heads`` split-K heads: made once per key, then reused (the kernel leaves
    the counters at zero). One first needed while a CUDA graph is being captured is made (and
    zeroed) inside the graph, so it is not cached: it only holds zeros once the graph is replayed."""
    key = (device, batch_heads, splits, chunk, group, block_d)
    ws = _WORKSPACES.get(key)
    if ws is None:
        chunks = _cdiv(splits, chunk)
        rows = batch_heads * (splits + chunks)  # the splits' partials, then the chunks'
        n1 = batch_heads * splits
        po = torch.empty(rows, group, block_d, device=device, dtype=torch.float32)
        pl = torch.empty(rows, group, device=device, dtype=torch.float32)
        cnt = torch.zeros(batch_heads * (chunks + 1), device=device, dtype=torch.int32)
        ws = (po[:n1], pl[:n1], po[n1:], pl[n1:], cnt)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _WORKSPACES[key] = ws
    return ws


def decode_attention(q, q_rank, scale, group, split=None, single=None, window=None, out=None):
    """Attention of one query token per row, for two KV-head groups in one launch.

    ``q [B, Hq, 1, D]``, ``q_rank [B, 1]`` (int); ``group`` = query heads per KV head; ``split`` and
    ``single`` are ``(k, v, k_rank, heads, sink, recent)`` or None (module docstring); ``recent``
    None means no A-shape. Writes the query heads of both groups into ``out`` (default: zeros like
    ``q``) and returns it. ``scale`` multiplies ``q . k``.
    """
    B, Hq, Lq, D = q.shape
    assert Lq == 1, "decode_attention takes one query token per row"
    out = torch.zeros_like(q) if out is None else out
    split = split if split is not None and split[0].shape[1] else None
    single = single if single is not None and single[0].shape[1] else None
    if split is None and single is None:
        return out
    # a missing group gets the other's tensors as stand-ins (it has no programs: never read)
    fk, fv, fr, fh, f_sink, f_recent = split or single
    sk, sv, sr, sh, s_sink, s_recent = single or split
    n_f = fk.shape[1] if split else 0
    n_s = sk.shape[1] if single else 0
    fr, sr, q_rank = as_ranks(fr), as_ranks(sr), as_ranks(q_rank)
    strides = [t.stride() for t in (q, out, fk, fv, sk, sv)]
    assert all(st[-1] == 1 for st in strides), "the head dimension must be contiguous"
    qs, os_, fks, fvs, sks, svs = strides
    T, C = fk.shape[2], sk.shape[2]
    gp = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    gr = max(2, triton.next_power_of_2(group))  # query heads in a merge
    block_d = triton.next_power_of_2(D)
    chunk = min(REDUCE_SPLITS, max(2, REDUCE_VALUES // (gr * block_d)))
    most = max_splits(B * n_f, B * n_s, q.device) if n_f else 1
    n_splits, split_len = _split(T, most)
    po, pl, po2, pl2, cnt = _workspace(q.device, max(B * n_f, 1), most, chunk, group, block_d)
    _decode_kernel[(B * n_s + B * n_f * n_splits,)](
        q, out, q_rank, po, pl, po2, pl2, cnt, fk, fv, fr, fh, sk, sv, sr, sh,
        *qs[:2], q_rank.stride(0), *os_[:2], *fks[:3], *fvs[:3], fr.stride(0), *sks[:3], *svs[:3], sr.stride(0),
        B * n_s, n_f, n_s, T, C, n_splits, split_len, scale * 1.4426950408889634,
        f_sink if f_recent is not None else 0, f_recent if f_recent is not None else NO_LIMIT,
        s_sink if s_recent is not None else 0, s_recent if s_recent is not None else NO_LIMIT,
        window if window is not None else NO_LIMIT,
        G=group, GP=gp, GR=gr, BLOCK_N=BLOCK_N, BLOCK_D=block_d, D=D, CHUNK=chunk,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
