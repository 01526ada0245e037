"""Triton kernels of LESS (arXiv 2402.09398): a decode step over the kept tokens plus the state, and
H2O's accumulated probabilities of a prefill, blockwise. Semantics: ``kvpress.kernels.less_reference``.

A decode step is three launches, none of which waits on the host (a step can be captured in a CUDA
graph):

1. ``_features_kernel``: ``phi(q)`` of every query head; and for every (row, state head) whose spare
   slot holds the token evicted by the last step, ``psi(k)`` of that token folded into the state
   (``H += psi^T v``, ``z += psi``): the fold happens once, at eviction, with the post-RoPE key.
2. ``_attend_kernel``: split-K attention of the G query heads of a KV head over its slots
   (flash-decoding); the program whose range holds the spare slot writes the new token there (and
   reads it from registers). With heavy hitters, the raw logits go to a small workspace.
3. ``_merge_evict_kernel``, one program per (row, KV head): merges the splits, adds the state as one
   more partial in the log-space normaliser (``log(max(phi(q).z, 1e-6))``), writes the output; then
   adds this step's probabilities to the heavy-hitter scores, picks the next spare slot (an empty
   one, or the lowest-scored evictable one, which is folded at the start of the next step).

The prefill runs through the torch reference, with H2O's column sums from ``column_mass`` (Triton,
blockwise: no ``L x L`` matrix) on CUDA.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import less_reference as reference

BLOCK_N = 64  # slots per inner step of the attention
BLOCK_H = 128  # hidden units per step of the feature maps
MERGE_BLOCK = 512  # slots per step of the eviction loop (one program per row and KV head: few, long steps)
NUM_WARPS = 4
WIDE_WARPS = 8  # features and merge/evict programs (few programs, wide tiles)
# H200 at 618bcc9 (BLOCK_H 64, MERGE_BLOCK 64, 4 warps everywhere): a step took 59 us (Lambda, 2049 slots)
# to 109 us (H2O, 4097 slots) whatever the context, latency-bound in the two single-program-per-head
# launches; the wider tiles here are untuned.
LOG2E = 1.4426950408889634


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve ``t``'s device (CUDA, unless ``KVPRESS_KERNELS=reference``;
    ``KVPRESS_KERNELS=triton`` runs them on CPU tensors under ``TRITON_INTERPRET=1``)."""
    backend = os.environ.get("KVPRESS_KERNELS", "auto")
    if backend == "reference":
        return False
    return backend == "triton" or t.is_cuda


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _two_layer(X, W1, W2, N, D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """``GELU(GELU(x W1) W2)`` of one vector ``x [D]`` (W1 ``[D, N]``, W2 ``[N, R]`` row-major), fp32 ``[BLOCK_R]``."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    x = tl.load(X + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, N, BLOCK_H):
        hh = start + offs_h
        w1 = tl.load(W1 + offs_d[:, None] * N + hh[None, :], mask=(offs_d[:, None] < D) & (hh[None, :] < N), other=0.0)
        hidden = _gelu(tl.sum(x[:, None] * w1.to(tl.float32), 0))
        w2 = tl.load(W2 + hh[:, None] * R + offs_r[None, :], mask=(hh[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        acc += tl.sum(hidden[:, None] * w2.to(tl.float32), 0)
    return _gelu(acc)


@triton.jit
def _features_kernel(Q, PHI, K, V, SPARE, PENDING, HS, Z, QW1, QW2, KW1, KW2, KS, KM, KMS,
                     q_b, q_h, B, Hq, Hkv, Hs, S, N,
                     D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    if pid < B * Hq:  # phi of one query head
        b = pid // Hq
        h = pid % Hq
        f = tl.abs(_two_layer(Q + b * q_b + h * q_h, QW1 + h * D * N, QW2 + h * N * R, N, D, R, BLOCK_D, BLOCK_R, BLOCK_H))
        tl.store(PHI + pid * R + offs_r, f, mask=offs_r < R)
    else:  # fold the pending token of one state head
        pid -= B * Hq
        b = pid // Hs
        j = pid % Hs
        kvh = j // (Hs // Hkv)
        bh = b * Hkv + kvh
        if tl.load(PENDING + bh) != 0:
            slot = tl.load(SPARE + bh).to(tl.int64)
            row = (bh * S + slot) * D
            h = tl.abs(_two_layer(K + row, KW1 + j * D * N, KW2 + j * N * R, N, D, R, BLOCK_D, BLOCK_R, BLOCK_H))
            rmask = offs_r < R
            mix = tl.load(KM + j * R * R + offs_r[:, None] * R + offs_r[None, :],
                          mask=rmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            mixed = tl.sum(h[:, None] * mix, 0)
            scale = tl.abs(tl.load(KS + j * R + offs_r, mask=rmask, other=0.0).to(tl.float32))
            mix_scale = tl.load(KMS + j * R + offs_r, mask=rmask, other=0.0).to(tl.float32)
            f = tl.abs(h * scale + mixed * mix_scale)
            v = tl.load(V + row + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            state = HS + (b * Hs + j) * R * D + offs_r[:, None] * D + offs_d[None, :]
            smask = rmask[:, None] & (offs_d[None, :] < D)
            tl.store(state, tl.load(state, mask=smask, other=0.0) + f[:, None] * v[None, :], mask=smask)
            zp = Z + (b * Hs + j) * R + offs_r
            tl.store(zp, tl.load(zp, mask=rmask, other=0.0) + f, mask=rmask)


@triton.jit
def _attend_kernel(Q, QR, KN, VN, K, V, RANK, SCORE, SPARE, PO, PM, PL, LOGITS,
                   q_b, q_h, n_b, n_h, Hkv, S, n_splits, split_len, qk_scale,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, STORE_LOGITS: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // n_splits
    split = pid % n_splits
    b = bh // Hkv
    kvh = bh % Hkv
    start = split * split_len
    stop = tl.minimum(start + split_len, S)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    gmask = offs_g < G
    heads = kvh * G + offs_g
    qr = tl.load(QR + b)
    spare = tl.load(SPARE + bh)
    q = tl.load(Q + b * q_b + heads[:, None] * q_h + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_new = tl.load(KN + b * n_b + kvh * n_h + offs_d, mask=dmask, other=0.0)
    v_new = tl.load(VN + b * n_b + kvh * n_h + offs_d, mask=dmask, other=0.0)
    base = bh.to(tl.int64) * S
    if (spare >= start) & (spare < stop):  # the new token goes into the spare slot
        tl.store(K + (base + spare) * D + offs_d, k_new.to(K.dtype.element_ty), mask=dmask)
        tl.store(V + (base + spare) * D + offs_d, v_new.to(V.dtype.element_ty), mask=dmask)
        tl.store(RANK + base + spare, qr)
        tl.store(SCORE + base + spare, 0.0)
    acc = tl.zeros([GP, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    for block in range(start, stop, BLOCK_N):
        offs_n = block + tl.arange(0, BLOCK_N)
        nmask = offs_n < stop
        is_new = offs_n == spare
        kr = tl.load(RANK + base + offs_n, mask=nmask, other=-1)
        kr = tl.where(is_new, qr, kr)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + (base + offs_n[:, None]) * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + (base + offs_n[:, None]) * D + offs_d[None, :], mask=kv_mask, other=0.0)
        k = tl.where(is_new[:, None], k_new[None, :].to(k.dtype), k)
        v = tl.where(is_new[:, None], v_new[None, :].to(v.dtype), v)
        ok = (kr >= 0) & (kr <= qr) & nmask
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        if STORE_LOGITS:
            tl.store(LOGITS + (b * Hkv * G + heads[:, None]).to(tl.int64) * S + offs_n[None, :], s,
                     mask=gmask[:, None] & nmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    row = (b * Hkv * G + heads) * n_splits + split
    tl.store(PO + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
    tl.store(PM + row, m_i, mask=gmask)
    tl.store(PL + row, l_i, mask=gmask)


@triton.jit
def _merge_evict_kernel(Out, PO, PM, PL, PHI, HS, Z, QR, RANK, SCORE, SPARE, PENDING, LOGITS,
                        o_b, o_h, Hkv, S, n_splits, sink, recent,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        STATE: tl.constexpr, STATE_PER_QUERY: tl.constexpr, HEAVY: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hkv
    kvh = bh % Hkv
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    gmask = offs_g < G
    dmask = offs_d < D
    rmask = offs_r < R
    heads = kvh * G + offs_g
    rows = (b * Hkv * G + heads) * n_splits
    # merge the splits (log2 units)
    m_max = tl.full([GP], float("-inf"), dtype=tl.float32)
    for split in range(0, n_splits):
        m_max = tl.maximum(m_max, tl.load(PM + rows + split, mask=gmask, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([GP, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([GP], dtype=tl.float32)
    for split in range(0, n_splits):
        alpha = tl.exp2(tl.load(PM + rows + split, mask=gmask, other=float("-inf")) - m_safe)
        l_sum += alpha * tl.load(PL + rows + split, mask=gmask, other=0.0)
        acc += alpha[:, None] * tl.load(PO + (rows + split)[:, None] * D + offs_d[None, :],
                                        mask=gmask[:, None] & dmask[None, :], other=0.0)
    has_keys = l_sum > 0
    lse_kept = tl.where(has_keys, m_safe + tl.log2(tl.where(has_keys, l_sum, 1.0)), float("-inf"))
    out = acc / tl.where(has_keys, l_sum, 1.0)[:, None]
    if STATE:  # the state: one more partial of the normaliser
        phi = tl.load(PHI + (b * Hkv * G + heads)[:, None] * R + offs_r[None, :], mask=gmask[:, None] & rmask[None, :], other=0.0)
        if STATE_PER_QUERY:
            sh = b * Hkv * G + heads  # [GP]
            hs = tl.load(HS + (sh[:, None, None] * R + offs_r[None, :, None]) * D + offs_d[None, None, :],
                         mask=gmask[:, None, None] & rmask[None, :, None] & dmask[None, None, :], other=0.0)
            z = tl.load(Z + sh[:, None] * R + offs_r[None, :], mask=gmask[:, None] & rmask[None, :], other=0.0)
            num = tl.sum(phi[:, :, None] * hs, 1)
            den = tl.sum(phi * z, 1)
            has_state = tl.sum(z, 1) > 0
        else:
            hs = tl.load(HS + (bh * R + offs_r[:, None]) * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            z = tl.load(Z + bh * R + offs_r, mask=rmask, other=0.0)
            num = tl.sum(phi[:, :, None] * hs[None, :, :], 1)
            den = tl.sum(phi * z[None, :], 1)
            has_state = (tl.zeros([GP], dtype=tl.float32) + tl.sum(z, 0)) > 0
        lse_state = tl.where(has_state, tl.log2(tl.maximum(den, 1e-6)), float("-inf"))
        top = tl.maximum(lse_kept, lse_state)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        lse = top_safe + tl.log2(tl.exp2(lse_kept - top_safe) + tl.exp2(lse_state - top_safe))
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        w_kept = tl.exp2(lse_kept - lse_safe)
        w_state = tl.where(has_state, tl.exp2(-lse_safe), 0.0)  # 2^-lse2 = e^-lse: lse2 = log2(sum + den)
        out = out * w_kept[:, None] + num * w_state[:, None]
    tl.store(Out + b * o_b + heads[:, None] * o_h + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=gmask[:, None] & dmask[None, :])
    # eviction: accumulate probabilities, choose the next spare slot
    qr = tl.load(QR + b)
    base = bh.to(tl.int64) * S
    best_key = float("inf")
    best_idx = 0
    first_empty = S
    for block in range(0, S, BLOCK_N):
        offs_n = block + tl.arange(0, BLOCK_N)
        nmask = offs_n < S
        kr = tl.load(RANK + base + offs_n, mask=nmask, other=0)
        if HEAVY:
            s = tl.load(LOGITS + (b * Hkv * G + heads[:, None]).to(tl.int64) * S + offs_n[None, :],
                        mask=gmask[:, None] & nmask[None, :], other=float("-inf"))
            lse_k = tl.where(lse_kept == float("-inf"), 0.0, lse_kept)
            p = tl.where(lse_kept[:, None] == float("-inf"), 0.0, tl.exp2(s - lse_k[:, None]))
            score = tl.load(SCORE + base + offs_n, mask=nmask, other=0.0) + tl.sum(p, 0)
            tl.store(SCORE + base + offs_n, score, mask=nmask)
            key = score
        else:
            key = kr.to(tl.float32)
        evictable = nmask & (kr >= sink) & (kr <= qr - recent)
        key = tl.where(evictable, key, float("inf"))
        block_min = tl.min(key, 0)
        block_idx = block + tl.argmin(key, 0)
        better = block_min < best_key
        best_idx = tl.where(better, block_idx, best_idx)
        best_key = tl.where(better, block_min, best_key)
        empty = tl.where(nmask & (kr < 0), offs_n, S)
        first_empty = tl.minimum(first_empty, tl.min(empty, 0))
    full = first_empty == S
    tl.store(SPARE + bh, tl.where(full, best_idx, first_empty).to(tl.int32))
    tl.store(PENDING + bh, (full & (best_key < float("inf"))).to(tl.int32))


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(n))


def decode_step(q, k_new, v_new, q_rank, cache: reference.LessCache, w: reference.FeatureWeights,
                policy: reference.Policy, scale: float, state: bool = True, splits: int | None = None) -> torch.Tensor:
    """One decode step; same contract as :func:`kvpress.kernels.less_reference.decode_step`."""
    b, hq, _, d = q.shape
    _, hkv, slots, _ = cache.k.shape
    g = hq // hkv
    hs_heads, rank_r = cache.hs.shape[1], cache.hs.shape[2]
    n_hidden = w.q_w1.shape[2]
    for name in ("k", "v", "rank", "score", "hs", "z"):
        if not getattr(cache, name).is_contiguous():
            setattr(cache, name, getattr(cache, name).contiguous())
    if q.stride(3) != 1 or k_new.stride(3) != 1 or v_new.stride(3) != 1 or k_new.stride() != v_new.stride():
        q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    q_rank = q_rank.to(torch.int32).contiguous()
    dev = q.device
    block_d, block_r = _pow2(d, 16), _pow2(rank_r, 2)
    phi = torch.empty(b, hq, rank_r, dtype=torch.float32, device=dev)
    if not state:
        cache.pending.zero_()
    grid = b * hq + (b * hs_heads if state else 0)
    if state:
        _features_kernel[(grid,)](q, phi, cache.k, cache.v, cache.spare, cache.pending, cache.hs, cache.z,
                                  w.q_w1, w.q_w2, w.k_w1, w.k_w2, w.k_scale, w.k_mix, w.k_mix_scale,
                                  q.stride(0), q.stride(1), b, hq, hkv, hs_heads, slots, n_hidden,
                                  D=d, R=rank_r, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_H=BLOCK_H, num_warps=WIDE_WARPS)
    if splits is None:
        programs = 2 * (torch.cuda.get_device_properties(dev).multi_processor_count if q.is_cuda else 2)
        splits = max(1, min(math.ceil(programs / (b * hkv)), math.ceil(slots / BLOCK_N)))
    split_len = math.ceil(math.ceil(slots / splits) / BLOCK_N) * BLOCK_N
    splits = math.ceil(slots / split_len)
    po = torch.empty(b * hq * splits, d, dtype=torch.float32, device=dev)
    pm = torch.empty(b * hq * splits, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    heavy = policy.heavy > 0
    logits = torch.empty(b * hq * slots if heavy else 1, dtype=torch.float32, device=dev)
    gp = _pow2(g, 16)
    _attend_kernel[(b * hkv * splits,)](q, q_rank, k_new, v_new, cache.k, cache.v, cache.rank, cache.score, cache.spare,
                                        po, pm, pl, logits, q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
                                        hkv, slots, splits, split_len, scale * LOG2E,
                                        G=g, GP=gp, D=d, BLOCK_D=block_d, BLOCK_N=BLOCK_N, STORE_LOGITS=heavy,
                                        num_warps=NUM_WARPS)
    out = torch.empty(b, hq, 1, d, dtype=q.dtype, device=dev)
    _merge_evict_kernel[(b * hkv,)](out, po, pm, pl, phi, cache.hs, cache.z, q_rank, cache.rank, cache.score,
                                    cache.spare, cache.pending, logits, out.stride(0), out.stride(1),
                                    hkv, slots, splits, policy.sink, policy.recent,
                                    G=g, GP=_pow2(g, 2), D=d, R=rank_r, BLOCK_D=block_d, BLOCK_R=block_r,
                                    BLOCK_N=MERGE_BLOCK, STATE=state, STATE_PER_QUERY=hs_heads != hkv, HEAVY=heavy,
                                    num_warps=WIDE_WARPS)
    if not state:
        cache.pending.zero_()
    return out


def prefill_step(q, k_new, v_new, q_rank, cache: reference.LessCache, w: reference.FeatureWeights,
                 policy: reference.Policy, scale: float, state: bool = True) -> torch.Tensor:
    """A forward of several tokens (torch reference), with queries chunked so that one chunk's
    logits stay under ~256 MiB (no ``L x L`` matrix)."""
    keys = cache.k.shape[2] + k_new.shape[2]
    chunk = max(16, (1 << 26) // max(1, q.shape[0] * q.shape[1] * keys))
    return reference.prefill_step(q, k_new, v_new, q_rank, cache, w.to(torch.float32), policy, scale,
                                  state=state, query_chunk=chunk)
