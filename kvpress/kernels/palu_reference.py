"""Plain-torch reference of Palu's latent KV cache (arXiv 2407.21118): the CPU path and the oracle of
the Triton kernels in ``kvpress.kernels.palu``.

Layout
------
A layer's key (and value) projection is factored per *head group* of ``gs`` KV heads (G-LRD): group
``g`` keeps the latent ``h = x @ down[g].T`` (``r`` values per token) and rebuilds its ``gs * D``
outputs as ``h @ up[g].T``. Per layer:

* ``up``: ``[G, gs * D, r]`` (rows in the order of the projection's outputs: head ``g * gs + j``
  owns rows ``j * D .. (j + 1) * D``), ``down``: ``[G * r, hidden]``.
* latents in the cache: ``[B, G, T, r]`` in the model's dtype, or, quantised
  (:class:`QuantSpec`), ``bits``-bit codes packed along ``r`` into int32 words (8 per word at 4 bits,
  16 at 2 bits; 3-bit codes as two planes, their low 2 bits 16 per word then their high bit 32 per word:
  :attr:`QuantSpec.planes`; even channels in the low 16 bits, odd ones in the high 16 bits,
  :func:`QuantSpec.shifts`) ``[B, G, T, words]`` plus per-token
  asymmetric scale and minimum per ``group`` latent channels, ``[B, G, T, 2 * r // group]``
  (scales first, then minima) in the model's dtype.

Keys are cached *before* RoPE: they are rebuilt, biased (Qwen2), normalised per head (Qwen3
``k_norm``) and rotated at each cached token's own position, exactly in the order the model does it.
The rotation uses a half table ``cos``/``sin`` ``[P, D / 2]`` (position ``p`` -> row ``p``), made from
the model's own rotary module (rope scaling and attention scaling included; transformers' tables
repeat the first half in the second), or its rows at each token's position, ``[B, T, D / 2]``
(:func:`rope_rows`: what the Palu cache keeps). Values need no RoPE: attention runs on the value
latents and the result is up-projected once per query head (``out_h = up_h @ sum_t p_t h_t + bias_h``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference import rank_attention


# -- latent quantisation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """Per-token asymmetric round-to-nearest quantisation of latents.

    bits: 2, 3 or 4 bits per latent value. group: latent channels sharing one scale and minimum
    (must divide the rank).
    """

    bits: int
    group: int

    def __post_init__(self):
        if self.bits not in (2, 3, 4):
            raise ValueError(f"latent quantisation supports 2, 3 or 4 bits, got {self.bits}")
        if self.group < 1:
            raise ValueError(f"quantisation group must be >= 1 latent channels, got {self.group}")

    @property
    def planes(self) -> tuple[int, ...]:
        """Bit widths of the planes a code is stored in, low bits first, each plane packed on its own (words of
        the first plane, then of the next): one plane at 2 and 4 bits; at 3 bits the low 2 bits (16 codes per
        word) and the high bit (32 per word), so that every plane packs a power-of-two number of codes per word
        (whole words per tile in the decode kernel) and a code takes exactly 3 bits."""
        return (2, 1) if self.bits == 3 else (self.bits,)

    @staticmethod
    def shifts(bits: int) -> list[int]:
        """Bit offset of each of a ``bits``-bit plane's ``32 // bits`` codes in its word, in channel order: code
        ``2m`` at bit ``m * bits``, code ``2m + 1`` at bit ``16 + m * bits`` (each 16-bit half holds every other
        channel), so that one shift and one mask put a pair of neighbouring channels in the two halves of a
        register, as the decode kernel makes its bf16/fp16 pairs."""
        return [(k // 2) * bits + 16 * (k % 2) for k in range(32 // bits)]

    def plane_words(self, rank: int) -> list[int]:
        """Words per token of each plane of a latent of ``rank`` channels."""
        return [-(-rank // (32 // bits)) for bits in self.planes]

    def words(self, rank: int) -> int:
        return sum(self.plane_words(rank))

    def groups(self, rank: int) -> int:
        """Quantisation groups of a latent of ``rank`` channels (the group must divide it)."""
        if rank % self.group:
            raise ValueError(f"quantisation group {self.group} does not divide the latent rank {rank}")
        return rank // self.group


def quantize(h: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise latents ``h [..., r]``: returns packed codes ``[..., words]`` int32 and
    ``[..., 2 * r // group]`` scales then minima (in ``h.dtype``)."""
    x = h.float().unflatten(-1, (spec.groups(h.shape[-1]), spec.group))
    lo = x.amin(-1)
    hi = x.amax(-1)
    levels = (1 << spec.bits) - 1
    scale = (hi - lo).div(torch.full_like(hi, levels)).to(h.dtype)  # a tensor divisor: IEEE division on any device
    # (CUDA multiplies by the reciprocal of a scalar divisor: 1-ulp differences from the CPU)
    lo = lo.to(h.dtype)
    safe = torch.where(scale.float() > 0, scale.float(), 1.0)
    codes = ((x - lo.float()[..., None]) / safe[..., None]).round().clamp(0, levels).to(torch.int32).flatten(-2)
    return pack(codes, spec), torch.cat([scale, lo], dim=-1)


