"""Triton decode attention over Palu's latent KV cache (arXiv 2407.21118), one pass per token block.

A decode step (one query token per row) reads each cached token's key and value *latents* once from
HBM: one program per KV head and block of cached tokens (split-K over the tokens, so a long sequence
fills the GPU) (dequantises and) rebuilds its head's pre-RoPE keys from its group's latents
(``h @ up.T``, fp32 accumulation), adds the key bias, applies the per-head ``k_norm`` (Qwen3),
rotates them at each token's own position (rope rows per slot, or half tables gathered by
position), scores them against the head's query heads, exponentiates the scores against one reference
per program (``FIXED_MAX``; or a running maximum) and accumulates the softmax-weighted *value
latents* (values are never rebuilt per token). The ``gs`` programs of a group read the same latents
(the repeats come from L2). A second small kernel (a programmatic dependent launch on Hopper) merges
each query head's splits and up-projects its value latent once (``up_v`` of its KV head, plus the
value bias), writing the attention output ``[B, Hq, 1, D]``. New tokens' latents are quantised by
:func:`quantize` (one launch, the reference's bits).

Cost per cached token and KV head at group rank ``r`` (group of ``gs`` KV heads): ``2 * D * r`` FLOP
to rebuild its keys against ``2 * r / gs`` latent values read from HBM (``bits / 8`` bytes each when
quantised). With ``gs = 1`` and ``r = D / 2`` (Palu-50%) that is 64 FLOP per byte in bf16, below
the H200's ~165 FLOP/B ridge; groups of ``gs`` heads at the same ratio rebuild ``gs`` times more per
byte and soon become compute-bound (the quality / speed trade-off of G-LRD, measured in
``benchmarks/bench_palu.py``): small groups are the fast ones.

Shared memory: the tiles and the pipelining depth come from the shapes (:func:`plans`: a
conservative estimate under ``SMEM_BUDGET``; a launch that still runs out of shared memory retries
with the next, smaller plan). When the key rank is more than one ``tl.dot`` chunk, the chunks are the
innermost loop, so shared memory holds one chunk per stage whatever the rank.

Masks come from token ranks (``kvpress.kernels.reference``): any batch with left padding, the
model's sliding window. Tiles are constexpr. With at least one tile of tokens every load reads a whole
tile with no mask (``WHOLE_BLOCKS``: a split's last, partial tile is the tile that ends at its end, the
tokens it repeats masked in the scores); otherwise the loads are masked at the boundaries.
``kvpress.kernels.palu_reference`` is the CPU path and the test oracle.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import palu_reference as ref
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .launch import OPTIONS, Launcher, has_packed_cvt, has_pdl

BLOCK_N = 64  # cached tokens per inner step (largest; the plan lowers it when shared memory is short)
NUM_WARPS = 4
NUM_STAGES = 3  # software-pipelining depth of the innermost loop (the plan lowers it when short)
PREFETCH = False  # issue the loads no tl.dot takes (ranks, rope rows, quantised words) a block ahead by hand
PREFETCH_ROWS = True  # with PREFETCH, the ranks and rope rows too (False: only the quantised words; Triton's
# pipeliner stages the rows through shared memory, where the rotation reads them in its own layout)
ROPE_IN_DTYPE = False  # rotate the rebuilt keys in the model's dtype (as transformers does) instead of fp32
PROGRAMS_PER_SM = 2  # split-K aims at this many programs per SM
# KV heads per program (consecutive heads; 1 when the KV heads are not a multiple): they share each block's rope
# rows, ranks and masks, loaded once (with one head per program the rows are half of what it reads, from L2).
# Two are faster only at 4 bits on MHA (round 37; TUNED)
HEADS_PER_PROGRAM = 1
MAX_REGISTERS = 0  # registers per thread the decode kernel may use (Triton's maxnreg; 0: the compiler's choice)
QUERY_TILE = 16  # the query heads of a KV head padded to at least this many (the N of the score and value dots)
# One softmax reference per program (the first block's maximum) instead of a running maximum: no block reduces
# across warps (see _palu_decode_kernel). FIXED_MAX_RANGE: how far (log2 units) a split's maximum may lie from it
# before the split runs again against its maximum (p <= 2^64: fp32 sums of 2^17 tokens of |v| < 2^16 stay finite;
# scores more than 64 below the maximum are under 2^-64 of it).
FIXED_MAX = True
# One query head per KV head (MHA): the query folded into the key up rows once per program, so that the block's
# MMA gives q1 * k1 + q2 * k2 and q2 * k1 - q1 * k2 per rotary pair, and the score is their sum weighted by the
# block's cos / sin rows (one MMA against ones), instead of rotating the keys and a score MMA (see the kernel)
FOLD_QUERY = True
FIXED_MAX_RANGE: tl.constexpr = tl.constexpr(64.0)
TUNABLE = ("BLOCK_N", "NUM_WARPS", "NUM_STAGES", "PROGRAMS_PER_SM", "HEADS_PER_PROGRAM", "ROPE_IN_DTYPE", "PREFETCH",
           "PREFETCH_ROWS", "MAX_REGISTERS", "QUERY_TILE", "FIXED_MAX", "FOLD_QUERY")
# Settings measured best on an H200 (``benchmarks/bench_palu.py sweep``) per (key-latent bits (0:
# unquantised), query heads per KV head (None: any)), over the module defaults above; names as the
# module constants. 128K tokens, Llama-3-8B shape (and MHA: 32 KV heads), groups of one KV head, half
# rank, the rope rows per slot (as the runtime keeps them). Round 16 (palu_sweep_r16{,_mha}_NVIDIA_H200.json):
# bf16 latents without the hand prefetch, two programs per SM (the rows double-buffered: 94 KB of shared
# memory each), query heads padded to 8 (mma.sync for the score and value dots): 92.4 us (GQA) and 334.6 us
# (MHA) against 103.3 / 366.6 with three programs per SM at two stages (single buffers); with the keys rebuilt
# by one MMA chain (round 18, palu_layer_r18_*_NVIDIA_H200.json) 89.5 / 318.3 us. Round 20
# (palu_sweep_r20{,_mha}_NVIDIA_H200.json): one softmax reference per program (FIXED_MAX), 90.1 -> 83.6 us (GQA)
# and 317.8 -> 286.2 us (MHA); at 4 bits with the hand prefetch 130.7 -> 119.5 and 476.2 -> 446.7 us against
# a softmax state per warp (rounds 12 and 14; an option since removed). The rotation in bf16 (as transformers
# rounds it; fewer instructions per block): 131 us against 152 in fp32 (palu_sweep_r6_NVIDIA_H200.json). 2 and 3
# bits take the 4-bit setting (round 27, palu_sweep_r27{,_mha}_NVIDIA_H200.json: 3 bits 1388.7 -> 222.5 us, 2 bits
# 185.4 -> 144.1 us on the 8B shape against the first sweep's 32-token tiles without the prefetch). Tables gathered
# by position (the other input form) were fastest at three programs per SM under a 168-register cap (round 15:
# 114.0 us).
# Quantised latents (round 42, palu_sweep_r42{,_mha}_NVIDIA_H200.json, 128K): only the words a block ahead by hand, the
# ranks and rope rows left to Triton's pipeliner (PREFETCH_ROWS=False), one KV head per program: 8B shape 93.7 / 95.2 /
# 90.5 us at 4 / 3 / 2 bits against 110.0 / 112.4 / 109.3 with the rows ahead too, MHA 350.6 / 353.1 / 336.9 against
# 393.3 / 401.8 / 380.4 (round 40's two heads per program for 3 bits: 101.7 and 370.1 us in that run).
_QUANTISED = dict(BLOCK_N=64, NUM_WARPS=4, NUM_STAGES=3, PROGRAMS_PER_SM=2, PREFETCH=True, PREFETCH_ROWS=False,
                  ROPE_IN_DTYPE=True, QUERY_TILE=8)
TUNED: dict[tuple[int, int | None], dict] = {
    (0, None): dict(BLOCK_N=64, NUM_WARPS=4, NUM_STAGES=3, PROGRAMS_PER_SM=2, PREFETCH=False, ROPE_IN_DTYPE=True,
                    QUERY_TILE=8),
    **{(bits, None): _QUANTISED for bits in (2, 3, 4)},
    # 4- and 2-bit MHA: two KV heads per program at two stages (round 37, palu_sweep_r37_mha_NVIDIA_H200.json: 4 bits
    # 347.8 against 374.0 us at 128K; bf16 slower with two heads, 317.2 against 279.5 us). With the query folded
    # (FOLD_QUERY, round 44, palu_sweep_r44q_mha_NVIDIA_H200.json, 128K): 4 bits 339.9 us (one head 400.1), 2 bits 323.7
    # (one head 362.6; the rows ahead 383.6), 3 bits one head 342.6 (two 356.9); bf16 266.3 against 275.6 unfolded
    (4, 1): dict(_QUANTISED, NUM_STAGES=2, HEADS_PER_PROGRAM=2),
    (2, 1): dict(_QUANTISED, NUM_STAGES=2, HEADS_PER_PROGRAM=2),
}
MAX_SPLITS = 256
MERGE_SPLITS = 64  # partials merged per step of the merge kernel
USE_PDL = True  # the merge kernel as a programmatic dependent launch of the decode kernel (Hopper and later)
NO_LIMIT = 1 << 30
SMEM_BUDGET = 200 * 1024  # bytes of shared memory a plan may use by estimate (H200: 227 KB per block)


@triton.jit
def _narrow(x, dtype: tl.constexpr, PACKED: tl.constexpr):
    """``x`` (fp32) rounded to ``dtype`` (to nearest even). ``PACKED`` (CUDA, bf16/fp16 ``dtype``): two
    values per instruction (``cvt.rn.bf16x2.f32``), where ``.to`` converts them one by one and then
    pairs them with a byte permute each (sm_90a SASS, triton 3.6: 3 instructions per pair, not 1)."""
    if PACKED:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.bfloat16,
                                             is_pure=True, pack=2)
        if dtype == tl.float16:
            return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.float16,
                                             is_pure=True, pack=2)
    return x.to(dtype)


@triton.jit
def _raw_tile(L, S, row0, srow0, row, c0, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr,
              NQ: tl.constexpr, WORDS: tl.constexpr, FAST: tl.constexpr, row_ok):
    """The loads of a quantised latent tile (token rows ``row0 + row`` of ``L``, ``srow0 + row`` of the
    scales/minima ``S``; ``row0``/``srow0`` scalars, ``row`` the block's int32 offsets; channels
    ``c0 .. c0 + C``): ``(words, scales, minima)``. ``FAST`` (tiles of whole words and whole quantisation
    groups): ``[BLOCK_N, C / per_word]`` words of the first plane and ``[BLOCK_N, C / QG]`` scales, each loaded
    once; otherwise every channel gathers its word, scale and minimum (``[BLOCK_N, C]`` each). 3 bits
    (``QuantSpec.planes``: the low 2 bits 16 codes per word, then the high bit 32 per word): ``(low words, high
    words)``, each low word's high word shifted so that its 16 channels sit at ``_shift(k, 1) + 2``, ``k < 16``
    (channel pair ``m`` at bits ``m + 2`` and ``m + 18``)."""
    base = L + row0 * WORDS
    scales = S + srow0 * (2 * NQ)
    PLANE: tl.constexpr = 2 if BITS == 3 else BITS  # bits of the first plane
    PER_WORD: tl.constexpr = 32 // PLANE
    if FAST:
        w = c0 // PER_WORD + tl.arange(0, C // PER_WORD)
        q = c0 // QG + tl.arange(0, C // QG)
        mask = row_ok[:, None]
    else:
        cols = c0 + tl.arange(0, C)
        w = cols // PER_WORD
        q = cols // QG
        mask = row_ok[:, None] & (cols < R)[None, :]
    words = tl.load(base + row[:, None] * WORDS + w[None, :], mask=mask, other=0)
    if BITS == 3:
        LOW_WORDS: tl.constexpr = (R + 15) // 16
        if FAST and C >= 32:  # the tile's high words, loaded once each, split into their halves' words
            hw = c0 // 32 + tl.arange(0, C // 32)
            high = tl.load(base + row[:, None] * WORDS + LOW_WORDS + hw[None, :], mask=mask, other=0)
            high = tl.reshape(tl.join(high << 2, high >> 6), [row.shape[0], C // 16])
        else:
            high = tl.load(base + row[:, None] * WORDS + LOW_WORDS + (w // 2)[None, :], mask=mask, other=0)
            high = tl.where((w % 2 == 0)[None, :], high << 2, high >> 6)
        words = (words, high)
    scale = tl.load(scales + row[:, None] * (2 * NQ) + q[None, :], mask=mask, other=0.0)
    low = tl.load(scales + row[:, None] * (2 * NQ) + NQ + q[None, :], mask=mask, other=0.0)
    return words, scale, low


@triton.jit
def _shift(k, BITS: tl.constexpr):
    """Bit offset of code ``k`` of an int32 word (``QuantSpec.shifts``: even codes in the low 16 bits, odd ones in
    the high 16 bits)."""
    return (k // 2) * BITS + 16 * (k % 2)


@triton.jit
def _code(words, shift, BITS: tl.constexpr):
    """The code at bit ``shift`` of each int32 word as an exact fp32, with no int-to-float conversion (a
    quarter-rate instruction): the bits of ``2^23 + code`` read as fp32, less ``2^23``."""
    code = (words >> shift) & ((1 << BITS) - 1)
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


# 2- and 4-bit codes to bf16 / fp16 two at a time: channels 2m and 2m + 1 of a word lie 16 bits apart
# (QuantSpec.shifts), so one shift by m * bits and one LOP3 put both in the halves of a register, masked and ORed
# into the mantissa of 2^7 (bf16) / 2^10 (fp16), and an FMA takes that power of two away again: exact codes in
# channel order, 1.5 instructions each. pack=2: the two elements of a call are the same word and shift ($1, $3).
# 3-bit codes: the low bits' word shifted by 2m, the high bits' word (its pair m at bits m + 2 and m + 18) by m,
# and a second LOP3 puts the high bit above the low two, 2.5 instructions per code.
def _pair_asm(kind: str, mask: int, magic: int, one: int, minus: int) -> str:
    return (f"{{ .reg .b32 t, one, minus; mov.b32 one, {one:#x}; mov.b32 minus, {minus:#x}; shr.b32 t, $1, $3; "
            f"lop3.b32 t, t, {mask:#x}, {magic:#x}, 0xEA; fma.rn.{kind} $0, t, one, minus; }}")


def _pair3_asm(kind: str, magic: int, one: int, minus: int) -> str:
    return (f"{{ .reg .b32 t, u, one, minus; mov.b32 one, {one:#x}; mov.b32 minus, {minus:#x}; shr.b32 t, $1, $5; "
            f"shr.b32 u, $3, $7; lop3.b32 u, u, 0x00040004, {magic:#x}, 0xEA; lop3.b32 t, t, 0x00030003, u, 0xEA; "
            f"fma.rn.{kind} $0, t, one, minus; }}")


_BF16_MAGIC = dict(magic=0x43004300, one=0x3F803F80, minus=0xC300C300)  # 2^7 in bf16: codes < 128 are exact
_FP16_MAGIC = dict(magic=0x64006400, one=0x3C003C00, minus=0xE400E400)  # 2^10 in fp16
_PAIRS_BF16_4 = tl.constexpr(_pair_asm("bf16x2", 0x000F000F, **_BF16_MAGIC))
_PAIRS_FP16_4 = tl.constexpr(_pair_asm("f16x2", 0x000F000F, **_FP16_MAGIC))
_PAIRS_BF16_2 = tl.constexpr(_pair_asm("bf16x2", 0x00030003, **_BF16_MAGIC))
_PAIRS_FP16_2 = tl.constexpr(_pair_asm("f16x2", 0x00030003, **_FP16_MAGIC))
_PAIRS_BF16_3 = tl.constexpr(_pair3_asm("bf16x2", **_BF16_MAGIC))
_PAIRS_FP16_3 = tl.constexpr(_pair3_asm("f16x2", **_FP16_MAGIC))


@triton.jit
def _per_pair(words, LEVELS: tl.constexpr):
    """Each word repeated once per channel pair by joins (copies in the registers of the thread that holds the
    word), ``[..., 2^LEVELS pairs as 2 x .. x 2, 2]``, and the index ``m`` of each pair."""
    w = words
    m = words * 0
    for level in tl.static_range(LEVELS):  # m: the channel pair, its most significant bit first
        w = tl.join(w, w)
        m = tl.join(m, m + (1 << (LEVELS - 1 - level)))
    return tl.join(w, w), tl.join(m, m)


@triton.jit
def _pairs(words, BITS: tl.constexpr, dtype: tl.constexpr, high=None):
    """The codes of int32 words of 2- or 4-bit codes (3 bits: ``words`` the low bits' words, ``high`` their high
    bits' words, 16 channels each, pair ``m`` at bits ``m + 2`` and ``m + 18``) as exact ``dtype`` values (bf16
    or fp16, on the GPU), ``[..., pairs as 2 x .. x 2, 2]`` in channel order."""
    w, m = _per_pair(words, 2 if BITS == 4 else 3)  # 4 channel pairs per word at 4 bits, else 8
    if BITS == 3:
        h, _ = _per_pair(high, 3)
        if dtype == tl.bfloat16:
            x = tl.inline_asm_elementwise(_PAIRS_BF16_3, "=r,r,r,r,r,r,r,r,r", [w, h, 2 * m, m], dtype=tl.bfloat16,
                                          is_pure=True, pack=2)
        else:
            x = tl.inline_asm_elementwise(_PAIRS_FP16_3, "=r,r,r,r,r,r,r,r,r", [w, h, 2 * m, m], dtype=tl.float16,
                                          is_pure=True, pack=2)
    elif dtype == tl.bfloat16:
        x = tl.inline_asm_elementwise(_PAIRS_BF16_4 if BITS == 4 else _PAIRS_BF16_2, "=r,r,r,r,r", [w, m * BITS],
                                      dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        x = tl.inline_asm_elementwise(_PAIRS_FP16_4 if BITS == 4 else _PAIRS_FP16_2, "=r,r,r,r,r", [w, m * BITS],
                                      dtype=tl.float16, is_pure=True, pack=2)
    return x


@triton.jit
def _dequant(words, scale, low, c0, C: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, FAST: tl.constexpr,
             BLOCK_N: tl.constexpr, dtype: tl.constexpr, PACKED: tl.constexpr = False):
    """Latents ``[BLOCK_N, C]`` from :func:`_raw_tile`'s loads, in fp32 then ``dtype``: codes packed
    ``32 // BITS`` per int32 word, channel ``c`` in word ``c // per_word`` at bit ``_shift(c % per_word)``
    (``FAST``: each word split into its codes in registers, ``[BLOCK_N, words, per_word] -> [BLOCK_N, C]``;
    ``PACKED``: ``code * scale + min`` in ``dtype``, one fused multiply-add for two codes, the codes made in
    ``dtype`` by :func:`_pairs`). 3 bits: a tile of words of the low 2 bits and one of the high bits
    (:func:`_raw_tile`), 16 channels per word each."""
    PLANE: tl.constexpr = 2 if BITS == 3 else BITS  # bits of the first plane
    PER_WORD: tl.constexpr = 32 // PLANE
    if BITS == 3:
        words, high = words
    if FAST:
        if PACKED:  # the codes straight to dtype
            x = _pairs(words, BITS, dtype, high if BITS == 3 else None)
        else:
            k = tl.arange(0, PER_WORD)
            x = _code(words[:, :, None], _shift(k, PLANE)[None, None, :], PLANE)
            if BITS == 3:
                x += _code(high[:, :, None], _shift(k, 1)[None, None, :] + 2, 1) * 4.0
        x = tl.reshape(x, [BLOCK_N, C // QG, QG])
        if PACKED:
            x = x * scale[:, :, None] + low[:, :, None]
        else:
            x = x * scale.to(tl.float32)[:, :, None] + low.to(tl.float32)[:, :, None]
        h = tl.reshape(x, [BLOCK_N, C])
    else:
        cols = c0 + tl.arange(0, C)
        codes = (words >> _shift(cols % PER_WORD, PLANE)[None, :]) & ((1 << PLANE) - 1)
        if BITS == 3:
            codes += ((high >> (_shift(cols % PER_WORD, 1) + 2)[None, :]) & 1) << 2
        h = codes.to(tl.float32) * scale.to(tl.float32) + low.to(tl.float32)
    return h.to(dtype)


@triton.jit
def _latent_tile(L, S, row0, srow0, row, c0, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr,
                 NQ: tl.constexpr, WORDS: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr, row_ok,
                 dtype: tl.constexpr, PACKED: tl.constexpr = False):
    """Latents ``[BLOCK_N, C]`` of token rows ``row0 + row`` (channels ``c0 .. c0 + C``): loaded as they
    are, or (``BITS`` > 0) through :func:`_raw_tile` and :func:`_dequant`."""
    if BITS == 0:
        cols = c0 + tl.arange(0, C)
        h = tl.load(L + row0 * R + row[:, None] * R + cols[None, :], mask=row_ok[:, None] & (cols < R)[None, :],
                    other=0.0)
    else:
        words, scale, low = _raw_tile(L, S, row0, srow0, row, c0, R, C, BITS, QG, NQ, WORDS, FAST, row_ok)
        h = _dequant(words, scale, low, c0, C, BITS, QG, FAST, BLOCK_N, dtype, PACKED)
    return h.to(dtype)


@triton.jit
def _rope_rows(COS, SIN, pos, ok, d, HALF: tl.constexpr, BY_SLOT: tl.constexpr = False):
    """``cos``/``sin`` rows ``[BLOCK_N, HALF]`` of the half tables at positions ``pos`` (int32 rows:
    ``P * HALF < 2^31``; ``BY_SLOT``: rows per slot, ``pos`` the slots), as stored."""
    if not BY_SLOT:
        pos = tl.maximum(pos, 0)
    cos = tl.load(COS + pos[:, None] * HALF + d[None, :], mask=ok[:, None], other=0.0)
    sin = tl.load(SIN + pos[:, None] * HALF + d[None, :], mask=ok[:, None], other=0.0)
    return cos, sin


@triton.jit
def _block_start(n, stop, BLOCK_N: tl.constexpr, WHOLE: tl.constexpr):
    """The first slot the loads of the block of tokens ``n ..`` read: ``n``, or (``WHOLE``) the slot that
    makes it a whole block ending at ``stop`` at the latest and starting at 0 at the earliest."""
    if WHOLE:
        n = tl.maximum(tl.minimum(n, stop - BLOCK_N), 0)
    return n


@triton.jit
def _load_mask(slots, stop, BLOCK_N: tl.constexpr, WHOLE: tl.constexpr):
    """Which of the ``BLOCK_N`` ``slots`` a load reads: those before ``stop`` (``WHOLE``: all of them, a
    constant mask that the compiler drops)."""
    if WHOLE:
        ok = tl.full([BLOCK_N], 1, tl.int1)
    else:
        ok = slots < stop
    return ok


_STRIDES = ["kl_b", "kl_g", "ks_b", "ks_g", "vl_b", "vl_g", "vs_b", "vs_g", "pos_b", "kr_b", "rope_b"]


@triton.jit(do_not_specialize=["T", "split_len", "window"] + _STRIDES)
def _palu_decode_kernel(
    Q, KL, KS, VL, VS, KUP, KB, KNW, POS, KR, QR, COS, SIN, PO, PML, LEN,
    kl_b, kl_g, ks_b, ks_g, vl_b, vl_g, vs_b, vs_g, pos_b, kr_b, rope_b,
    T, split_len, window, qk_scale, eps,
    GS: tl.constexpr, QPK: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    RK: tl.constexpr, RC: tl.constexpr, K_BITS: tl.constexpr, K_QG: tl.constexpr, K_NQ: tl.constexpr,
    K_WORDS: tl.constexpr, K_FAST: tl.constexpr,
    RV: tl.constexpr, BLOCK_RV: tl.constexpr, V_BITS: tl.constexpr, V_QG: tl.constexpr, V_NQ: tl.constexpr,
    V_WORDS: tl.constexpr, V_FAST: tl.constexpr,
    HAS_KB: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEN: tl.constexpr,
    ROPE_IN_DTYPE: tl.constexpr = False, PREFETCH: tl.constexpr = True, PACKED: tl.constexpr = False,
    ROPE_BY_SLOT: tl.constexpr = False, FIXED_MAX: tl.constexpr = False, PDL: tl.constexpr = False,
    WHOLE_BLOCKS: tl.constexpr = False, HP: tl.constexpr = 1, PREFETCH_ROWS: tl.constexpr = True,
    FOLD_QUERY: tl.constexpr = False,
):
    """Program ``(KV heads i * HP .. i * HP + HP - 1, split s, row b)``: tokens ``[s * split_len, (s + 1) *
    split_len)`` of ``HP`` consecutive KV heads (each head ``j`` of its group ``g``), each for its ``QPK``
    query heads; writes each KV head's unnormalised partial value latent ``PO [B, Hkv, S, GP, BLOCK_RV]``
    and its ``(max, sum)`` in ``PML [B, Hkv, S, GP, 2]`` (log2 units). The ``HP`` heads share each block's
    rope rows, ranks and masks, loaded once (with one head per program the rows are half of what a
    program reads, each row read again by every head's program from L2: ``profile:l2``); each head keeps
    its own state (tuples over the heads).

    Layouts: ``Q [B, Hq, D]``; latents ``[B, G, T, R]`` (or ``[B, G, T, WORDS]`` int32 codes and
    ``[B, G, T, 2 * NQ]`` scales/minima) with contiguous token rows and batch / group strides
    ``*_b``/``*_g`` in rows (append buffers with room to grow); ``KUP [G, GS * D, RK]``;
    ``KB [Hkv * D]``; ``KNW [D]``; ``POS``/``KR [B, T]`` with row strides ``pos_b``/``kr_b``;
    ``QR [B]``; ``COS``/``SIN [P, HALF]`` (``ROPE_BY_SLOT``: ``[B, T, HALF]`` rows per slot, batch stride
    ``rope_b`` in rows, ``POS`` unread); ``LEN [1]`` (``HAS_LEN``: tokens in use, read on the
    device, of buffers of ``T`` slots: static decode steps); the rest contiguous.

    Rebuilt keys come out of ``tl.dot`` as ``[BLOCK_N, D]`` split into ``[BLOCK_N, HALF]`` halves (tokens x
    head dims; per half when the rank is chunked), and the scores are computed the same way round,
    ``[BLOCK_N, GP] = keys @ q.T`` (the rotated keys feed the
    next ``tl.dot`` from registers, the softmax runs down the tokens; on the H200 5-10% faster than
    ``q @ keys.T`` with the keys transposed through shared memory); the value side is
    ``acc.T [BLOCK_RV, GP] += h_v.T @ p``. When the key rank is one chunk (``RC == RK``) its ``up``
    rows are loaded once, before the token loop; otherwise the rank chunks are the innermost loop, so
    shared memory holds one chunk per stage.

    ``FOLD_QUERY`` (one query head per KV head, the rank one chunk, no ``k_norm``): the rotation
    ``r1 = k1 cos - k2 sin``, ``r2 = k2 cos + k1 sin`` and the score ``r1 . q1 + r2 . q2`` are
    ``sum(cos * a + sin * b)`` with ``a = q1 * k1 + q2 * k2`` and ``b = q2 * k1 - q1 * k2`` (per rotary pair),
    and ``a | b = h @ M`` for ``M = (up1 q1 + up2 q2 | up1 q2 - up2 q1)`` (times the score scale), built once per
    program: the block's MMA gives ``a`` and ``b`` (the keys are never formed), and one MMA against ones sums
    ``cos * a + sin * b`` (in the model's dtype with ``ROPE_IN_DTYPE``) into the score: half the rotation's
    instructions and no score MMA over the head dim. The key bias enters as its own share of ``a`` and ``b``.

    ``FIXED_MAX``: the softmax against one reference per program and query head (the first block's
    maximum; the split once more against its own maximum when that lies more than ``FIXED_MAX_RANGE``
    away for any of the program's query heads), so no block's maximum is reduced across warps;
    ``PML[..., 0]`` is then that reference. ``PDL``: the merge kernel is a programmatic dependent launch
    of this one.
"""
    if PDL:
        gdc_launch_dependents()  # the merge kernel may start now; it waits (gdc_wait) for this one's partials
    split = tl.program_id(1)
    b = tl.program_id(2)
    hkv = tl.num_programs(0) * HP
    n_splits = tl.num_programs(1)
    dtype = Q.dtype.element_ty

    FOLD: tl.constexpr = FOLD_QUERY and QPK == 1 and RC == RK and not HAS_NORM
    m_rows = tl.arange(0, GP)  # query heads of a KV head (padded to GP)
    q_ok = m_rows < QPK
    d = tl.arange(0, HALF)
    rc = tl.arange(0, RC)
    rv = tl.arange(0, BLOCK_RV)
    b64 = b.to(tl.int64)
    qr = tl.load(QR + b)
    lowest = tl.maximum(qr - window + 1, 0)  # the lowest key rank the query attends to
    start = split * split_len
    stop = tl.minimum(start + split_len, T)
    if HAS_LEN:
        stop = tl.minimum(stop, tl.load(LEN))
    stop = tl.where(qr >= lowest, stop, start)  # a query of no rank (padding), or no window, attends to no key
    if HAS_NORM:
        nw1 = tl.load(KNW + d).to(tl.float32)
        nw2 = tl.load(KNW + HALF + d).to(tl.float32)

    # per KV head of the program (tuples indexed by the head j): queries, latent rows, up rows, key bias
    heads = ()
    q1s = ()
    q2s = ()
    k_row0s = ()  # token row of (b, g, 0) in each latent tensor
    ks_row0s = ()
    v_row0s = ()
    vs_row0s = ()
    up_bases = ()  # the head's D rows of its group's up [GS * D, RK]
    u_alls = ()
    kb1s = ()
    kb2s = ()
    for j in tl.static_range(HP):
        kvh = tl.program_id(0) * HP + j
        g = kvh // GS
        heads = heads + (kvh,)
        q_base = Q + (b64 * hkv + kvh) * (QPK * D)
        if not FOLD:  # [HALF, GP] = q.T halves
            q1s = q1s + (tl.load(q_base + m_rows[None, :] * D + d[:, None], mask=q_ok[None, :], other=0.0),)
            q2s = q2s + (tl.load(q_base + m_rows[None, :] * D + HALF + d[:, None], mask=q_ok[None, :], other=0.0),)
        k_row0s = k_row0s + (b64 * kl_b + g * kl_g,)
        ks_row0s = ks_row0s + (b64 * ks_b + g * ks_g,)
        v_row0s = v_row0s + (b64 * vl_b + g * vl_g,)
        vs_row0s = vs_row0s + (b64 * vs_b + g * vs_g,)
        up_base = KUP + kvh.to(tl.int64) * (D * RK)
        up_bases = up_bases + (up_base,)
        if HAS_KB:
            kb1 = tl.load(KB + kvh * D + d).to(tl.float32)
            kb2 = tl.load(KB + kvh * D + HALF + d).to(tl.float32)
        if FOLD:  # [RK, D] = M = (up1 q1 + up2 q2 | up1 q2 - up2 q1) (up halves transposed), once for the whole loop
            qa = tl.load(q_base + d).to(tl.float32) * qk_scale  # the scores come out scaled
            qb = tl.load(q_base + HALF + d).to(tl.float32) * qk_scale
            u1 = tl.load(up_base + d[None, :] * RK + rc[:, None]).to(tl.float32)
            u2 = tl.load(up_base + (HALF + d)[None, :] * RK + rc[:, None]).to(tl.float32)
            m_ab = tl.join(u1 * qa[None, :] + u2 * qb[None, :], u1 * qb[None, :] - u2 * qa[None, :])
            u_alls = u_alls + (tl.reshape(tl.permute(m_ab, 0, 2, 1), [RK, D]).to(dtype),)
            if HAS_KB:  # the bias's share of a and b (added to the block's a and b like a key bias)
                kb1s = kb1s + (qa * kb1 + qb * kb2,)
                kb2s = kb2s + (qb * kb1 - qa * kb2,)
        else:
            if RC == RK:  # [RK, D] = up.T, loaded once for the whole loop
                u_alls = u_alls + (tl.load(up_base + tl.arange(0, D)[None, :] * RK + rc[:, None]),)
            if HAS_KB:
                kb1s = kb1s + (kb1,)
                kb2s = kb2s + (kb2,)

    local = tl.arange(0, BLOCK_N)  # int32 offsets in the block; scalar bases carry the int64 part
    kr_base = KR + b64 * kr_b
    pos_base = POS + b64 * pos_b
    if ROPE_BY_SLOT:  # cos/sin rows per slot: this row's [T, HALF], loaded like the latents (no gather by position)
        COS += b64 * rope_b * HALF
        SIN += b64 * rope_b * HALF
    # Loads that no tl.dot takes directly (Triton's pipeliner overlaps the dot operands) are issued a
    # block ahead by hand (PREFETCH): ranks, rope rows (gathered by position: positions two blocks
    # ahead; not with PREFETCH_ROWS=False) and quantised words/scales. Each loop step then uses what the
    # previous one loaded.
    PF_K: tl.constexpr = PREFETCH and K_BITS > 0 and RC == RK
    PF_V: tl.constexpr = PREFETCH and V_BITS > 0
    PF_ROWS: tl.constexpr = PREFETCH and PREFETCH_ROWS
    # softmax state per head: the value latents' accumulator (transposed), the sums kept elementwise (reduced
    # after the loop), the running maximum (or FIXED_MAX's reference and each thread's maximum)
    accs = ()
    l_accs = ()
    m_is = ()
    m_refs = ()
    s_tops = ()
    for j in tl.static_range(HP):
        accs = accs + (tl.zeros([BLOCK_RV, GP], dtype=tl.float32),)
        l_accs = l_accs + (tl.zeros([BLOCK_N, GP], dtype=tl.float32),)
        m_is = m_is + (tl.full([GP], float("-inf"), dtype=tl.float32),)
        m_refs = m_refs + (tl.full([GP], float("-inf"), dtype=tl.float32),)
        s_tops = s_tops + (tl.full([BLOCK_N, GP], float("-inf"), dtype=tl.float32),)
    # FIXED_MAX (one softmax state per program, bf16/fp16 p): no running maximum. The scores of a split are
    # exponentiated against one reference per query head, the maximum of its first block; the sums and the
    # value accumulator then need no rescale and no block reduces across warps. Each thread keeps the
    # maximum of its own scores, reduced once after the loop: when the split's maximum is more than
    # FIXED_MAX_RANGE (log2 units) away from the reference (a later score that could overflow the fp32
    # sums, or a first block far below the rest), the split runs a second time against its exact maximum.
    FIX: tl.constexpr = FIXED_MAX
    redo = False  # after the first pass: whether the split runs again
    for attempt in tl.static_range(2 if FIX else 1):
        if attempt > 0:  # the second pass: the split again when a reference was off, else no block at all
            stop = tl.where(redo, stop, start)
            cleared_accs = ()
            cleared_l_accs = ()
            for j in tl.static_range(HP):
                cleared_accs = cleared_accs + (tl.where(redo, 0.0, accs[j]),)
                cleared_l_accs = cleared_l_accs + (tl.where(redo, 0.0, l_accs[j]),)
            accs = cleared_accs
            l_accs = cleared_l_accs
        if PREFETCH:
            b0 = _block_start(start, stop, BLOCK_N, WHOLE_BLOCKS)
            ok0 = _load_mask(b0 + local, stop, BLOCK_N, WHOLE_BLOCKS)
            if PF_ROWS:
                kr_nx = tl.load(kr_base + b0 + local, mask=ok0, other=-1)
                if ROPE_BY_SLOT:
                    cos_nx, sin_nx = _rope_rows(COS, SIN, b0 + local, ok0, d, HALF, True)
                else:
                    pos0 = tl.load(pos_base + b0 + local, mask=ok0, other=0)
                    cos_nx, sin_nx = _rope_rows(COS, SIN, pos0, ok0, d, HALF)
                    b1 = _block_start(start + BLOCK_N, stop, BLOCK_N, WHOLE_BLOCKS)
                    pos_nx = tl.load(pos_base + b1 + local, mask=_load_mask(b1 + local, stop, BLOCK_N, WHOLE_BLOCKS),
                                     other=0)
            if PF_K:
                k_nx = ()
                for j in tl.static_range(HP):
                    k_nx = k_nx + (_raw_tile(KL, KS, k_row0s[j] + b0, ks_row0s[j] + b0, local, 0, RK, RC, K_BITS,
                                             K_QG, K_NQ, K_WORDS, K_FAST, ok0),)
            if PF_V:
                v_nx = ()
                for j in tl.static_range(HP):
                    v_nx = v_nx + (_raw_tile(VL, VS, v_row0s[j] + b0, vs_row0s[j] + b0, local, 0, RV, BLOCK_RV,
                                             V_BITS, V_QG, V_NQ, V_WORDS, V_FAST, ok0),)
        for start_n in tl.range(start, stop, BLOCK_N, num_stages=1 if attempt > 0 else None):
            # WHOLE_BLOCKS: a last block short of BLOCK_N tokens reads the whole block that ends at stop (its first
            # tokens were the previous block's, masked here), so no load needs a mask
            base_n = _block_start(start_n, stop, BLOCK_N, WHOLE_BLOCKS)
            offs_n = base_n + local
            if WHOLE_BLOCKS:  # this block's tokens: start_n <= offs_n < stop, as one unsigned comparison
                n_ok = (offs_n - start_n).to(tl.uint32, bitcast=True) < (stop - start_n).to(tl.uint32, bitcast=True)
            else:
                n_ok = offs_n < stop
            ld_ok = _load_mask(offs_n, stop, BLOCK_N, WHOLE_BLOCKS)
            if PREFETCH:
                nb = _block_start(start_n + BLOCK_N, stop, BLOCK_N, WHOLE_BLOCKS)
                nxt_ok = _load_mask(nb + local, stop, BLOCK_N, WHOLE_BLOCKS)
            if PF_ROWS:
                kr, cos, sin = kr_nx, cos_nx, sin_nx
                kr_nx = tl.load(kr_base + nb + local, mask=nxt_ok, other=-1)
                if ROPE_BY_SLOT:
                    cos_nx, sin_nx = _rope_rows(COS, SIN, nb + local, nxt_ok, d, HALF, True)
                else:
                    cos_nx, sin_nx = _rope_rows(COS, SIN, pos_nx, nxt_ok, d, HALF)
                    nb2 = _block_start(start_n + 2 * BLOCK_N, stop, BLOCK_N, WHOLE_BLOCKS)
                    pos_nx = tl.load(pos_base + nb2 + local, mask=_load_mask(nb2 + local, stop, BLOCK_N, WHOLE_BLOCKS),
                                     other=0)
            if PREFETCH:
                if PF_K:
                    k_now = k_nx
                    k_nx = ()
                    for j in tl.static_range(HP):
                        k_nx = k_nx + (_raw_tile(KL, KS, k_row0s[j] + nb, ks_row0s[j] + nb, local, 0, RK, RC, K_BITS,
                                                 K_QG, K_NQ, K_WORDS, K_FAST, nxt_ok),)
                if PF_V:
                    v_now = v_nx
                    v_nx = ()
                    for j in tl.static_range(HP):
                        v_nx = v_nx + (_raw_tile(VL, VS, v_row0s[j] + nb, vs_row0s[j] + nb, local, 0, RV, BLOCK_RV,
                                                 V_BITS, V_QG, V_NQ, V_WORDS, V_FAST, nxt_ok),)
            if not PF_ROWS:
                kr = tl.load(kr_base + offs_n, mask=ld_ok, other=-1)
                rows = offs_n if ROPE_BY_SLOT else tl.load(pos_base + offs_n, mask=ld_ok, other=0)
                cos, sin = _rope_rows(COS, SIN, rows, ld_ok, d, HALF, ROPE_BY_SLOT)
            # 0 <= kr <= qr and qr - kr < window, as one unsigned comparison against the lowest rank in the window
            ok = n_ok & ((kr - lowest).to(tl.uint32, bitcast=True) <= (qr - lowest).to(tl.uint32, bitcast=True))
            if ROPE_IN_DTYPE:  # the rotation in the model's dtype, rounded op by op as transformers does it
                c_ = cos.to(dtype)
                s_ = sin.to(dtype)
            else:
                c_ = cos.to(tl.float32)
                s_ = sin.to(tl.float32)

            new_accs = ()
            new_l_accs = ()
            new_m_is = ()
            new_m_refs = ()
            new_s_tops = ()
            for j in tl.static_range(HP):
                # rebuild this head's keys: [BLOCK_N, HALF] halves, fp32 accumulation
                if RC == RK:
                    if PF_K:
                        kw, ksc, klo = k_now[j]
                        h = _dequant(kw, ksc, klo, 0, RC, K_BITS, K_QG, K_FAST, BLOCK_N, dtype, PACKED)
                    else:
                        h = _latent_tile(KL, KS, k_row0s[j] + base_n, ks_row0s[j] + base_n, local, 0, RK, RC, K_BITS,
                                         K_QG, K_NQ, K_WORDS, K_FAST, BLOCK_N, ld_ok, dtype, PACKED)
                    # one MMA chain for the whole head, then its halves (split in registers): one wait for the
                    # tensor cores instead of two (H200 at 128K: 93.2 -> 89.5 us on the 8B shape, 336.5 -> 318.3 us MHA)
                    k = tl.dot(h, u_alls[j])
                    k1, k2 = tl.split(tl.permute(tl.reshape(k, [BLOCK_N, 2, HALF]), 0, 2, 1))
                else:
                    k1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
                    k2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
                    for c in range(0, RK, RC):
                        h = _latent_tile(KL, KS, k_row0s[j] + base_n, ks_row0s[j] + base_n, local, c, RK, RC, K_BITS,
                                         K_QG, K_NQ, K_WORDS, K_FAST, BLOCK_N, ld_ok, dtype, PACKED)
                        cols = c + rc
                        u1 = tl.load(up_bases[j] + d[None, :] * RK + cols[:, None])  # [RC, HALF] = up.T
                        u2 = tl.load(up_bases[j] + (HALF + d)[None, :] * RK + cols[:, None])
                        k1 = tl.dot(h, u1, k1)
                        k2 = tl.dot(h, u2, k2)
                if HAS_KB:
                    k1 += kb1s[j][None, :]
                    k2 += kb2s[j][None, :]
                if HAS_NORM:
                    inv = tl.rsqrt((tl.sum(k1 * k1, 1) + tl.sum(k2 * k2, 1)) / D + eps)
                    k1 = k1 * inv[:, None] * nw1[None, :]
                    k2 = k2 * inv[:, None] * nw2[None, :]
                if FOLD:  # k1, k2 are a and b: the score is the sum of cos * a + sin * b
                    if ROPE_IN_DTYPE:
                        w = _narrow(k1, dtype, PACKED) * c_ + _narrow(k2, dtype, PACKED) * s_
                    else:
                        w = _narrow(k1 * c_ + k2 * s_, dtype, PACKED)
                elif ROPE_IN_DTYPE:
                    k1 = _narrow(k1, dtype, PACKED)
                    k2 = _narrow(k2, dtype, PACKED)
                    r1 = k1 * c_ - k2 * s_
                    r2 = k2 * c_ + k1 * s_
                else:
                    r1 = _narrow(k1 * c_ - k2 * s_, dtype, PACKED)
                    r2 = _narrow(k2 * c_ + k1 * s_, dtype, PACKED)
                if PF_V:
                    vw, vsc, vlo = v_now[j]
                    hv = _dequant(vw, vsc, vlo, 0, BLOCK_RV, V_BITS, V_QG, V_FAST, BLOCK_N, dtype, PACKED)
                    hv_t = tl.trans(hv)
                elif V_BITS == 0:  # loaded transposed, so that the value dot takes the load as it is
                    hv_t = tl.load(VL + (v_row0s[j] + base_n) * RV + local[None, :] * RV + rv[:, None],
                                   mask=ld_ok[None, :] & (rv < RV)[:, None], other=0.0)
                else:
                    hv_t = tl.trans(_latent_tile(VL, VS, v_row0s[j] + base_n, vs_row0s[j] + base_n, local, 0, RV,
                                                 BLOCK_RV, V_BITS, V_QG, V_NQ, V_WORDS, V_FAST, BLOCK_N, ld_ok, dtype,
                                                 PACKED))
                # scores [BLOCK_N, GP], softmax down the tokens
                if FOLD:
                    s = tl.dot(w, tl.full([HALF, GP], 1.0, dtype))
                else:
                    s = tl.dot(r2, q2s[j], tl.dot(r1, q1s[j]))
                s = tl.where(ok[:, None], s if FOLD else s * qk_scale, float("-inf"))
                if FIX:
                    m_ref = m_refs[j]
                    if attempt == 0:
                        if start_n == start:  # the first block sets the reference
                            m_ref = tl.max(s, 0)
                            m_ref = tl.where(m_ref == float("-inf"), 0.0, m_ref)
                    p = tl.exp2(s - m_ref[None, :])
                    new_accs = new_accs + (accs[j] + tl.dot(hv_t, _narrow(p, dtype, PACKED)),)
                    new_l_accs = new_l_accs + (l_accs[j] + p,)
                    new_m_refs = new_m_refs + (m_ref,)
                    new_s_tops = new_s_tops + (tl.maximum(s_tops[j], s),)
                    new_m_is = new_m_is + (m_is[j],)
                else:
                    m_new = tl.maximum(m_is[j], tl.max(s, 0))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    p = tl.exp2(s - m_safe[None, :])
                    alpha = tl.exp2(m_is[j] - m_safe)
                    new_accs = new_accs + (accs[j] * alpha[None, :] + tl.dot(hv_t, _narrow(p, dtype, PACKED)),)
                    new_l_accs = new_l_accs + (l_accs[j] * alpha[None, :] + p,)
                    new_m_is = new_m_is + (m_new,)
                    new_m_refs = new_m_refs + (m_refs[j],)
                    new_s_tops = new_s_tops + (s_tops[j],)
            accs = new_accs
            l_accs = new_l_accs
            m_is = new_m_is
            m_refs = new_m_refs
            s_tops = new_s_tops
        if FIX:
            n_off = 0
            new_m_is = ()
            new_m_refs = ()
            for j in tl.static_range(HP):
                top = tl.max(s_tops[j], 0)
                off = (top > float("-inf")) & ((top > m_refs[j] + FIXED_MAX_RANGE) | (top < m_refs[j] - FIXED_MAX_RANGE))
                n_off += tl.sum(off.to(tl.int32), 0)
                m_ref = tl.where(off, top, m_refs[j])
                new_m_refs = new_m_refs + (m_ref,)
                new_m_is = new_m_is + (tl.where(top == float("-inf"), float("-inf"), m_ref),)  # the partials' reference
            redo = n_off > 0
            m_refs = new_m_refs
            m_is = new_m_is

    for j in tl.static_range(HP):
        part = ((b64 * hkv + heads[j]) * n_splits + split) * GP + m_rows
        tl.store(PO + part[None, :] * BLOCK_RV + rv[:, None], accs[j])
        tl.store(PML + part * 2, m_is[j])
        tl.store(PML + part * 2 + 1, tl.sum(l_accs[j], 0))


@triton.jit
def _palu_merge_kernel(PO, PML, VUP, VB, Out, n_splits,
                       QPK: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       RV: tl.constexpr, BLOCK_RV: tl.constexpr, HAS_VB: tl.constexpr, SB: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Program ``(query head h, row b)``: merges the head's partial value latents over the splits,
    normalises, up-projects with its KV head's ``up_v`` rows (+ value bias) and writes ``Out [B, Hq, D]``
    (zeros for a row with no key to attend). ``VUP [G, GS * D, RV]`` holds KV head ``kv``'s rows at
    ``kv * D`` of its flat ``[Hkv * D, RV]`` view."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    hq = tl.num_programs(0)
    kv = h // QPK
    m = h - kv * QPK  # row of this head in its KV head's partials
    rv = tl.arange(0, BLOCK_RV)
    sp = tl.arange(0, SB)
    acc = tl.zeros([BLOCK_RV], dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    top = tl.full([1], float("-inf"), dtype=tl.float32)
    base = (b.to(tl.int64) * (hq // QPK) + kv) * n_splits
    dd = tl.arange(0, D)
    up = tl.load(VUP + (kv.to(tl.int64) * D + dd)[:, None] * RV + rv[None, :],
                 mask=(rv < RV)[None, :], other=0.0).to(tl.float32)
    if HAS_VB:
        v_bias = tl.load(VB + kv * D + dd).to(tl.float32)
    if PDL:
        gdc_wait()  # the decode kernel's partials are written
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
    out = tl.sum(up * o_lat[None, :], 1)
    if HAS_VB:
        out += v_bias
    out = tl.where(total > 0, out, 0.0)
    tl.store(Out + (b.to(tl.int64) * hq + h) * D + dd, out.to(Out.dtype.element_ty))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` to ``dtype``, to nearest even; bf16 rounded in the integer bits first (Triton's
    interpreter truncates fp32 -> bf16 where the GPU rounds), so the result is the same on both."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _pack_plane(H, sm, W, row, R: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, LEVELS: tl.constexpr,
                LOW: tl.constexpr, BITS: tl.constexpr, WORD0: tl.constexpr, N_WORDS: tl.constexpr,
                BLOCK_W: tl.constexpr):
    """One plane of the token's codes (bits ``LOW .. LOW + BITS`` of each, ``32 // BITS`` per word at
    ``_shift``) to its words ``W[row, WORD0 .. WORD0 + N_WORDS]``, the codes made from the stored scales ``sm``."""
    PER_WORD: tl.constexpr = 32 // BITS
    w = tl.arange(0, BLOCK_W)
    k = tl.arange(0, PER_WORD)
    c = w[:, None] * PER_WORD + k[None, :]  # [words, codes per word]: channel of each code
    ok = c < R
    xc = tl.load(H + row * R + c, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(sm + c // GROUP, mask=ok, other=1.0).to(tl.float32)
    low = tl.load(sm + NG + c // GROUP, mask=ok, other=0.0).to(tl.float32)
    v = tl.math.div_rn(xc - low, tl.where(scale > 0, scale, 1.0))
    v = (v + 12582912.0) - 12582912.0  # to the nearest integer, ties to even (1.5 * 2^23: exact below 2^22)
    code = tl.where(ok, tl.minimum(tl.maximum(v, 0.0), LEVELS).to(tl.int32), 0)
    part = (code >> LOW) & ((1 << BITS) - 1)
    tl.store(W + WORD0 + w, tl.sum(part << _shift(k, BITS)[None, :], 1), mask=w < N_WORDS)


@triton.jit
def _quantize_kernel(H, W, SM, SLOT, w_row, sm_row, R: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr,
                     BITS: tl.constexpr, WORDS: tl.constexpr, WORDS0: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_J: tl.constexpr, BLOCK_W0: tl.constexpr, BLOCK_W1: tl.constexpr, HAS_SLOT: tl.constexpr):
    """Program ``row``: the latents ``H [rows, R]`` of one token quantised as
    :func:`kvpress.kernels.palu_reference.quantize` does it, bit for bit: scales then minima per group of
    ``GROUP`` channels to ``SM [rows, 2 * NG]`` (in ``H``'s dtype), codes packed plane by plane
    (``QuantSpec.planes``: ``WORDS0`` words of the first plane, 3 bits: then the high bits') to
    ``W [rows, WORDS]``. The codes are made in the words' layout, from the scales and minima this program has
    just stored (read back after a barrier). ``HAS_SLOT``: row ``row`` of ``W``/``SM`` starts ``w_row``/``sm_row``
    elements apart and the token goes to slot ``SLOT[0]`` of it (a static decode step's storages)."""
    row = tl.program_id(0).to(tl.int64)
    dtype = H.dtype.element_ty
    LEVELS: tl.constexpr = (1 << BITS) - 1
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    in_group = (g < NG)[:, None] & (j < GROUP)[None, :]
    x = tl.load(H + row * R + g[:, None] * GROUP + j[None, :], mask=in_group, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(in_group, x, float("inf")), 1)
    hi = tl.max(tl.where(in_group, x, float("-inf")), 1)
    slot = tl.load(SLOT) if HAS_SLOT else 0
    sm = SM + row * sm_row + slot * (2 * NG)
    tl.store(sm + g, _round_to(tl.math.div_rn(hi - lo, tl.full([BLOCK_G], LEVELS, tl.float32)), dtype), mask=g < NG)
    tl.store(sm + NG + g, _round_to(lo, dtype), mask=g < NG)
    tl.debug_barrier()
    PLANE: tl.constexpr = 2 if BITS == 3 else BITS
    out = W + row * w_row + slot * WORDS
    _pack_plane(H, sm, out, row, R, GROUP, NG, LEVELS, 0, PLANE, 0, WORDS0, BLOCK_W0)
    if BITS == 3:
        _pack_plane(H, sm, out, row, R, GROUP, NG, LEVELS, 2, 1, WORDS0, WORDS - WORDS0, BLOCK_W1)


def quantize(h: torch.Tensor, spec: ref.QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvpress.kernels.palu_reference.quantize` (the same bits) in one launch: packed codes
    ``[..., words]`` int32 and scales then minima ``[..., 2 * r // group]`` of latents ``h [..., r]``."""
    r = h.shape[-1]
    x = h.reshape(-1, r).contiguous()
    words = torch.empty(x.shape[0], spec.words(r), device=h.device, dtype=torch.int32)
    scale_min = torch.empty(x.shape[0], 2 * spec.groups(r), device=h.device, dtype=h.dtype)
    _launch_quantize(x, spec, words, scale_min)
    return words.reshape(*h.shape[:-1], -1), scale_min.reshape(*h.shape[:-1], -1)


def quantize_at(h: torch.Tensor, spec: ref.QuantSpec, words: torch.Tensor, scale_min: torch.Tensor,
                slot: torch.Tensor) -> None:
    """:func:`quantize` of one new token's latents ``h [B, G, 1, r]``, written into the storages ``words
    [B, G, T, words]`` and ``scale_min [B, G, T, 2 * groups]`` (contiguous) at slot ``slot`` (``[1]`` int64 on
    the device) by the same launch: a static decode step's write, with no copy after it."""
    B, G, n, r = h.shape
    if n != 1:
        raise ValueError(f"quantize_at writes one new token per row and group, got {n}; use quantize for more")
    if not (words.is_contiguous() and scale_min.is_contiguous()):
        raise ValueError("quantize_at writes into contiguous [B, G, T, ...] storages; pass the buffers' storages, "
                         "or quantize and index_copy_ into a strided view")
    _launch_quantize(h.reshape(B * G, r).contiguous(), spec, words, scale_min, slot)


def _launch_quantize(x: torch.Tensor, spec: ref.QuantSpec, words: torch.Tensor, scale_min: torch.Tensor,
                     slot: torch.Tensor | None = None) -> None:
    """One program per row of ``x [rows, r]``; rows of ``words``/``scale_min`` as :func:`quantize` or
    :func:`quantize_at` lay them out."""
    r = x.shape[-1]
    n_groups, plane_words = spec.groups(r), spec.plane_words(r)
    if x.shape[0]:
        _quantize_kernel[(x.shape[0],)](
            x, words, scale_min, slot if slot is not None else words, words.numel() // x.shape[0],
            scale_min.numel() // x.shape[0], R=r, GROUP=spec.group, NG=n_groups, BITS=spec.bits,
            WORDS=sum(plane_words), WORDS0=plane_words[0], BLOCK_G=triton.next_power_of_2(n_groups),
            BLOCK_J=triton.next_power_of_2(spec.group), BLOCK_W0=triton.next_power_of_2(plane_words[0]),
            BLOCK_W1=triton.next_power_of_2(plane_words[-1]), HAS_SLOT=slot is not None, num_warps=1, **OPTIONS)


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


def _fast_dequant(x: ref.Latents, chunk: int) -> bool:
    """Whether the kernel dequantises ``x``'s tiles of ``chunk`` channels word by word (each tile whole words
    of the first plane and whole quantisation groups of a power-of-two size, no padded channel)."""
    spec = x.quant
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return (chunk % (32 // spec.planes[0]) == 0 and chunk % spec.group == 0 and pow2(spec.group)
            and x.rank % chunk == 0)


def _tile_bytes(channels: int, bits: int, elt: int) -> int:
    """Bytes per token of a latent tile of ``channels`` columns as the kernel loads it: values, or whole
    words (3 bits: each 16 channels' low word and its high word, 4 bits per channel as loaded) and a scale
    and a minimum per quantisation group (at least 8 channels; the word-by-word path). (The first H200 run
    charged 4-bit tiles a gathered word per channel and so never tried more than 32 tokens.)"""
    if bits == 0:
        return channels * elt
    return -(-channels * (4 if bits == 3 else bits) // 32) * 4 + 2 * -(-channels // 8) * elt


def smem_estimate(block_n: int, stages: int, d: int, rk: int, rv: int, k_bits: int, v_bits: int, elt: int, gp: int = 16,
                  hp: int = 1) -> int:
    """Shared memory (bytes) of one decode program of ``hp`` KV heads, by estimate (Triton on Hopper):
    ``stages - 1`` copies of every tile the innermost loop loads (what Triton's pipeliner keeps in flight;
    the rope rows and ranks shared by the heads), the ``up`` rows staged once, and the ``tl.dot`` operands
    staged per block. Within 10% above what Triton 3.6 allocates for sm_90a at half rank (offline: 93.7 /
    60.7 KB at 3 / 2 stages, two heads 153.1 / 103.7 KB); far above it for quantised latents, whose words go
    through registers (26.6 KB at 4 bits)."""
    half, rc, block_rv = d // 2, _chunk(rk), max(16, triton.next_power_of_2(rv))
    buffers = max(1, stages - 1)
    dots = hp * block_n * (gp + 2 * block_rv) * elt  # p and the value latents (transposed), per head
    rows = block_n * (2 * half * elt + 8)  # cos/sin, ranks: shared by the heads
    values = hp * block_n * _tile_bytes(block_rv, v_bits, elt)
    if rc == rk:  # the token loop is innermost; up is loaded once
        return buffers * (rows + values + hp * block_n * _tile_bytes(rk, k_bits, elt)) + hp * rk * d * elt + dots
    return buffers * hp * (block_n * _tile_bytes(rc, k_bits, elt) + rc * d * elt) + rows + values + dots


def settings(bits: int, queries_per_kv: int | None = None) -> dict:
    """The kernel settings (``TUNABLE`` names) for key latents of ``bits`` bits (0: unquantised) and
    ``queries_per_kv`` query heads per KV head: ``TUNED[bits, queries_per_kv]`` over ``TUNED[bits, None]``
    over the module defaults."""
    chosen = {**TUNED.get((bits, None), {}), **TUNED.get((bits, queries_per_kv), {})}
    return {name: chosen.get(name, globals()[name]) for name in TUNABLE}


def query_tile(queries_per_kv: int, tuned: dict) -> int:
    """Query heads per KV head as the kernels pad them (``GP``)."""
    return max(tuned["QUERY_TILE"], triton.next_power_of_2(queries_per_kv))


def plans(d: int, rk: int, rv: int, k_bits: int, v_bits: int, elt: int, gp: int = 16, max_block: int | None = None,
          max_stages: int | None = None, hp: int = 1) -> list[tuple[int, int]]:
    """``(block_n, num_stages)`` settings of the decode kernel for these shapes (``hp`` KV heads per
    program), best first: token tiles and pipelining depths (at most ``max_block`` and ``max_stages``,
    default :func:`settings`) whose :func:`smem_estimate` fits ``SMEM_BUDGET``, larger tiles and deeper
    pipelines first; empty when nothing fits."""
    tuned = settings(k_bits)
    max_block = max_block or tuned["BLOCK_N"]
    max_stages = max_stages or tuned["NUM_STAGES"]
    tiles = [n for n in (128, 64, 32, 16) if n <= max_block] or [16]
    stages = [s for s in (3, 2) if s <= max_stages]
    order = [(n, s) for n in tiles for s in stages] + [(n, 1) for n in tiles]
    return [(n, s) for n, s in order if smem_estimate(n, s, d, rk, rv, k_bits, v_bits, elt, gp, hp) <= SMEM_BUDGET]


def heads_per_program(kv_heads: int, tuned: dict) -> int:
    """KV heads per decode program: ``HEADS_PER_PROGRAM`` when it divides ``kv_heads``, else 1."""
    hp = tuned["HEADS_PER_PROGRAM"]
    return hp if kv_heads % hp == 0 else 1


_CHOSEN: dict[tuple, tuple[int, int, int]] = {}  # shapes -> the first plan (tile, stages, heads per program) that launched


def supported(q: torch.Tensor, k: ref.Latents, v: ref.Latents, group_size: int) -> bool:
    """Whether the kernel serves these shapes (power-of-two head dim and group size, key rank with a
    power-of-two factor of at least 16 on the GPU, the interpreter accepts smaller tiles; ranks whose
    tiles fit in shared memory)."""
    d = q.shape[-1]
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    min_tile = 16 if q.is_cuda else 1
    if not (q.shape[2] == 1 and pow2(d) and d >= 2 * min_tile and pow2(group_size)
            and _chunk(k.rank) >= min_tile and q.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    return bool(plans(d, k.rank, v.rank, _bits(k), _bits(v), q.element_size()))


def _bits(x: ref.Latents) -> int:
    """Bits per latent code (0: unquantised)."""
    return x.quant.bits if x.quant is not None else 0


def plan_key(q: torch.Tensor, k: ref.Latents, v: ref.Latents, k_up: torch.Tensor) -> tuple:
    """The key of the decode's chosen plan (``_CHOSEN``) for these inputs: head dim, ranks, bits, element size,
    query tile (``GP``, at index 6), the settings (:func:`settings`), KV heads."""
    D, hq = q.shape[-1], q.shape[1]
    G, rows, rk = k_up.shape
    hkv = G * rows // D
    tuned = settings(_bits(k), hq // hkv)
    return (D, rk, v.rank, _bits(k), _bits(v), q.element_size(), query_tile(hq // hkv, tuned), *tuned.values(), hkv)


def palu_decode(
    q: torch.Tensor,
    k: ref.Latents,
    v: ref.Latents,
    k_up: torch.Tensor,
    v_up: torch.Tensor,
    positions: torch.Tensor | None,
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
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention ``[B, Hq, 1, D]`` over a latent cache; the same function as
    :func:`kvpress.kernels.palu_reference.latent_attention` for one query token per row.

    ``q [B, Hq, 1, D]`` post-RoPE; latents ``[B, G, T, .]`` (``Latents``); ``k_up``/``v_up
    [G, gs * D, r]`` in ``q.dtype``; ``positions``/``k_rank [B, T]``; ``q_rank [B, 1]``; ``cos``/``sin
    [P, D / 2]`` covering every position, or their rows per slot ``[B, T, D / 2]``
    (``palu_reference.rope_rows``; ``positions`` may then be None): loaded as the latents are, a block
    ahead, instead of gathered at positions loaded in the same step (the faster form on the H200).
    ``splits``: programs per (row, KV head) along the tokens (default: enough to fill the GPU).
    ``length``: ``[1]`` int32 on the device, the tokens in use of buffers of ``T`` slots (a static
    decode step, CUDA-graph capturable: nothing here reads a device value on the host). With at least one
    tile of slots the kernel reads whole tiles (no load masks): the slots past ``length`` that it reads then
    must hold finite values, as the runtime's static steps leave them (zeros)."""
    B, hq, _, D = q.shape
    G, rows, rk = k_up.shape
    gs = rows // D
    hkv = G * gs
    qpk = hq // hkv
    block_rv = max(16, triton.next_power_of_2(v.rank))
    tuned = settings(_bits(k), qpk)
    key = plan_key(q, k, v, k_up)
    gp = key[6]
    if key in _CHOSEN:
        *plan, hp = _CHOSEN[key]
        candidates = [plan]
    else:
        hp = heads_per_program(hkv, tuned)
        candidates = plans(*key[:7], tuned["BLOCK_N"], tuned["NUM_STAGES"], hp)
        if not candidates and hp > 1:  # the heads' tiles together do not fit: one head per program
            hp = 1
            candidates = plans(*key[:7], tuned["BLOCK_N"], tuned["NUM_STAGES"])
    if not candidates:
        raise ValueError(f"Palu decode: head dim {D}, key rank {rk}, value rank {v.rank} need more shared memory "
                         f"than {SMEM_BUDGET} bytes even with 16-token tiles; use a smaller rank per group (smaller "
                         "groups), or the reference (kvpress.kernels.palu_reference.latent_attention)")
    for i, (block_n, stages) in enumerate(candidates):
        try:
            po, pml, splits_used = _launch_decode(q, k, v, k_up, positions, cos, sin, q_rank, k_rank, scale, k_bias,
                                                  k_norm, window, splits, block_n, stages, gp, block_rv, length, tuned,
                                                  hp)
        except triton.runtime.OutOfResources:  # the estimate was short: the next, smaller plan
            if i == len(candidates) - 1:
                raise
            continue
        _CHOSEN[key] = (block_n, stages, hp)
        break
    out = torch.empty(B, hq, 1, D, device=q.device, dtype=q.dtype)
    dummy = q.new_empty(1)
    pdl = USE_PDL and has_pdl(q.device)
    _palu_merge_kernel[(hq, B)](
        po, pml, v_up.contiguous(), v_bias if v_bias is not None else dummy, out, splits_used,
        QPK=qpk, GP=gp, D=D, RV=v.rank, BLOCK_RV=block_rv, HAS_VB=v_bias is not None,
        SB=MERGE_SPLITS, PDL=pdl, num_warps=4, launch_pdl=pdl, **OPTIONS,
    )
    return out


_launch_palu_decode = Launcher(_palu_decode_kernel)  # no per-call argument binding (kernels/launch.py)


def _launch_decode(q, k, v, k_up, positions, cos, sin, q_rank, k_rank, scale, k_bias, k_norm, window, splits,
                   block_n, stages, gp, block_rv, length=None, tuned=None, hp=None):
    """Launches the split-K decode kernel with one plan (``hp`` KV heads per program, default
    :func:`heads_per_program`); returns the partials and the split count. Triton raises ``OutOfResources``
    at launch, before anything runs, when the plan does not fit."""
    B, hq, _, D = q.shape
    G, rows, rk = k_up.shape
    gs = rows // D
    hkv = G * gs
    qpk = hq // hkv
    T = k.data.shape[2]
    tuned = tuned or settings(_bits(k), qpk)
    hp = hp or heads_per_program(hkv, tuned)
    splits, split_len = _splits(splits, tuned["PROGRAMS_PER_SM"], q, B * hkv // hp, T, block_n)
    po = torch.empty(B, hkv, splits, gp, block_rv, device=q.device, dtype=torch.float32)
    pml = torch.empty(B, hkv, splits, gp, 2, device=q.device, dtype=torch.float32)
    dummy = q.new_empty(1)

    def quant(x: ref.Latents, chunk: int):
        data = _rows(x.data)
        if x.quant is None:
            return (data, dummy, *_row_strides(data), 0, 0, 0, 1, 1, 1, False)
        sm = _rows(x.scale_min)
        return (data, sm, *_row_strides(data), *_row_strides(sm), x.quant.bits, x.quant.group,
                x.rank // x.quant.group, x.data.shape[-1], _fast_dequant(x, chunk))

    kl, ks, kl_b, kl_g, ks_b, ks_g, kbits, kqg, knq, kwords, kfast = quant(k, _chunk(rk))
    vl, vs, vl_b, vl_g, vs_b, vs_g, vbits, vqg, vnq, vwords, vfast = quant(v, block_rv)
    k_rank = _tokens(k_rank.int() if k_rank.dtype != torch.int32 else k_rank)
    by_slot = cos.dim() == 3  # rows per slot [B, T, HALF] (contiguous rows, any batch stride), not tables
    if by_slot and (cos.shape[0] != B or cos.shape[1] < T or sin.shape != cos.shape):
        raise ValueError(f"Palu decode: rope rows per slot must be cos/sin [B={B}, T>={T}, {D // 2}], got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    if not by_slot and positions is None:
        raise ValueError("Palu decode: half tables cos/sin [P, D / 2] need the positions [B, T]; pass them, or "
                         "the rope rows per slot [B, T, D / 2] (palu_reference.rope_rows)")
    positions = k_rank if by_slot and positions is None else _tokens(positions)  # (unread with rows per slot)
    rows_ok = cos.stride()[1:] == (D // 2, 1) and cos.stride(0) % (D // 2) == 0 and sin.stride() == cos.stride()
    if not (by_slot and rows_ok):
        cos, sin = cos.contiguous(), sin.contiguous()
    args = (q.contiguous(), kl, ks, vl, vs, k_up.contiguous(),
            k_bias if k_bias is not None else dummy, k_norm[0] if k_norm is not None else dummy,
            positions, k_rank, q_rank.reshape(B).int().contiguous(),
            cos, sin, po, pml, length if length is not None else dummy,
            kl_b, kl_g, ks_b, ks_g, vl_b, vl_g, vs_b, vs_g, positions.stride(0), k_rank.stride(0),
            cos.stride(0) // (D // 2) if by_slot else 0,
            T, split_len, window if window is not None else NO_LIMIT, scale * 1.4426950408889634,
            float(k_norm[1]) if k_norm is not None else 0.0)
    constexprs = dict(  # in the kernel's order
        GS=gs, QPK=qpk, GP=gp, D=D, HALF=D // 2,
        RK=rk, RC=_chunk(rk), K_BITS=kbits, K_QG=kqg, K_NQ=knq, K_WORDS=kwords, K_FAST=kfast,
        RV=v.rank, BLOCK_RV=block_rv, V_BITS=vbits, V_QG=vqg, V_NQ=vnq, V_WORDS=vwords, V_FAST=vfast,
        HAS_KB=k_bias is not None, HAS_NORM=k_norm is not None, BLOCK_N=block_n, HAS_LEN=length is not None,
        ROPE_IN_DTYPE=tuned["ROPE_IN_DTYPE"], PREFETCH=tuned["PREFETCH"],
        PACKED=q.dtype != torch.float32 and has_packed_cvt(q.device), ROPE_BY_SLOT=by_slot,
        FIXED_MAX=tuned["FIXED_MAX"], PDL=USE_PDL and has_pdl(q.device), WHOLE_BLOCKS=T >= block_n, HP=hp,
        PREFETCH_ROWS=tuned["PREFETCH_ROWS"], FOLD_QUERY=tuned["FOLD_QUERY"])
    options = dict(num_warps=tuned["NUM_WARPS"], num_stages=stages,
                   **({"maxnreg": tuned["MAX_REGISTERS"]} if tuned["MAX_REGISTERS"] else {}))
    # what Triton specializes on besides the constexprs: each tensor's dtype and 16-byte alignment
    key = (tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args if isinstance(a, torch.Tensor)),
           tuple(options.items()), *constexprs.values())
    _launch_palu_decode(key, (hkv // hp, splits, B), args, constexprs, **options)
    return po, pml, splits


def _splits(splits: int | None, per_sm: int, q: torch.Tensor, heads: int, T: int, block_n: int) -> tuple[int, int]:
    """``(splits, split_len)``: programs per (row, KV heads of a program) along the ``T`` tokens and tokens
    per program (a multiple of ``block_n``). Default: at most ``per_sm`` programs per SM over the ``heads``
    (row, KV heads of a program) pairs; the kernel is latency-bound (the H200 sweep), so a partial second wave (e.g. 32 KV
    heads x 9 splits = 288 programs for 264 slots) would double the time."""
    if splits is None:
        target = per_sm * (_sm_count(q.device.index or 0) if q.is_cuda else 1)
        splits = max(1, min(target // heads, -(-T // block_n), MAX_SPLITS))
    split_len = -(-max(T, 1) // splits)
    split_len = -(-split_len // block_n) * block_n
    return max(1, -(-T // split_len)), split_len
