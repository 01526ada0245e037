"""Triton decode attention over Palu's latent KV cache (arXiv 2407.21118), one pass per token block.

A decode step (one query token per row) reads each cached token's key and value *latents* once:
per head group ``g`` and block of cached tokens, the kernel (dequantises and) rebuilds the pre-RoPE
keys of the group's KV heads from the latents (``h @ up.T``, fp32 accumulation), adds the key bias,
applies the per-head ``k_norm`` (Qwen3), rotates them at each token's own position (half tables
``cos``/``sin`` gathered by position), scores them against the group's query heads, runs the online
softmax and accumulates the softmax-weighted *value latents* (values are never rebuilt per token).
Blocks of tokens are split over programs (split-K) so a long sequence fills the GPU; a second small
kernel merges each query head's splits and up-projects its value latent once (``up_v`` of its KV
head, plus the value bias), writing the attention output ``[B, Hq, 1, D]``.

Cost per cached token and head group of ``gs`` KV heads at rank ``r``: ``2 * gs * D * r`` FLOP to
rebuild keys against ``2 * r`` latents read (``bits / 8`` bytes each when quantised). With ``gs = 1``
and ``r = D / 2`` (Palu-50%) that is 64 FLOP per byte in bf16, below the H200's ~165 FLOP/B ridge:
the decode stays bound by the latent bytes. Larger groups rebuild ``gs`` times more per byte (the
quality / speed trade-off of G-LRD, measured in ``benchmarks/bench_palu.py``).

Masks come from token ranks (``kvpress.kernels.reference``): any batch with left padding, the
model's sliding window. Tiles are constexpr; boundaries are masked. ``kvpress.kernels.palu_reference``
is the CPU path and the test oracle.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import palu_reference as ref

BLOCK_N = 64  # cached tokens per inner step
NUM_WARPS = 4
NUM_STAGES = 2
PROGRAMS_PER_SM = 2  # split-K aims at this many programs per SM
MAX_SPLITS = 256
MERGE_SPLITS = 16  # partials merged per step of the merge kernel
NO_LIMIT = 1 << 30
HOIST_UP = True  # load ``up`` once per program when it is one tile (groups of one KV head, rank <= 64)


@triton.jit
def _latent_tile(L, S, row, srow, cols, col_ok, R: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr,
                 NQ: tl.constexpr, WORDS: tl.constexpr, row_ok, dtype: tl.constexpr):
    """Latents ``[BLOCK_N, C]`` of token rows ``row`` of ``L`` (and ``srow`` of the scales/minima
    ``S``) for latent channels ``cols``; dequantised in fp32 when ``BITS`` > 0 (codes packed
    ``32 // BITS`` per int32 word)."""
    mask = row_ok[:, None] & col_ok[None, :]
    if BITS == 0:
        h = tl.load(L + row[:, None] * R + cols[None, :], mask=mask, other=0.0)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(L + row[:, None] * WORDS + (cols // PER_WORD)[None, :], mask=mask, other=0)
        codes = (words >> ((cols % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
        q = cols // QG
        scale = tl.load(S + srow[:, None] * (2 * NQ) + q[None, :], mask=mask, other=0.0).to(tl.float32)
        low = tl.load(S + srow[:, None] * (2 * NQ) + NQ + q[None, :], mask=mask, other=0.0).to(tl.float32)
        h = codes.to(tl.float32) * scale + low
    return h.to(dtype)


_STRIDES = ["kl_b", "kl_g", "ks_b", "ks_g", "vl_b", "vl_g", "vs_b", "vs_g", "pos_b", "kr_b"]


@triton.jit(do_not_specialize=["T", "split_len", "window"] + _STRIDES)
def _palu_decode_kernel(
    Q, KL, KS, VL, VS, KUP, KB, KNW, POS, KR, QR, COS, SIN, PO, PML,
    kl_b, kl_g, ks_b, ks_g, vl_b, vl_g, vs_b, vs_g, pos_b, kr_b,
    T, split_len, window, qk_scale, eps,
    G: tl.constexpr, GS: tl.constexpr, QPK: tl.constexpr, GP: tl.constexpr,
    D: tl.constexpr, HALF: tl.constexpr,
    RK: tl.constexpr, RC: tl.constexpr, K_BITS: tl.constexpr, K_QG: tl.constexpr, K_NQ: tl.constexpr, K_WORDS: tl.constexpr,
    RV: tl.constexpr, BLOCK_RV: tl.constexpr, V_BITS: tl.constexpr, V_QG: tl.constexpr, V_NQ: tl.constexpr,
    V_WORDS: tl.constexpr, HAS_KB: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_N: tl.constexpr,
    HOIST: tl.constexpr,
):
    """Program ``(group g, split s, row b)``: tokens ``[s * split_len, (s + 1) * split_len)`` of head
    group ``g`` for its ``GS * QPK`` query heads; writes the unnormalised partial value latent
    ``PO [B, G, S, GP, BLOCK_RV]`` and its ``(max, sum)`` in ``PML [B, G, S, GP, 2]`` (log2 units).

    Layouts: ``Q [B, Hq, D]``; latents ``[B, G, T, R]`` (or ``[B, G, T, WORDS]`` int32 codes and
    ``[B, G, T, 2 * NQ]`` scales/minima) with contiguous token rows and batch / group strides
    ``*_b``/``*_g`` in rows (append buffers with room to grow); ``KUP [G, GS * D, RK]``;
    ``KB [Hkv * D]``; ``KNW [D]``; ``POS``/``KR [B, T]`` with row strides ``pos_b``/``kr_b``;
    ``QR [B]``; ``COS``/``SIN [P, HALF]``; the rest contiguous. ``HOIST``: the group's whole ``up``
    (one KV head, one rank chunk) is loaded once, before the token loop."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    n_splits = tl.num_programs(1)
    dtype = Q.dtype.element_ty

    m_rows = tl.arange(0, GP)  # query heads of the group (padded to GP rows)
    m_ok = m_rows < GS * QPK
    m_head = m_rows // QPK  # KV head of each row within the group
    d = tl.arange(0, HALF)
    q_base = Q + (b.to(tl.int64) * (G * GS * QPK) + g * (GS * QPK)) * D
    qr = tl.load(QR + b)

    start = split * split_len
    stop = tl.minimum(start + split_len, T)
    b64 = b.to(tl.int64)
    k_row0 = b64 * kl_b + g * kl_g  # token row of (b, g, 0) in each latent tensor
    ks_row0 = b64 * ks_b + g * ks_g
    v_row0 = b64 * vl_b + g * vl_g
    vs_row0 = b64 * vs_b + g * vs_g
    up_base = KUP + g.to(tl.int64) * (GS * D * RK)
    rc = tl.arange(0, RC)
    rv = tl.arange(0, BLOCK_RV)

    if HOIST:  # [RC, HALF] = up.T halves, kept in registers for the whole loop
        u1_all = tl.load(up_base + d[None, :] * RK + rc[:, None])
        u2_all = tl.load(up_base + (HALF + d)[None, :] * RK + rc[:, None])
    acc = tl.zeros([GP, BLOCK_RV], dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        kr = tl.load(KR + b64 * kr_b + offs_n, mask=n_ok, other=-1)
        pos = tl.load(POS + b64 * pos_b + offs_n, mask=n_ok, other=0)
        pos = tl.maximum(pos, 0).to(tl.int64)
        cos = tl.load(COS + pos[:, None] * HALF + d[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        sin = tl.load(SIN + pos[:, None] * HALF + d[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        dist = qr - kr
        ok = (kr >= 0) & (dist >= 0) & (dist < window)

        s = tl.zeros([GP, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(GS):  # each KV head of the group: rebuild, bias, norm, RoPE, scores
            k1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
            k2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
            for c in tl.static_range(RK // RC):
                cols = c * RC + rc
                h = _latent_tile(KL, KS, k_row0 + offs_n, ks_row0 + offs_n, cols, cols < RK, RK, K_BITS, K_QG, K_NQ, K_WORDS, n_ok, dtype)
                if HOIST:
                    k1 += tl.dot(h, u1_all)
                    k2 += tl.dot(h, u2_all)
                else:
                    u1 = tl.load(up_base + (j * D + d)[None, :] * RK + cols[:, None])  # [RC, HALF] = up.T
                    u2 = tl.load(up_base + (j * D + HALF + d)[None, :] * RK + cols[:, None])
                    k1 += tl.dot(h, u1)
                    k2 += tl.dot(h, u2)
            if HAS_KB:
                kv_head = g * GS + j
                k1 += tl.load(KB + kv_head * D + d).to(tl.float32)[None, :]
                k2 += tl.load(KB + kv_head * D + HALF + d).to(tl.float32)[None, :]
            if HAS_NORM:
                inv = tl.rsqrt((tl.sum(k1 * k1, 1) + tl.sum(k2 * k2, 1)) / D + eps)
                k1 = k1 * inv[:, None] * tl.load(KNW + d).to(tl.float32)[None, :]
                k2 = k2 * inv[:, None] * tl.load(KNW + HALF + d).to(tl.float32)[None, :]
            r1 = (k1 * cos - k2 * sin).to(dtype)
            r2 = (k2 * cos + k1 * sin).to(dtype)
            q_ok = (m_ok & (m_head == j))[:, None]
            q1 = tl.load(q_base + m_rows[:, None] * D + d[None, :], mask=q_ok, other=0.0)
            q2 = tl.load(q_base + m_rows[:, None] * D + HALF + d[None, :], mask=q_ok, other=0.0)
            s += tl.dot(q1, tl.trans(r1)) + tl.dot(q2, tl.trans(r2))

        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        hv = _latent_tile(VL, VS, v_row0 + offs_n, vs_row0 + offs_n, rv, rv < RV, RV, V_BITS, V_QG, V_NQ, V_WORDS, n_ok, dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), hv)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    part = ((b.to(tl.int64) * G + g) * n_splits + split) * GP + m_rows
    tl.store(PO + part[:, None] * BLOCK_RV + rv[None, :], acc)
    tl.store(PML + part * 2, m_i)
    tl.store(PML + part * 2 + 1, l_i)


@triton.jit
def _palu_merge_kernel(PO, PML, VUP, VB, Out, n_splits,
                       G: tl.constexpr, GS: tl.constexpr, QPK: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       RV: tl.constexpr, BLOCK_RV: tl.constexpr, HAS_VB: tl.constexpr, SB: tl.constexpr):
    """Program ``(query head h, row b)``: merges the head's partial value latents over the splits,
    normalises, up-projects with its KV head's ``up_v`` rows (+ value bias) and writes ``Out [B, Hq, D]``
    (zeros for a row with no key to attend)."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    kv = h // QPK
    g = kv // GS
    m = h - g * (GS * QPK)  # row of this head in its group's partials
    rv = tl.arange(0, BLOCK_RV)
    sp = tl.arange(0, SB)
    acc = tl.zeros([BLOCK_RV], dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    top = tl.full([1], float("-inf"), dtype=tl.float32)
    base = (b.to(tl.int64) * G + g) * n_splits
    for s0 in range(0, n_splits, SB):
        s = s0 + sp
        part = (base + s) * GP + m
        mx = tl.load(PML + part * 2, mask=s < n_splits, other=float("-inf"))
        sm = tl.load(PML + part * 2 + 1, mask=s < n_splits, other=0.0)
        o = tl.load(PO + part[:, None] * BLOCK_RV + rv[None, :], mask=(s < n_splits)[:, None], other=0.0)
        new_top = tl.maximum(top, tl.max(mx, 0))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)
        w = tl.exp2(mx - safe)  # [SB]
        scale = tl.exp2(top - safe)
        acc = acc * scale + tl.sum(w[:, None] * o, 0)
        total = total * scale + tl.sum(w * sm, 0)
        top = new_top
    o_lat = acc / tl.where(total > 0, total, 1.0)
    dd = tl.arange(0, D)
    j = kv - g * GS
    up = tl.load(VUP + (g.to(tl.int64) * (GS * D) + j * D + dd)[:, None] * RV + rv[None, :],
                 mask=(rv < RV)[None, :], other=0.0).to(tl.float32)
    out = tl.sum(up * o_lat[None, :], 1)
    if HAS_VB:
        out += tl.load(VB + kv * D + dd).to(tl.float32)
    out = tl.where(total > 0, out, 0.0)
    tl.store(Out + (b.to(tl.int64) * (G * GS * QPK) + h) * D + dd, out.to(Out.dtype.element_ty))


@functools.lru_cache
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [B, G, T, W]`` with contiguous token rows (the layout of an append buffer's filled part);
    copied only when it is not."""
    w = x.shape[-1]
    ok = x.stride(-1) == 1 and (x.shape[2] <= 1 or x.stride(2) == w)
    ok = ok and x.stride(1) % w == 0 and x.stride(0) % w == 0
    return x if ok else x.contiguous()


def _row_strides(x: torch.Tensor) -> tuple[int, int]:
    """Batch and group strides of ``x [B, G, T, W]`` in token rows."""
    w = x.shape[-1]
    return x.stride(0) // w, x.stride(1) // w


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``x [B, T]`` with a contiguous token axis."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _chunk(rank: int) -> int:
    """Latent channels per ``tl.dot`` step: the largest power of two dividing ``rank`` (<= 64)."""
    return min(rank & -rank, 64)


def supported(q: torch.Tensor, k: ref.Latents, v: ref.Latents, group_size: int) -> bool:
    """Whether the kernel serves these shapes (power-of-two head dim and group size, key rank with a
    power-of-two factor of at least 16 on the GPU; the interpreter accepts smaller tiles)."""
    d = q.shape[-1]
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    min_tile = 16 if q.is_cuda else 1
    return (q.shape[2] == 1 and pow2(d) and d >= 2 * min_tile and pow2(group_size)
            and _chunk(k.rank) >= min_tile and q.dtype in (torch.float16, torch.bfloat16, torch.float32))


def palu_decode(
    q: torch.Tensor,
    k: ref.Latents,
    v: ref.Latents,
    k_up: torch.Tensor,
    v_up: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_rank: torch.Tensor,
    k_rank: torch.Tensor,
    scale: float,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    k_norm: tuple[torch.Tensor, float] | None = None,
    window: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Decode attention ``[B, Hq, 1, D]`` over a latent cache; the same function as
    :func:`kvpress.kernels.palu_reference.latent_attention` for one query token per row.

    ``q [B, Hq, 1, D]`` post-RoPE; latents ``[B, G, T, .]`` (``Latents``); ``k_up``/``v_up
    [G, gs * D, r]`` in ``q.dtype``; ``positions``/``k_rank [B, T]``; ``q_rank [B, 1]``; ``cos``/``sin
    [P, D / 2]`` covering every position. ``splits``: programs per (row, group) along the tokens
    (default: enough to fill the GPU)."""
    B, hq, _, D = q.shape
    G, rows, rk = k_up.shape
    gs = rows // D
    qpk = hq // (G * gs)
    T = k.data.shape[2]
    gp = max(16, triton.next_power_of_2(gs * qpk))
    block_rv = max(16, triton.next_power_of_2(v.rank))
    if splits is None:
        target = PROGRAMS_PER_SM * (_sm_count(q.device.index or 0) if q.is_cuda else 1)
        splits = max(1, min(-(-target // (B * G)), -(-T // BLOCK_N), MAX_SPLITS))
    split_len = -(-max(T, 1) // splits)
    split_len = -(-split_len // BLOCK_N) * BLOCK_N
    splits = max(1, -(-T // split_len))
    po = torch.empty(B, G, splits, gp, block_rv, device=q.device, dtype=torch.float32)
    pml = torch.empty(B, G, splits, gp, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(B, hq, 1, D, device=q.device, dtype=q.dtype)
    dummy = q.new_empty(1)

    def quant(x: ref.Latents):
        data = _rows(x.data)
        if x.quant is None:
            return (data, dummy, *_row_strides(data), 0, 0, 0, 1, 1, 1)
        sm = _rows(x.scale_min)
        return (data, sm, *_row_strides(data), *_row_strides(sm), x.quant.bits, x.quant.group,
                x.rank // x.quant.group, x.data.shape[-1])

    kl, ks, kl_b, kl_g, ks_b, ks_g, kbits, kqg, knq, kwords = quant(k)
    vl, vs, vl_b, vl_g, vs_b, vs_g, vbits, vqg, vnq, vwords = quant(v)
    positions, k_rank = _tokens(positions), _tokens(k_rank.int() if k_rank.dtype != torch.int32 else k_rank)
    _palu_decode_kernel[(G, splits, B)](
        q.contiguous(), kl, ks, vl, vs, k_up.contiguous(),
        k_bias if k_bias is not None else dummy, k_norm[0] if k_norm is not None else dummy,
        positions, k_rank, q_rank.reshape(B).int().contiguous(),
        cos.contiguous(), sin.contiguous(), po, pml,
        kl_b, kl_g, ks_b, ks_g, vl_b, vl_g, vs_b, vs_g, positions.stride(0), k_rank.stride(0),
        T, split_len, window if window is not None else NO_LIMIT, scale * 1.4426950408889634,
        float(k_norm[1]) if k_norm is not None else 0.0,
        G=G, GS=gs, QPK=qpk, GP=gp, D=D, HALF=D // 2,
        RK=rk, RC=_chunk(rk), K_BITS=kbits, K_QG=kqg, K_NQ=knq, K_WORDS=kwords,
        RV=v.rank, BLOCK_RV=block_rv, V_BITS=vbits, V_QG=vqg, V_NQ=vnq, V_WORDS=vwords,
        HAS_KB=k_bias is not None, HAS_NORM=k_norm is not None, BLOCK_N=BLOCK_N,
        HOIST=HOIST_UP and gs == 1 and _chunk(rk) == rk,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    _palu_merge_kernel[(hq, B)](
        po, pml, v_up.contiguous(), v_bias if v_bias is not None else dummy, out, splits,
        G=G, GS=gs, QPK=qpk, GP=gp, D=D, RV=v.rank, BLOCK_RV=block_rv, HAS_VB=v_bias is not None,
        SB=MERGE_SPLITS, num_warps=4,
    )
    return out