def pack(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Pack codes ``[..., r]`` (ints in [0, 2^bits)) into int32 words ``[..., words]``, plane by plane
    (:attr:`QuantSpec.planes`): in a plane of ``b`` bits, channel ``c``'s bits go to the plane's word
    ``c // (32 // b)`` at bit ``QuantSpec.shifts(b)[c % (32 // b)]``."""
    r = codes.shape[-1]
    planes, low = [], 0
    for bits, n_words in zip(spec.planes, spec.plane_words(r)):
        per_word = 32 // bits
        padded = torch.zeros(*codes.shape[:-1], n_words * per_word, dtype=torch.int64, device=codes.device)
        padded[..., :r] = (codes.long() >> low) & ((1 << bits) - 1)
        shifts = torch.tensor(QuantSpec.shifts(bits), device=codes.device)
        planes.append((padded.unflatten(-1, (-1, per_word)) << shifts).sum(-1))
        low += bits
    words = torch.cat(planes, -1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, spec: QuantSpec, rank: int) -> torch.Tensor:
    """Inverse of :func:`pack`: codes ``[..., rank]`` int32."""
    codes, low = 0, 0
    for bits, plane in zip(spec.planes, words.split(spec.plane_words(rank), -1)):
        shifts = torch.tensor(QuantSpec.shifts(bits), device=words.device, dtype=torch.int32)
        codes = codes + ((((plane[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :rank]) << low)
        low += bits
    return codes


def dequantize(words: torch.Tensor, scale_min: torch.Tensor, spec: QuantSpec, rank: int) -> torch.Tensor:
    """Latents ``[..., rank]`` in ``scale_min.dtype`` from packed codes and scales/minima."""
    n = rank // spec.group
    scale, lo = scale_min[..., :n].float(), scale_min[..., n:].float()
    codes = unpack(words, spec, rank).float().unflatten(-1, (n, spec.group))
    return (codes * scale[..., None] + lo[..., None]).flatten(-2).to(scale_min.dtype)


def hadamard(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal rotation ``[n, n]`` that spreads outliers over the latent channels (Palu section
    3.4): block-diagonal Sylvester-Hadamard blocks of the largest power of two dividing ``n``."""
    block = n & -n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(block)
    return torch.block_diag(*[h] * (n // block)).to(device=device, dtype=dtype)


# -- latents and their cache ------------------------------------------------------------------------


@dataclass
class Latents:
    """One side (keys or values) of a layer's latent cache, as the kernels read it.

    ``data``: ``[B, G, T, r]`` latents, or ``[B, G, T, words]`` int32 packed codes when ``quant`` is
    set, with ``scale_min [B, G, T, 2 * r // quant.group]``.
    """

    data: torch.Tensor
    rank: int
    quant: QuantSpec | None = None
    scale_min: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        """``[B, G, T, r]`` latents (dequantised when quantised)."""
        if self.quant is None:
            return self.data
        return dequantize(self.data, self.scale_min, self.quant, self.rank)


def project(x: torch.Tensor, down: torch.Tensor, groups: int, ranks: list[int]) -> tuple[torch.Tensor, ...]:
    """Latents ``[B, G, n, r]`` of hidden states ``x [B, n, hidden]``, one per rank of ``ranks``, from one GEMM over
    their down projections stacked (``down [G * sum(ranks), hidden]``: each side's ``[G * r, hidden]`` in turn)."""
    return latent_parts(torch.nn.functional.linear(x, down), groups, ranks)


def latent_parts(h: torch.Tensor, groups: int, ranks: list[int]) -> tuple[torch.Tensor, ...]:
    """:func:`project`'s latents ``[B, G, n, r]`` from its GEMM's output ``h [B, n, G * sum(ranks)]`` (views)."""
    return tuple(part.unflatten(-1, (groups, -1)).transpose(1, 2) for part in h.split([groups * r for r in ranks], -1))


def rope_half_tables(rotary_emb, length: int, head_dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[length, D / 2]`` for positions ``0 .. length - 1`` from a model's rotary
    module (``rotary_emb(x, position_ids) -> cos, sin [1, length, D]``), in ``dtype``."""
    probe = torch.empty(1, dtype=dtype, device=device)
    positions = torch.arange(length, device=device)[None]
    cos, sin = rotary_emb(probe, positions)
    if cos.shape[-1] != head_dim:
        raise ValueError(
            f"the model's rotary embedding covers {cos.shape[-1]} of {head_dim} head dimensions; Palu supports "
            "full-width rotary embeddings (Llama, Mistral, Qwen2, Qwen3)"
        )
    half = head_dim // 2
    if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
        raise ValueError("the model's rotary tables do not repeat their first half (rotate_half RoPE); Palu cannot serve it")
    # on ``device``: the rotary module may live on another GPU than the layer (device_map)
    return (cos[0, :, :half].to(device=device, dtype=dtype).contiguous(),
            sin[0, :, :half].to(device=device, dtype=dtype).contiguous())


def rope_rows(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half tables' rows at ``positions [B, T]`` (negative positions read row 0): ``cos``/``sin
    [B, T, D / 2]``, the rows per slot that the attention functions take in place of tables."""
    pos = positions.long().clamp_min(0)
    return cos[pos], sin[pos]


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [B, H, T, D]`` at ``positions [B, T]``, as transformers applies it
    (``x * cos + rotate_half(x) * sin`` in ``x.dtype``). ``cos``/``sin``: half tables ``[P, D / 2]``
    indexed by position, or rows per slot ``[B, T, D / 2]`` (:func:`rope_rows`; positions unused)."""
    if cos.dim() == 2:
        if positions is None:
            raise ValueError("half tables cos/sin [P, D / 2] need the positions [B, T]; pass them, or the rope rows "
                             "per slot [B, T, D / 2] (rope_rows)")
        cos, sin = rope_rows(positions, cos, sin)
    c = torch.cat([cos] * 2, dim=-1)[:, None].to(x.dtype)
    s = torch.cat([sin] * 2, dim=-1)[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat([-x2, x1], dim=-1) * s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm over the last dimension (fp32 statistics, weight applied in ``x.dtype``)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rebuild(h: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """Pre-RoPE states ``[B, Hkv, T, D]`` from latents ``h [B, G, T, r]`` and ``up [G, gs * D, r]``
    (``bias [Hkv * D]`` added when given)."""
    out = torch.einsum("bgtr,gor->bgto", h, up.to(h.dtype))
    b, g, t, _ = out.shape
    out = out.unflatten(-1, (-1, head_dim)).permute(0, 1, 3, 2, 4).reshape(b, -1, t, head_dim)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, head_dim)
    return out


def rebuild_keys(
    k: Latents,
    up: torch.Tensor,
    positions: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Post-RoPE keys ``[B, Hkv, T, D]``: rebuild, + bias, per-head ``norm = (weight [D], eps)``, RoPE."""
    head_dim = cos.shape[-1] * 2
    keys = rebuild(k.values(), up, bias, head_dim)
    if norm is not None:
        keys = rms_norm(keys, norm[0].to(keys.dtype), norm[1])
    return apply_rope(keys, positions, cos, sin)


def value_output(
    o_lat: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, num_kv_heads: int
) -> torch.Tensor:
    """Per-query-head value up-projection: ``o_lat [B, Hq, L, r]`` (softmax-weighted value latents of each
    query head's group) -> ``[B, Hq, L, D]``, plus the value bias (softmax weights sum to one).

    Query head ``h`` reads KV head ``k = h // (Hq / Hkv)``, head ``k % gs`` of group ``k // gs`` of
    ``up [G, gs * D, r]``."""
    groups, rows, rank = up.shape
    gs = num_kv_heads // groups
    head_dim = rows // gs
    hq = o_lat.shape[1]
    per_kv = up.reshape(num_kv_heads, head_dim, rank)  # KV head k: up[k // gs, (k % gs) * D ...]
    heads = per_kv.repeat_interleave(hq // num_kv_heads, dim=0).to(o_lat.dtype)  # [Hq, D, r]
    out = torch.einsum("bhlr,hdr->bhld", o_lat, heads)
    if bias is not None:
        out = out + bias.to(out.dtype).view(num_kv_heads, head_dim).repeat_interleave(hq // num_kv_heads, 0)[None, :, None]
    return out


def latent_attention(
    q: torch.Tensor,
    k: Latents,
    v: Latents,
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
) -> torch.Tensor:
    """Causal attention of post-RoPE queries ``q [B, Hq, Lq, D]`` over a latent cache (module docstring):
    keys rebuilt and rotated at ``positions [B, T]`` (or by the rope rows per slot), values rebuilt; masks
    from ranks (``kvpress.kernels.reference``). Returns ``[B, Hq, Lq, D]`` in ``q.dtype``."""
    head_dim = q.shape[-1]
    keys = rebuild_keys(k, k_up, positions, cos, sin, k_bias, k_norm).to(q.dtype)
    values = rebuild(v.values(), v_up, v_bias, head_dim).to(q.dtype)
    return rank_attention(q, keys, values, q_rank, k_rank, scale, window=window)
