"""Triton decode attention (one query token) over a split DuoAttention cache.

DuoAttention (arXiv 2410.10819) keeps the whole context only for *retrieval* KV heads and a
sink + recent window for *streaming* KV heads. At decode, time is the bytes of cache read, so the
retrieval heads are split along the keys (flash-decoding, split-K: one long sequence still fills
every SM) and the streaming heads, whose buffer is a few hundred tokens, are served by one program
each in the same launch. Masks come from token ranks (``reference``), so batch rows may hold
different lengths (padding rank -1) and empty streaming slots (-1) are skipped.

A second, small kernel merges each head's splits (partial outputs normalised by their own sums,
and their log-sum-exps, in a workspace made once per shape and device) and writes the output
(benchmarks/merge_probe.py at commit 2b84895, H100, 128K tokens, 25% retrieval heads: 51.5 us
against 55.5 us for the earlier two-level merge inside the kernel by the last programs to finish).
On Hopper the merge kernel is launched with programmatic dependent launch: it is resident as soon
as every split program has started and waits (``gdc_wait``) only for their results (50.8 us; the
launch costs the host the same as a plain one, benchmarks/host_overhead.py). Nothing
waits on the host, so a decode can be captured in a CUDA graph; calls sharing a workspace (same
device and shape) must not run concurrently on two streams.

With ``new_kv`` the kernel also appends the new token: the program that reads a group's last key
slot writes the token's K/V there first, so a decode step needs no torch op per layer for the cache.
Both launches go through :class:`~kvpress.kernels.launch.Launcher` (low host overhead).

``decode_attention`` takes two head groups, ``split`` (split along keys) and ``single`` (one
program per head); each is ``(k, v, k_rank, heads, sink, recent)`` or None, with K/V
``[B, n, Lk, D]`` holding the model's KV heads ``heads [n]``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .launch import Launcher, has_pdl
from .prefill import NO_LIMIT, as_ranks

# Tile settings: the best in sum over five graph-decode shapes of benchmarks/decode_split_probe.py
# (H200: dense 8 KV heads at 32K / 128K, Duo 25% at 128K / 512K, Duo 50% at 128K), 2-6% faster than
# the earlier 32-key steps (the best of an H100 sweep) on each shape
BLOCK_N = 64  # keys per inner step
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 2  # split-K fills one wave of this many programs per SM
MAX_SPLITS = 128  # splits per head
MERGE_BLOCK_D = 32  # head-dim entries per merge program (all splits at once: 128 x 32 fp32 values)
MERGE_WARPS = 4


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


# Every integer argument is unspecialized (one compiled kernel for every length and stride, which the
# direct launcher relies on); strides of K/V/Q/Out/new K/V come in units of ``UNIT`` elements
# (their rows start 16-byte aligned: vector loads), pointers are aligned where the key says so.
UNIT = 8
_UNIT = tl.constexpr(UNIT)
_INTS = ["q_b", "q_h", "o_b", "o_h", "n_b", "n_h", "qr_b", "f_b", "f_h", "fr_b", "s_b", "s_h", "sr_b",
         "B", "n_f", "n_s", "T", "C", "n_splits", "split_len", "f_sink", "f_recent", "s_sink", "s_recent", "window"]
_UNALIGNED = ["Q", "Out", "QR", "KN", "VN", "FR", "FH", "SR", "SH", "FL", "SL"]


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_UNALIGNED)
def _decode_kernel(Q, Out, QR, PO, PL, KN, VN, FK, FV, FR, FH, SK, SV, SR, SH, FL, SL,
                   q_b, q_h, o_b, o_h, n_b, n_h, qr_b, f_b, f_h, fr_b, s_b, s_h, sr_b,
                   B, n_f, n_s, T, C, n_splits, split_len, f_sink, f_recent, s_sink, s_recent, window, qk_scale,
                   G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D: tl.constexpr, WRITE_NEW: tl.constexpr, PDL: tl.constexpr, DEVICE_LEN: tl.constexpr):
    """Programs [0, B * n_s): one single-program head of one row each, final output. Then
    ``n_splits`` programs per (row, split-K head) ``bh = b * n_f + slot``: partial outputs to rows
    ``bh * n_splits + split`` of ``PO``/``PL`` (or the output itself when ``n_splits == 1``).
    Strides: ``x_b``/``x_h`` of batch rows / heads in ``UNIT`` elements (K and V of a group share
    theirs, as do ``KN`` and ``VN``; keys are rows of ``D`` contiguous values), ``*r_b`` of the rank
    tensors in elements. With ``WRITE_NEW``, the program that reads a group's last key first writes
    it (and its value) from ``KN``/``VN`` (KV head ``heads[slot]``). With ``DEVICE_LEN`` the keys in
    use, ``T`` and ``C``, are read from ``FL``/``SL`` (int32 scalars on the device: a CUDA graph
    replays the launch as the cache grows) and ``split_len`` follows from ``T`` and ``n_splits``;
    the splits past ``T`` have nothing to read."""
    if PDL:
        gdc_launch_dependents()  # the merge kernel may start now and wait (gdc_wait) for this one
    if DEVICE_LEN:
        T = tl.load(FL)
        C = tl.load(SL)
        split_len = tl.cdiv(tl.cdiv(T, n_splits), BLOCK_N) * BLOCK_N
    pid = tl.program_id(0)
    n_single = B * n_s
    if pid < n_single:  # a single-program head (streaming): the whole buffer, final output
        _one_program(Q, Out, QR, PO, PL, KN, VN, SK, SV, SR, SH, pid // n_s, pid % n_s, pid, 0, C, C - 1, True, True,
                     q_b, q_h, o_b, o_h, n_b, n_h, qr_b, s_b, s_h, sr_b,
                     qk_scale, s_sink, s_recent, window, G, GP, BLOCK_N, BLOCK_D, D, WRITE_NEW)
    else:  # one split of a split-K head (retrieval): a partial output, or the output if it is the only split
        pid -= n_single
        bh = pid // n_splits
        split = pid % n_splits
        start = split * split_len
        stop = tl.minimum(start + split_len, T)
        _one_program(Q, Out, QR, PO, PL, KN, VN, FK, FV, FR, FH, bh // n_f, bh % n_f, pid, start,
                     stop, T - 1, (start <= T - 1) & (T - 1 < start + split_len), n_splits == 1,
                     q_b, q_h, o_b, o_h, n_b, n_h, qr_b, f_b, f_h, fr_b,
                     qk_scale, f_sink, f_recent, window, G, GP, BLOCK_N, BLOCK_D, D, WRITE_NEW)


@triton.jit
def _offset(b, b_stride, h, h_stride):
    """Element offset of (row ``b``, head ``h``) from strides in ``UNIT`` elements (64-bit)."""
    return (b.to(tl.int64) * b_stride + h * h_stride.to(tl.int64)) * _UNIT


@triton.jit
def _one_program(Q, Out, QR, PO, PL, KN, VN, K, V, R, Heads, b, slot, row, start, stop, last, holds_last, final,
                 q_b, q_h, o_b, o_h, n_b, n_h, qr_b, kv_b, kv_h, r_b,
                 qk_scale, sink, recent, window,
                 G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                 WRITE_NEW: tl.constexpr):
    """Keys [start, stop) of KV-head slot ``slot`` of row ``b`` of one group for its ``G`` query
    heads: the output if ``final``, else partial row ``row`` of ``PO``/``PL``. ``last`` is the
    group's last key slot, in this program's range when ``holds_last``."""
    g = tl.arange(0, GP)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        q_mask = (g < G)[:, None]
    else:
        q_mask = (g < G)[:, None] & (offs_d[None, :] < D)
    head = tl.load(Heads + slot)
    K += _offset(b, kv_b, slot, kv_h)
    V += _offset(b, kv_b, slot, kv_h)
    if WRITE_NEW:
        if holds_last:  # the new token's K/V into the last slot, visible to this program's reads below
            new = _offset(b, n_b, head, n_h) + offs_d
            tl.store(K + last * D + offs_d, tl.load(KN + new, mask=offs_d < D), mask=offs_d < D)
            tl.store(V + last * D + offs_d, tl.load(VN + new, mask=offs_d < D), mask=offs_d < D)
            tl.debug_barrier()
    qr = tl.load(QR + b * qr_b)
    rows = (head * G + g)[:, None]
    q = tl.load(Q + _offset(b, q_b, rows, q_h) + offs_d[None, :], mask=q_mask, other=0.0)
    acc, l_i, m_i = _attend_range(q, qr, K, V, R + b * r_b, start, stop, D, D,
                                  qk_scale, sink, recent, window, GP, BLOCK_N, BLOCK_D, D)
    if final:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(Out + _offset(b, o_b, rows, o_h) + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    else:  # a partial output (normalised by its own sum) and its log2-sum-exp
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PO + (row * G + g)[:, None] * BLOCK_D + offs_d[None, :], out, mask=(g < G)[:, None])
        tl.store(PL + row * G + g, lse, mask=g < G)


@triton.jit(do_not_specialize=["o_b", "o_h", "n_f", "n_splits"], do_not_specialize_on_alignment=["Out", "FH"])
def _merge_kernel(PO, PL, Out, FH, o_b, o_h, n_f, n_splits,
                  G: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, DB: tl.constexpr,
                  SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Program ``(bh, g, d)``: merges the ``n_splits`` partials of query head ``g`` of split-K head
    ``bh`` over head-dim block ``d`` (``DB`` wide) and writes the output (strides in ``UNIT``s)."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.program_id(2) * DB + tl.arange(0, DB)
    row = (bh * n_splits + s) * G + g
    head = tl.load(FH + bh % n_f)
    if PDL:
        gdc_wait()  # the split kernel has finished and its partials are visible
    lse = tl.load(PL + row, mask=s < n_splits, other=float("-inf"))
    o = tl.load(PO + row[:, None] * BLOCK_D + d[None, :], mask=(s < n_splits)[:, None], other=0.0)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + _offset(bh // n_f, o_b, head * G + g, o_h) + d, out.to(Out.dtype.element_ty), mask=d < D)


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


def _pow2(n: int) -> int:  # the same for triton.next_power_of_2 (~7 us a call on the host)
    return 1 << (n - 1).bit_length()


def made_once(store: dict, key, make):
    """``store[key]``, made by ``make()`` the first time. Not kept when made while a CUDA graph is
    being captured: such a tensor only holds its values (or stays allocated) through the graph."""
    value = store.get(key)
    if value is None:
        value = make()
        device = key[0]
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            store[key] = value
    return value


_WORKSPACES: dict = {}


def _workspace(device, rows, group, block_d):
    """Room for the partial outputs and log2-sum-exps of ``rows`` splits, made once per key and reused."""
    return made_once(_WORKSPACES, (device, rows, group, block_d), lambda: (
        torch.empty(rows, group, block_d, device=device, dtype=torch.float32),
        torch.empty(rows, group, device=device, dtype=torch.float32)))


_launch_decode = Launcher(_decode_kernel)
_launch_merge = Launcher(_merge_kernel)


def _layout(t: torch.Tensor, other: torch.Tensor | None = None):
    """Batch and head strides of ``t [B, H, L, D]`` in ``UNIT`` elements (those of ``other`` must
    match), or None unless the rows are D contiguous values and those strides multiples of ``UNIT``."""
    st = t.stride()
    if other is not None:
        ot = other.stride()
        if st[:2] != ot[:2] or (t.shape[2] > 1 and st[2] != ot[2]) or ot[3] != 1:
            return None
    if st[3] != 1 or (t.shape[2] > 1 and st[2] != t.shape[3]) or (st[0] | st[1]) % UNIT:
        return None
    return st[0] // UNIT, st[1] // UNIT


def _pair_layout(a: torch.Tensor, b: torch.Tensor, copy: bool):
    """``a``, ``b`` and their shared :func:`_layout`, copied to fit it if ``copy`` (else an error)."""
    layout = _layout(a, b)
    if layout is not None:
        return a, b, layout
    if not copy:
        raise ValueError("decode_attention: K and V written in place must be [B, H, L, D] with contiguous rows "
                         f"and batch/head strides that are multiples of {UNIT}, alike for both")
    a, b = a.contiguous(), b.contiguous()
    return a, b, _layout(a, b)


def _with_length(group: tuple) -> tuple:
    """A group tuple with its optional 7th entry (the device length, or None)."""
    return tuple(group) + (None,) * (7 - len(group))


def _as_length(length, stand_in: torch.Tensor) -> torch.Tensor:
    """A device length as an int32 scalar tensor (``stand_in`` when there is none: never read)."""
    if length is None:
        return stand_in
    if length.dtype != torch.int32 or length.device != stand_in.device:
        raise ValueError("decode_attention: a device length is an int32 tensor on the query's device")
    return length


def decode_attention(q, q_rank, scale, group, split=None, single=None, window=None, out=None, new_kv=None):
    """Attention of one query token per row, for two KV-head groups: one launch, plus one small
    merge launch when the split-K heads have more than one split.

    ``q [B, Hq, 1, D]``, ``q_rank [B, 1]`` (int); ``group`` = query heads per KV head; ``split`` and
    ``single`` are ``(k, v, k_rank, heads, sink, recent)`` or None (module docstring); ``recent``
    None means no A-shape. A group may carry a 7th entry ``length``: an int32 tensor on the device
    holding how many of its ``Lk`` slots are in use (the new token's slot the last of them), for
    buffers of a fixed capacity (a CUDA-graph decode step; give both groups one or neither); slots
    past it are never read. ``new_kv``: the new token's ``(k, v)``, ``[B, Hkv, 1, D]`` for every KV
    head of the model, not yet in the groups' buffers: the kernel writes KV head ``heads[i]`` into
    slot ``i`` of the last position of each group's K and V (in place) before reading it. Writes
    the query heads of both groups into ``out`` (default: a new tensor like ``q``, zeros where
    neither group has a head) and returns it.
    ``scale`` multiplies ``q . k``. D must be a multiple of 8, and every stride of ``out`` (but the
    last, 1) and of the buffers written in place too; other inputs are copied when they are not so.
    """
    B, Hq, Lq, D = q.shape
    if Lq != 1 or D % UNIT:
        raise ValueError(f"decode_attention takes one query token per row and a head dim that is a multiple of {UNIT}, got {tuple(q.shape)}")
    split = split if split is not None and split[0].shape[1] else None
    single = single if single is not None and single[0].shape[1] else None
    if split is None and single is None:
        return torch.zeros_like(q) if out is None else out
    # a missing group gets the other's tensors as stand-ins (it has no programs: never read)
    fk, fv, fr, fh, f_sink, f_recent, f_len = _with_length(split or single)
    sk, sv, sr, sh, s_sink, s_recent, s_len = _with_length(single or split)
    device_len = f_len is not None
    if device_len != (s_len is not None):
        raise ValueError("decode_attention: give both groups a device length (7th entry) or neither")
    writes = new_kv is not None
    q_layout = _layout(q)
    if q_layout is None:
        q = q.contiguous()
        q_layout = _layout(q)
    n_f = fk.shape[1] if split else 0
    n_s = sk.shape[1] if single else 0
    if out is None:  # contiguous (q may be a view with gaps, e.g. of a fused q/k/v projection)
        out = q.new_empty(q.shape) if (n_f + n_s) * group == Hq else q.new_zeros(q.shape)
    o_layout = _layout(out)
    if o_layout is None:
        raise ValueError(f"decode_attention: out must have contiguous rows and strides that are multiples of {UNIT}")
    fk, fv, f_layout = _pair_layout(fk, fv, copy=not writes)
    sk, sv, s_layout = _pair_layout(sk, sv, copy=not writes)
    kn, vn, n_layout = _pair_layout(*new_kv, copy=True) if writes else (q, q, q_layout)
    if fh.dtype != sh.dtype:
        sh = sh.to(fh.dtype)
    fr, sr, q_rank = as_ranks(fr), as_ranks(sr), as_ranks(q_rank)
    T, C = fk.shape[2], sk.shape[2]  # with device lengths: the capacities (the splits cover T)
    block_d = _pow2(D)
    device = q.device
    most = max_splits(B * n_f, B * n_s, device) if n_f else 1
    # with device lengths every split the length could need is launched (the ones past it read
    # nothing); its split_len, computed in the kernel, is the one _split gives here: same partials
    n_splits, split_len = (most, 0) if device_len else _split(T, most)
    po, pl = _workspace(device, max(B * n_f, 1) * most, group, block_d)  # torch.empty: aligned
    pdl = has_pdl(device)
    aligned = not (fk.data_ptr() | fv.data_ptr() | sk.data_ptr() | sv.data_ptr()) % 16
    constexprs = dict(G=group, GP=max(16, _pow2(group)), BLOCK_N=BLOCK_N, BLOCK_D=block_d, D=D,
                      WRITE_NEW=writes, PDL=pdl, DEVICE_LEN=device_len)
    _launch_decode(
        (q.dtype, fk.dtype, kn.dtype, out.dtype, fh.dtype, aligned, NUM_WARPS, NUM_STAGES, *constexprs.values()),
        (B * n_s + B * n_f * n_splits,),
        (q, out, q_rank, po, pl, kn, vn, fk, fv, fr, fh, sk, sv, sr, sh,
         _as_length(f_len, q_rank), _as_length(s_len, q_rank),
         *q_layout, *o_layout, *n_layout, q_rank.stride(0), *f_layout, fr.stride(0), *s_layout, sr.stride(0),
         B, n_f, n_s, T, C, n_splits, split_len,
         f_sink if f_recent is not None else 0, f_recent if f_recent is not None else NO_LIMIT,
         s_sink if s_recent is not None else 0, s_recent if s_recent is not None else NO_LIMIT,
         window if window is not None else NO_LIMIT, scale * 1.4426950408889634),
        constexprs, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if n_f and n_splits > 1:
        db = min(MERGE_BLOCK_D, block_d)
        constexprs = dict(G=group, BLOCK_D=block_d, D=D, DB=db, SPLITS=_pow2(most), PDL=pdl)
        _launch_merge((out.dtype, fh.dtype, MERGE_WARPS, *constexprs.values()), (B * n_f, group, block_d // db),
                      (po, pl, out, fh, *o_layout, n_f, n_splits), constexprs, num_warps=MERGE_WARPS, launch_pdl=pdl)
    return out
