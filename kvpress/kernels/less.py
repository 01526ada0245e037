"""Triton kernels of LESS (arXiv 2402.09398): a decode step over the kept tokens plus the state.
Semantics: ``kvpress.kernels.less_reference`` (the CPU path and the oracle).

A decode step is two launches, none of which waits on the host (a step can be captured in a CUDA
graph), and no torch op besides the output's allocation:

1. ``_step_kernel``: split-K attention of the G query heads of each KV head over its slots
   (flash-decoding; the spare slot is left out and the new token, from registers, is one more softmax
   term), beside the feature
   maps split over chunks of hidden units: ``phi(q)`` of every query head and, for every (row,
   state head) whose spare slot holds the token evicted by the last step, ``psi(k)`` of that token
   (pre-activations summed in fp32 with atomics). With heavy hitters the raw logits go to a small
   workspace.
2. ``_finish_kernel``: per (row, KV head), one program per split adds this step's probabilities to
   the heavy-hitter scores of its slots and proposes its eviction candidate, and beside them one
   merge program (``_merge``, from launch 1's results only) finishes the features, folds the
   pending token into the fp32 state (``H += psi^T v``, ``z += psi``: once, at eviction, with the
   post-RoPE key), writes the new token to the spare slot, merges the splits and the state
   (``log(max(phi(q).z, 1e-6))`` as one more partial of the normaliser) and writes the output; the
   last program of a (row, KV head) to finish (an atomic counter) picks the next spare slot (an
   empty one, or the lowest-scored evictable one, folded at the next step). On Hopper it is a
   programmatic dependent launch of launch 1 (``USE_PDL``): its programs start while launch 1 runs,
   load what launch 1 does not write, and wait (``gdc_wait``) for the rest.

Workspaces (partials, logits, feature accumulators, counters) are allocated once per shape and
device and left zeroed by every step; the first step of a shape should run outside CUDA-graph
capture (as Triton's compilation must anyway).

The prefill (``prefill_step``) is the reference's, with the attention over the kept slots and the new
tokens done by ``kernels.prefill``'s rank-masked attention (ranks per KV head, log-sum-exp out) and
the heavy hitters' probability mass by ``_column_mass_kernel``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import less_reference as reference
from .launch import OPTIONS, has_pdl
from .prefill import prefill_attention

BLOCK_N = 64  # slots per inner step of the attention
BLOCK_E = 256  # slots per step of the score update / eviction candidates
# Hidden units per feature program. 128 (the paper's 512 hidden units in 4 programs per head: 160 feature
# programs beside 128 attention programs on the 8B shape) against 64 (320): a step of 19.6 us instead of
# 23.8 us on the H200 (benchmarks/bench_less.py layer, 2026-11-30; 256: 21.8 us).
BLOCK_H = 128
# Splits of a KV head's slots (the merge program reads them in one tile). 16: the 8B shape's 2049 slots
# (1024 + 1024 and the spare) in 11 splits of three 64-slot blocks. On the H200, with launch 2 in 8 warps,
# a step of 15.8 us against 16.4-16.9 with 32 (17 splits of two blocks) in two runs, 15.8 against 16.3 in a
# third; with 4 warps 32 had been the faster, 16.1-16.7 us against 16.7-16.9 (bench_less.py layer;
# less_layer_twice_{1,2}_NVIDIA_H200.json, less_layer_NVIDIA_H200.json; less_layer_merge_program_NVIDIA_H200.json).
MAX_SPLITS = 16
# The same without the state (the plain policy), where the merge program has less to do: 32 made that step
# 13.6-14.0 us (less_layer_twice_{1,2}_NVIDIA_H200.json, less_layer_warps8_NVIDIA_H200.json) against
# 14.9-15.0 with 16 (less_layer_NVIDIA_H200.json), launch 2 in 8 warps in all.
MAX_SPLITS_NO_STATE = 32
# Warps per program of launch 1, and of launch 2. On the H200 (bench_less.py layer, H2O 1024+1024 at 32K;
# less_layer_settings_NVIDIA_H200.json, less_layer_settings2_NVIDIA_H200.json, less_layer_warps8_NVIDIA_H200.json):
# launch 1 in 2 or 8 warps made a step 20.2-20.7 / 17.9-20.1 us; launch 2 in 8 warps 16.4-16.6 us against
# 16.9-17.3 with 4 (2: 24.3-25.0).
STEP_WARPS = 4
FINISH_WARPS = 8
# Software-pipelining depth of launch 1's attention loop. A program walks two or three 64-slot blocks,
# and each stage holds a block's K and V in shared memory: 3 stages take 103 KB (two programs per SM),
# 2 take 70 KB (three, as many as its 168 registers allow: the whole grid in about one wave); read
# offline from the sm_90a build. 3 is the measured setting; benchmarks/bench_less.py layer times 2 and 1.
STEP_STAGES = 3
# Launch 2 as a programmatic dependent launch of launch 1 (Hopper): resident as soon as every program of
# launch 1 has started, it loads what launch 1 does not write, then waits (gdc_wait) for launch 1's results.
# On the H200 (benchmarks/less_budget_probe.py, 128K, 128-2048 tokens per KV head) a step of 9.5-14.7 us
# against 11.9-15.7 without; with launch 1's programs letting it in only after their work, 11.0-15.1 us.
USE_PDL = True
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
def _partial_map(X, W1, W2, ACC, chunk, N, D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """One chunk of hidden units of ``GELU(GELU(x W1) W2)``: adds ``GELU(x W1[:, c]) W2[c, :]`` (the
    second layer's pre-activation over the chunk, fp32) to ``ACC [R]`` atomically. ``x [D]``,
    ``W1 [D, N]``, ``W2 [N, R]`` row-major; the consumer applies the outer GELU to the full sum."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    hh = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
    x = tl.load(X + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    w1 = tl.load(W1 + offs_d[:, None] * N + hh[None, :], mask=(offs_d[:, None] < D) & (hh[None, :] < N), other=0.0)
    hidden = _gelu(tl.sum(x[:, None] * w1.to(tl.float32), 0))
    w2 = tl.load(W2 + hh[:, None] * R + offs_r[None, :], mask=(hh[:, None] < N) & (offs_r[None, :] < R), other=0.0)
    tl.atomic_add(ACC + offs_r, tl.sum(hidden[:, None] * w2.to(tl.float32), 0), mask=offs_r < R)


@triton.jit
def _step_kernel(Q, QR, KN, VN, K, V, RANK, SPARE, PENDING, PO, PM, PL, LOGITS, PHI_ACC, PSI_ACC,
                 QW1, QW2, KW1, KW2,
                 q_b, q_h, n_b, n_h, Hq, Hkv, Hs, S, N, n_phi, n_fold, n_splits, split_len, qk_scale,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr,
                 STORE_LOGITS: tl.constexpr, PDL: tl.constexpr):
    """Launch 1 of a decode step: three kinds of programs, independent of one another, numbered as
    below.

    * ``n_phi = B * Hq * CHUNKS`` feature programs (0 without a state): one chunk of hidden units of ``phi(q)`` of a query head,
      summed into ``PHI_ACC [B, Hq, R]`` (atomics; the merge applies the last GELU).
    * ``n_fold = B * Hs * CHUNKS`` fold programs (0 without a state): where ``PENDING``, the same for
      ``psi`` of the key evicted by the last step (still in slot ``SPARE``) into ``PSI_ACC [B, Hs, R]``.
    * ``B * Hkv * n_splits`` attention programs: split-K attention of the G query heads of a KV head
      over ``split_len`` slots, the spare slot left out and the new token added (from registers: this launch
      writes nothing to the cache); partials ``PO``/``PM``/``PL`` (log2 units) and, for heavy
      hitters, the raw logits ``LOGITS [B, Hq, S]`` (log2 units).
    """
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()  # launch 2 may start now; it waits (gdc_wait) for this launch's results
    if pid < n_phi:
        head = pid // CHUNKS  # b * Hq + h
        b = head // Hq
        h = head % Hq
        _partial_map(Q + b * q_b + h * q_h, QW1 + h * D * N, QW2 + h * N * R, PHI_ACC + head * R, pid % CHUNKS, N,
                     D, R, BLOCK_D, BLOCK_R, BLOCK_H)
    elif pid < n_phi + n_fold:
        pid -= n_phi
        head = pid // CHUNKS  # b * Hs + j
        b = head // Hs
        j = head % Hs
        bh = b * Hkv + j // (Hs // Hkv)
        pending = tl.load(PENDING + bh)  # loaded beside the spare slot's index, not before it
        slot = tl.load(SPARE + bh).to(tl.int64)
        if pending != 0:
            _partial_map(K + (bh * S + slot) * D, KW1 + j * D * N, KW2 + j * N * R, PSI_ACC + head * R,
                         pid % CHUNKS, N, D, R, BLOCK_D, BLOCK_R, BLOCK_H)
    else:
        pid -= n_phi + n_fold
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
        qr = tl.load(QR + b).to(tl.int32)
        spare = tl.load(SPARE + bh)
        q = tl.load(Q + b * q_b + heads[:, None] * q_h + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
        k_new = tl.load(KN + b * n_b + kvh * n_h + offs_d, mask=dmask, other=0.0)
        v_new = tl.load(VN + b * n_b + kvh * n_h + offs_d, mask=dmask, other=0.0)
        base = bh.to(tl.int64) * S
        logits_row = (b * Hq + heads).to(tl.int64) * S  # [GP]
        acc = tl.zeros([GP, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
        for block in range(start, stop, BLOCK_N):
            offs_n = block + tl.arange(0, BLOCK_N)
            nmask = offs_n < stop
            real = nmask & (offs_n != spare)  # the spare slot is left out; the new token comes after the loop
            kr = tl.load(RANK + base + offs_n, mask=nmask, other=-1)
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(K + (base + offs_n[:, None]) * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + (base + offs_n[:, None]) * D + offs_d[None, :], mask=kv_mask, other=0.0)
            ok = (kr >= 0) & (kr <= qr) & real
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
            s = tl.where(ok[None, :], s, float("-inf"))
            if STORE_LOGITS:
                tl.store(LOGITS + logits_row[:, None] + offs_n[None, :], s, mask=gmask[:, None] & real[None, :])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        # the new token, in the split that holds the spare slot: one more softmax term (selected into the
        # loop's tiles instead, between the loads and the tl.dot, it made a step 19.8 us instead of 16.7 on the H200)
        spare_g = tl.zeros([GP], dtype=tl.int32) + spare  # as a vector: a mask the interpreter takes
        mine = (spare_g >= start) & (spare_g < stop)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
        s_new = tl.where(mine, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_new = tl.exp2(s_new - m_safe)
        alpha = tl.exp2(m_i - m_safe)
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        l_i = l_i * alpha + p_new
        m_i = m_new
        if STORE_LOGITS:
            tl.store(LOGITS + logits_row + spare, s_new, mask=gmask & mine)
        row = (b * Hq + heads) * n_splits + split
        tl.store(PO + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
        tl.store(PM + row, m_i, mask=gmask)
        tl.store(PL + row, l_i, mask=gmask)


@triton.jit
def _normaliser(pm, pl):
    """The kept slots' softmax normaliser per query head from the splits' maxima ``pm`` and sums ``pl``
    (``[GP, SP]``, log2 units): ``(w_split [GP, SP], l_sum, has_keys, lse_kept)``."""
    m_max = tl.max(pm, 1)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w_split = tl.exp2(pm - m_safe[:, None])
    l_sum = tl.sum(w_split * pl, 1)
    has_keys = l_sum > 0
    lse_kept = tl.where(has_keys, m_safe + tl.log2(tl.where(has_keys, l_sum, 1.0)), float("-inf"))
    return w_split, l_sum, has_keys, lse_kept


@triton.jit
def _merge(Out, KN, VN, K, V, PO, PM, PL, PHI_ACC, PSI_ACC, HS, Z, KS, KM, KMS, PENDING, SPARE, b, kvh, bh, base, heads,
           rows, gmask, offs_s, smask, o_b, o_h, n_b, n_h, Hq,
           GP: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
           STATE: tl.constexpr, STATE_PER_QUERY: tl.constexpr, PDL: tl.constexpr):
    """The output of a (row, KV head) and its cache update, from launch 1's results only: finish
    ``phi`` (and ``psi`` of the pending token, folded into ``HS``/``Z`` with its value, fp32; ``psi``
    as ``less_reference.key_features``), merge the splits' partials with the state term into ``Out``,
    write the new token's key and value to the spare slot, and zero the feature accumulators.

    Every load is issued before any result is used, whether a token is pending or not (the fold is
    masked, not branched on): the program waits on memory twice (the spare slot's index, then the
    rest), not once per step of the computation. (Launch 1 copying the pending token's value for it,
    so that it waits once, measured no faster on the H200.)"""
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    dmask = offs_d < D
    rmask = offs_r < R
    gr = gmask[:, None] & rmask[None, :]
    # the cache, the state and the maps first (launch 1 writes none of them), then launch 1's results
    spare = tl.load(SPARE + bh)
    k_new = tl.load(KN + b * n_b + kvh * n_h + offs_d, mask=dmask, other=0.0)
    v_new = tl.load(VN + b * n_b + kvh * n_h + offs_d, mask=dmask, other=0.0)
    if STATE:
        pending = tl.load(PENDING + bh) != 0
        phi_p = PHI_ACC + (b * Hq + heads)[:, None] * R + offs_r[None, :]
        if STATE_PER_QUERY:  # state heads = this KV head's query heads
            sh = b * Hq + heads  # [GP]
            hs_p = HS + (sh[:, None, None] * R + offs_r[None, :, None]) * D + offs_d[None, None, :]
            hmask = gmask[:, None, None] & rmask[None, :, None] & dmask[None, None, :]
            z_p = Z + sh[:, None] * R + offs_r[None, :]
            zmask = gr
            psi_p = PSI_ACC + sh[:, None] * R + offs_r[None, :]
            j = heads[:, None]  # state head index within the row, [GP, 1]
            mix = tl.load(KM + (j[:, :, None] * R + offs_r[None, :, None]) * R + offs_r[None, None, :],
                          mask=gmask[:, None, None] & rmask[None, :, None] & rmask[None, None, :], other=0.0)
        else:  # one state head per KV head
            hs_p = HS + (bh * R + offs_r[:, None]) * D + offs_d[None, :]
            hmask = rmask[:, None] & dmask[None, :]
            z_p = Z + bh * R + offs_r
            zmask = rmask
            psi_p = PSI_ACC + bh * R + offs_r
            j = kvh
            mix = tl.load(KM + kvh * R * R + offs_r[:, None] * R + offs_r[None, :],
                          mask=rmask[:, None] & rmask[None, :], other=0.0)
        hs = tl.load(hs_p, mask=hmask, other=0.0)
        z = tl.load(z_p, mask=zmask, other=0.0)
        scale = tl.abs(tl.load(KS + j * R + offs_r, mask=zmask, other=0.0).to(tl.float32))
        mix_scale = tl.load(KMS + j * R + offs_r, mask=zmask, other=0.0).to(tl.float32)
    v_old = tl.load(V + (base + spare) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()  # launch 1 done, its results visible
    pm = tl.load(PM + rows[:, None] + offs_s[None, :], mask=gmask[:, None] & smask[None, :], other=float("-inf"))
    pl = tl.load(PL + rows[:, None] + offs_s[None, :], mask=gmask[:, None] & smask[None, :], other=0.0)
    po = tl.load(PO + (rows[:, None, None] + offs_s[None, :, None]) * D + offs_d[None, None, :],
                 mask=gmask[:, None, None] & smask[None, :, None] & dmask[None, None, :], other=0.0)
    if STATE:
        phi_pre = tl.load(phi_p, mask=gr, other=0.0)
        psi_pre = tl.load(psi_p, mask=zmask, other=0.0)

    # merge the splits
    w_split, l_sum, has_keys, lse_kept = _normaliser(pm, pl)
    out = tl.sum(w_split[:, :, None] * po, 1) / tl.where(has_keys, l_sum, 1.0)[:, None]
    if STATE:
        phi = tl.abs(_gelu(phi_pre))
        f = _gelu(psi_pre) * scale  # psi of the pending token
        if STATE_PER_QUERY:
            f = tl.abs(f + tl.sum(f[:, :, None] * mix.to(tl.float32), 1) * mix_scale)
            hs = tl.where(pending, hs + f[:, :, None] * v_old[None, None, :], hs)
            z = tl.where(pending, z + f, z)
            num = tl.sum(phi[:, :, None] * hs, 1)
            den = tl.sum(phi * z, 1)
            has_state = tl.sum(z, 1) > 0
        else:
            f = tl.abs(f + tl.sum(f[:, None] * mix.to(tl.float32), 0) * mix_scale)
            hs = tl.where(pending, hs + f[:, None] * v_old[None, :], hs)
            z = tl.where(pending, z + f, z)
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
    # Every warp has read the accumulators and the pending token's value: the stores below do not
    # depend on those loads, so without this barrier one warp could overwrite what another has yet
    # to read (the interpreter, one thread, never shows it).
    tl.debug_barrier()
    if STATE:
        tl.store(phi_p, tl.zeros([GP, BLOCK_R], dtype=tl.float32), mask=gr)
        if pending:
            tl.store(hs_p, hs, mask=hmask)
            tl.store(z_p, z, mask=zmask)
            tl.store(psi_p, tl.zeros_like(psi_pre), mask=zmask)
    # the new token's key and value (after the pending token's value was read)
    tl.store(K + (base + spare) * D + offs_d, k_new.to(K.dtype.element_ty), mask=dmask)
    tl.store(V + (base + spare) * D + offs_d, v_new.to(V.dtype.element_ty), mask=dmask)


@triton.jit
def _score_slots(RANK, SCORE, LOGITS, PM, PL, base, logits_row, rows, gmask, offs_s, smask, start, stop, spare, qr,
                 sink, recent, S, BLOCK_E: tl.constexpr, HEAVY: tl.constexpr):
    """Slots ``[start, stop)`` of a (row, KV head) (``base``: its first slot; ``logits_row [GP]``: its query
    heads' rows of ``LOGITS``; ``rows [GP]``: their first partial): this step's probabilities added to
    the heavy-hitter scores (``HEAVY``; the kept slots' normaliser merged from the splits' ``PM``/``PL``,
    loaded beside the slots' logits so that the two wait together) and the eviction candidate,
    ``(lowest key, its slot, first empty slot)`` (key: the score, or the rank for sink + recent; the
    spare slot counts as the new token, rank ``qr``)."""
    best_key = float("inf")
    best_idx = start
    first_empty = S
    for block in range(start, stop, BLOCK_E):
        offs_n = block + tl.arange(0, BLOCK_E)
        nmask = offs_n < stop
        is_new = offs_n == spare
        kr = tl.load(RANK + base + offs_n, mask=nmask, other=0)
        old = tl.load(SCORE + base + offs_n, mask=nmask, other=0.0)
        kr = tl.where(is_new, qr, kr)
        if HEAVY:
            s = tl.load(LOGITS + logits_row[:, None] + offs_n[None, :], mask=gmask[:, None] & nmask[None, :],
                        other=float("-inf"))
            pm = tl.load(PM + rows[:, None] + offs_s[None, :], mask=gmask[:, None] & smask[None, :],
                         other=float("-inf"))
            pl = tl.load(PL + rows[:, None] + offs_s[None, :], mask=gmask[:, None] & smask[None, :], other=0.0)
            _, _, has_keys, lse_kept = _normaliser(pm, pl)
            p = tl.where(has_keys[:, None], tl.exp2(s - tl.where(has_keys, lse_kept, 0.0)[:, None]), 0.0)
            score = tl.where(is_new, 0.0, old) + tl.sum(p, 0)
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
    return best_key, best_idx, first_empty


@triton.jit
def _finish_kernel(Out, KN, VN, K, V, PO, PM, PL, PHI_ACC, PSI_ACC, HS, Z, KS, KM, KMS, QR, RANK, SCORE, SPARE,
                   PENDING, LOGITS, CAND_KEY, CAND_IDX, CAND_EMPTY, COUNT,
                   o_b, o_h, n_b, n_h, Hq, Hkv, S, n_splits, split_len, sink, recent,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_R: tl.constexpr, SP: tl.constexpr, BLOCK_E: tl.constexpr, STATE: tl.constexpr,
                   STATE_PER_QUERY: tl.constexpr, HEAVY: tl.constexpr, PDL: tl.constexpr):
    """Launch 2 of a decode step: per (row, KV head), one merge program and one program per split,
    numbered in that order.

    * The merge program (``_merge``, from launch 1's results only): the output and the cache update.
    * Split programs: this step's probabilities of its ``split_len`` slots added to the heavy-hitter
      scores (the normaliser merged from all splits' ``(max, sum)``), the new token's rank and score
      written to the spare slot, and the slots' eviction candidate (lowest-scored evictable slot,
      first empty slot) written to ``CAND_*``.

    The last of a (row, KV head)'s ``n_splits + 1`` programs to finish (``COUNT``, an atomic counter
    it resets) picks the next spare slot and the pending flag (after everyone has read them).
    """
    pid = tl.program_id(0)
    n_merge = tl.num_programs(0) // (n_splits + 1)  # B * Hkv
    is_merge = pid < n_merge
    bh = tl.where(is_merge, pid, (pid - n_merge) // n_splits)
    split = (pid - n_merge) % n_splits
    b = bh // Hkv
    kvh = bh % Hkv
    offs_g = tl.arange(0, GP)
    offs_s = tl.arange(0, SP)
    gmask = offs_g < G
    smask = offs_s < n_splits
    heads = kvh * G + offs_g
    rows = (b * Hq + heads) * n_splits  # [GP] first partial of each query head
    base = bh.to(tl.int64) * S
    if is_merge:
        _merge(Out, KN, VN, K, V, PO, PM, PL, PHI_ACC, PSI_ACC, HS, Z, KS, KM, KMS, PENDING, SPARE, b, kvh, bh, base,
               heads, rows, gmask, offs_s, smask, o_b, o_h, n_b, n_h, Hq,
               GP, D, R, BLOCK_D, BLOCK_R, STATE, STATE_PER_QUERY, PDL)
    else:
        qr = tl.load(QR + b).to(tl.int32)
        spare = tl.load(SPARE + bh)
        if PDL:
            gdc_wait()
        start = split * split_len
        stop = tl.minimum(start + split_len, S)
        best_key, best_idx, first_empty = _score_slots(RANK, SCORE, LOGITS, PM, PL, base,
                                                       (b * Hq + heads).to(tl.int64) * S, rows, gmask, offs_s, smask,
                                                       start, stop, spare, qr, sink, recent, S, BLOCK_E, HEAVY)
        if (spare >= start) & (spare < stop):
            tl.store(RANK + base + spare, qr)
            if not HEAVY:
                tl.store(SCORE + base + spare, 0.0)
        cand = bh * n_splits + split
        tl.store(CAND_KEY + cand, best_key)
        tl.store(CAND_IDX + cand, best_idx)
        tl.store(CAND_EMPTY + cand, first_empty)
    # every warp's loads (SPARE, PENDING) and stores (CAND_*, SCORE, RANK, the cache) before the one
    # thread's release
    tl.debug_barrier()
    if tl.atomic_add(COUNT + bh, 1, sem="acq_rel") == n_splits:  # the last program of this (row, KV head)
        # the next spare slot: the lowest-scored evictable slot (first on ties), or the first empty one
        cands = bh * n_splits + offs_s
        keys = tl.load(CAND_KEY + cands, mask=smask, other=float("inf"), volatile=True)
        idx = tl.load(CAND_IDX + cands, mask=smask, other=S, volatile=True)
        empties = tl.load(CAND_EMPTY + cands, mask=smask, other=S, volatile=True)
        best = tl.min(keys, 0)
        victim = tl.min(tl.where(keys == best, idx, S), 0)
        victim = tl.where(best == float("inf"), 0, victim)
        first_empty = tl.min(empties, 0)
        full = first_empty == S
        tl.store(SPARE + bh, tl.where(full, victim, first_empty).to(tl.int32))
        if STATE:
            tl.store(PENDING + bh, (full & (best < float("inf"))).to(tl.int32))
        else:
            tl.store(PENDING + bh, 0)
        tl.store(COUNT + bh, 0)


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(n))


_WORKSPACES: dict[tuple, dict[str, torch.Tensor]] = {}


def _workspace(dev, b, hq, hkv, hs, rank, d, slots, splits) -> dict[str, torch.Tensor]:
    """Per-step scratch of one shape, allocated once: attention partials, logits, eviction candidates
    (overwritten every step) and the feature accumulators and counters (zero between steps)."""
    key = (str(dev), b, hq, hkv, hs, rank, d, slots, splits)
    ws = _WORKSPACES.get(key)
    if ws is None:
        f32 = dict(dtype=torch.float32, device=dev)
        ws = dict(po=torch.empty(b * hq * splits, d, **f32), pm=torch.empty(b * hq * splits, **f32),
                  pl=torch.empty(b * hq * splits, **f32), logits=torch.empty(b * hq * slots, **f32),
                  phi=torch.zeros(b * hq, rank, **f32), psi=torch.zeros(b * hs, rank, **f32),
                  cand_key=torch.empty(b * hkv * splits, **f32),
                  cand_idx=torch.empty(b * hkv * splits, dtype=torch.int32, device=dev),
                  cand_empty=torch.empty(b * hkv * splits, dtype=torch.int32, device=dev),
                  count=torch.zeros(b * hkv, dtype=torch.int32, device=dev))
        _WORKSPACES[key] = ws
    return ws


def launches(state: bool = True) -> int:
    """Kernel launches of one decode step (and no other GPU op)."""
    return 2


def decode_step(q, k_new, v_new, q_rank, cache: reference.LessCache, w: reference.FeatureWeights,
                policy: reference.Policy, scale: float, state: bool = True, splits: int | None = None) -> torch.Tensor:
    """One decode step; same contract as :func:`kvpress.kernels.less_reference.decode_step`.
    ``splits``: programs per (row, KV head) along the slots (default: enough to fill the GPU, at
    most ``MAX_SPLITS``, or ``MAX_SPLITS_NO_STATE`` with ``state=False``)."""
    b, hq, _, d = q.shape
    _, hkv, slots, _ = cache.k.shape
    g = hq // hkv
    hs_heads, rank_r = cache.hs.shape[1], cache.hs.shape[2]
    n_hidden = w.q_w1.shape[2]
    for name in ("k", "v", "rank", "score", "hs", "z", "spare", "pending"):
        if not getattr(cache, name).is_contiguous():
            setattr(cache, name, getattr(cache, name).contiguous())
    if q.stride(3) != 1 or k_new.stride(3) != 1 or v_new.stride(3) != 1 or k_new.stride() != v_new.stride():
        q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    if q_rank.dtype not in (torch.int32, torch.int64) or not q_rank.is_contiguous():
        q_rank = q_rank.to(torch.int32).contiguous()
    dev = q.device
    if splits is None:
        programs = 2 * (torch.cuda.get_device_properties(dev).multi_processor_count if q.is_cuda else 2)
        splits = math.ceil(programs / (b * hkv))
    splits = max(1, min(splits, MAX_SPLITS if state else MAX_SPLITS_NO_STATE, math.ceil(slots / BLOCK_N)))
    split_len = math.ceil(math.ceil(slots / splits) / BLOCK_N) * BLOCK_N
    splits = math.ceil(slots / split_len)
    ws = _workspace(dev, b, hq, hkv, hs_heads, rank_r, d, slots, splits)
    pdl = USE_PDL and has_pdl(dev)
    heavy = policy.heavy > 0
    block_d, block_r = _pow2(d, 16), _pow2(rank_r, 2)
    chunks = math.ceil(n_hidden / BLOCK_H)
    n_phi = b * hq * chunks if state else 0
    n_fold = b * hs_heads * chunks if state else 0
    _step_kernel[(n_phi + n_fold + b * hkv * splits,)](
        q, q_rank, k_new, v_new, cache.k, cache.v, cache.rank, cache.spare, cache.pending,
        ws["po"], ws["pm"], ws["pl"], ws["logits"], ws["phi"], ws["psi"], w.q_w1, w.q_w2, w.k_w1, w.k_w2,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), hq, hkv, hs_heads, slots, n_hidden,
        n_phi, n_fold, splits, split_len, scale * LOG2E,
        G=g, GP=_pow2(g, 16), D=d, BLOCK_D=block_d, R=rank_r, BLOCK_R=block_r, BLOCK_H=BLOCK_H, CHUNKS=chunks,
        BLOCK_N=BLOCK_N, STORE_LOGITS=heavy, PDL=pdl, num_warps=STEP_WARPS, num_stages=STEP_STAGES, **OPTIONS)
    out = torch.empty(b, hq, 1, d, dtype=q.dtype, device=dev)
    try:
        _finish_kernel[(b * hkv * (splits + 1),)](
            out, k_new, v_new, cache.k, cache.v, ws["po"], ws["pm"], ws["pl"], ws["phi"], ws["psi"], cache.hs,
            cache.z, w.k_scale, w.k_mix, w.k_mix_scale, q_rank, cache.rank, cache.score, cache.spare, cache.pending,
            ws["logits"], ws["cand_key"], ws["cand_idx"], ws["cand_empty"], ws["count"],
            out.stride(0), out.stride(1), k_new.stride(0), k_new.stride(1), hq, hkv, slots, splits, split_len,
            policy.sink, policy.recent,
            G=g, GP=_pow2(g, 2), D=d, R=rank_r, BLOCK_D=block_d, BLOCK_R=block_r, SP=_pow2(splits, 2),
            BLOCK_E=BLOCK_E, STATE=state, STATE_PER_QUERY=hs_heads != hkv, HEAVY=heavy, PDL=pdl,
            num_warps=FINISH_WARPS, launch_pdl=pdl, **OPTIONS)
    except BaseException:  # e.g. launch 2 refused by the device: leave the workspace as a step leaves it
        ws["phi"].zero_()  # launch 1 added into the feature accumulators, which launch 2 zeroes
        ws["psi"].zero_()
        raise
    return out


@triton.jit
def _column_mass_kernel(Q, K, QR, KR, LSE, MASS,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
                        stride_qrb, Lq, Lk, Hkv, qk_scale,
                        G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Prefill, heavy hitters: for a block of ``BLOCK_N`` candidate keys of a (row, KV head), the
    attention probability each gets from every query of the KV head's ``G`` query heads (rows of
    ``G x BLOCK_M`` stacked as in ``prefill._prefill_kernel``), summed, from the queries' ``LSE``
    (natural log): ``MASS [B * Hkv, Lk]``. Query blocks whose highest rank is below the block's
    lowest key rank are skipped (the causal part)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < Lk
    kr = tl.load(KR + pid_bh.to(tl.int64) * Lk + offs_n, mask=nmask, other=-1)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
    k_low = tl.min(tl.where(kr >= 0, kr, 1 << 30), 0)
    rows = tl.arange(0, BLOCK_M * GP)
    g = rows // BLOCK_M
    heads = (kvh * G + g).to(tl.int64)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, Lq, BLOCK_M):
        t = start + rows % BLOCK_M
        row_ok = (g < G) & (t < Lq)
        qr = tl.load(QR + b * stride_qrb + t, mask=row_ok, other=-1)
        if tl.max(qr, 0) >= k_low:
            q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + t[:, None].to(tl.int64) * stride_qm
                        + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            lse = tl.load(LSE + b * stride_lb + heads * stride_lh + t, mask=row_ok, other=float("-inf"))
            seen = lse > float("-inf")
            s = tl.dot(q, tl.trans(k)) * qk_scale
            ok = seen[:, None] & (kr[None, :] >= 0) & (kr[None, :] <= qr[:, None])
            p = tl.where(ok, tl.exp2(s - tl.where(seen, lse * 1.4426950408889634, 0.0)[:, None]), 0.0)
            mass += tl.sum(p, 0)
    tl.store(MASS + pid_bh.to(tl.int64) * Lk + offs_n, mass, mask=nmask)


MASS_BLOCK_N = 64  # candidate keys per program of the prefill's column mass
MASS_ROWS = 64  # query rows per step: BLOCK_M tokens x (G padded to a power of two) heads


def column_mass(q, keys, ranks, q_rank, lse, scale: float) -> torch.Tensor:
    """``kept_attention``'s ``mass [B, Hkv, Lk]`` from the queries' ``lse`` (Triton)."""
    b, hq, n, d = q.shape
    hkv, lk = keys.shape[1], keys.shape[2]
    g = hq // hkv
    gp = _pow2(g)
    mass = torch.empty(b, hkv, lk, dtype=torch.float32, device=q.device)
    ranks = ranks.to(torch.int32).contiguous()
    q_rank = q_rank.to(torch.int32).contiguous()
    _column_mass_kernel[(triton.cdiv(lk, MASS_BLOCK_N), b * hkv)](
        q, keys, q_rank, ranks, lse, mass,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        lse.stride(0), lse.stride(1), q_rank.stride(0), n, lk, hkv, scale * LOG2E,
        G=g, GP=gp, BLOCK_M=max(1, MASS_ROWS // gp), BLOCK_N=MASS_BLOCK_N, BLOCK_D=_pow2(d, 16), D=d,
        num_warps=4, num_stages=2, **OPTIONS)
    return mass


def kept_attention(q, keys, values, ranks, q_rank, scale: float, heavy: bool):
    """``less_reference.kept_attention`` with Triton kernels: the rank-masked prefill attention of
    ``kernels.prefill`` (ranks per KV head, log-sum-exp returned), then, for heavy hitters, the
    column mass from that log-sum-exp. No ``L x L`` matrix."""
    b, hq, n, d = q.shape
    out = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    prefill_attention(q, keys, values, q_rank, ranks, scale, out=out, lse=lse)
    return out, lse, column_mass(q, keys, ranks, q_rank, lse, scale) if heavy else None


def prefill_step(q, k_new, v_new, q_rank, cache: reference.LessCache, w: reference.FeatureWeights,
                 policy: reference.Policy, scale: float, state: bool = True) -> torch.Tensor:
    """A forward of several tokens: :func:`less_reference.prefill_step` with the attention and the
    heavy-hitter mass of :func:`kept_attention` where the kernels serve ``q`` (else the torch
    reference, its queries chunked so that one chunk's logits stay under ~256 MiB)."""
    if available(q):
        return reference.prefill_step(q, k_new, v_new, q_rank, cache, w.to(torch.float32), policy, scale,
                                      state=state, attend=kept_attention)
    keys = cache.k.shape[2] + k_new.shape[2]
    chunk = max(16, (1 << 26) // max(1, q.shape[0] * q.shape[1] * keys))
    return reference.prefill_step(q, k_new, v_new, q_rank, cache, w.to(torch.float32), policy, scale,
                                  state=state, query_chunk=chunk)
