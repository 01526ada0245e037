"""Triton decode attention (one query token) over a split DuoAttention cache, in one launch.

DuoAttention (arXiv 2410.10819) keeps the whole context only for *retrieval* KV heads and a
sink + recent window for *streaming* KV heads. At decode, time is the bytes of cache read, so the
retrieval heads are split along the keys (flash-decoding, split-K: one long sequence still fills
every SM) and each split writes a partial output and its log-sum-exp; the streaming heads, whose
buffer is a few hundred tokens, are served by one program each in the same launch. A second small
kernel combines the splits. Masks come from token ranks (``reference``), so batch rows may hold
different lengths (padding rank -1) and empty streaming slots (-1) are skipped.

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
MAX_SPLITS = 128  # splits per head; the reduce kernel combines them in one pass


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
def _decode_kernel(Q, Out, QR, PO, PL,
                   FK, FV, FR, FH, SK, SV, SR, SH,
                   stride_qb, stride_qh, stride_qrb, stride_ob, stride_oh,
                   stride_fkb, stride_fkh, stride_fkn, stride_fvb, stride_fvh, stride_fvn, stride_frb,
                   stride_skb, stride_skh, stride_skn, stride_svb, stride_svh, stride_svn, stride_srb,
                   n_single, n_f, n_s, T, C, n_splits, split_len, qk_scale,
                   f_sink, f_recent, s_sink, s_recent, window,
                   G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D: tl.constexpr):
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
        split = pid % n_splits
        b = pid // n_splits // n_f
        slot = pid // n_splits % n_f
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
        tl.store(PO + (pid * GP + g)[:, None] * BLOCK_D + offs_d[None, :], out, mask=(g < G)[:, None])
        tl.store(PL + pid * GP + g, lse, mask=g < G)


@triton.jit
def _reduce_kernel(Out, PO, PL, FH, stride_ob, stride_oh, n_f, n_splits,
                   G: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                   NSP: tl.constexpr):
    """Combine the splits of one (batch row, head, query head of the group) in one pass."""
    pid = tl.program_id(0)  # ((b * n_f + slot) * G + g)
    g = pid % G
    bs = pid // G
    head = tl.load(FH + bs % n_f)
    sp = tl.arange(0, NSP)
    row = (bs * n_splits + sp) * GP + g
    lse = tl.load(PL + row, mask=sp < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    offs_d = tl.arange(0, BLOCK_D)
    o = tl.load(PO + row[:, None] * BLOCK_D + offs_d[None, :], mask=(sp < n_splits)[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + (bs // n_f) * stride_ob + (head * G + g) * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < D)


@functools.lru_cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(batch_heads: int, single_programs: int, length: int, device: torch.device) -> tuple[int, int]:
    """Splits per split-K head and keys per split (a multiple of ``BLOCK_N``): as many as fill one
    wave of ``PROGRAMS_PER_SM`` programs per SM next to the single-program heads, at most ``MAX_SPLITS``."""
    sms = _sm_count(device.index) if device.type == "cuda" else 4
    want = min(MAX_SPLITS, max(1, (PROGRAMS_PER_SM * sms - single_programs) // max(batch_heads, 1)))
    split_len = triton.cdiv(triton.cdiv(max(length, 1), want), BLOCK_N) * BLOCK_N
    return triton.cdiv(max(length, 1), split_len), split_len


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
    empty = (None, None, None, None, 0, None)
    fk, fv, fr, fh, f_sink, f_recent = split if split is not None and split[0].shape[1] else empty
    sk, sv, sr, sh, s_sink, s_recent = single if single is not None and single[0].shape[1] else empty
    n_f = fk.shape[1] if fk is not None else 0
    n_s = sk.shape[1] if sk is not None else 0
    if n_f + n_s == 0:
        return out
    dummy_k = fk if fk is not None else sk  # stands in for the missing group (never read)
    dummy_r = fr if fr is not None else sr
    dummy_h = fh if fh is not None else sh
    fk, fv, fr, fh = (fk, fv, fr, fh) if n_f else (dummy_k, dummy_k, dummy_r, dummy_h)
    sk, sv, sr, sh = (sk, sv, sr, sh) if n_s else (dummy_k, dummy_k, dummy_r, dummy_h)
    fr, sr, q_rank = as_ranks(fr), as_ranks(sr), as_ranks(q_rank)
    for t in (q, fk, fv, sk, sv, out):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    T, C = fk.shape[2], sk.shape[2]
    gp = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    block_d = triton.next_power_of_2(D)
    n_splits, split_len = num_splits(B * n_f, B * n_s, T, q.device) if n_f else (1, BLOCK_N)
    rows = B * n_f * n_splits * gp  # partial outputs [rows, block_d] then their log2-sum-exps [rows], fp32
    partial = torch.empty(rows * (block_d + 1), device=q.device, dtype=torch.float32)
    partial_o, partial_l = partial[: rows * block_d], partial[rows * block_d:]
    qk_scale = scale * 1.4426950408889634
    _decode_kernel[(B * n_s + B * n_f * n_splits,)](
        q, out, q_rank, partial_o, partial_l, fk, fv, fr, fh, sk, sv, sr, sh,
        q.stride(0), q.stride(1), q_rank.stride(0), out.stride(0), out.stride(1),
        fk.stride(0), fk.stride(1), fk.stride(2), fv.stride(0), fv.stride(1), fv.stride(2), fr.stride(0),
        sk.stride(0), sk.stride(1), sk.stride(2), sv.stride(0), sv.stride(1), sv.stride(2), sr.stride(0),
        B * n_s, n_f, n_s, T, C, n_splits, split_len, qk_scale,
        f_sink if f_recent is not None else 0, f_recent if f_recent is not None else NO_LIMIT,
        s_sink if s_recent is not None else 0, s_recent if s_recent is not None else NO_LIMIT,
        window if window is not None else NO_LIMIT,
        G=group, GP=gp, BLOCK_N=BLOCK_N, BLOCK_D=block_d, D=D, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if n_f:
        _reduce_kernel[(B * n_f * group,)](
            out, partial_o, partial_l, fh, out.stride(0), out.stride(1), n_f, n_splits,
            G=group, GP=gp, BLOCK_D=block_d, D=D, NSP=triton.next_power_of_2(n_splits), num_warps=8,
        )
    return out
