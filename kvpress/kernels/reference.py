"""Plain-torch references: the CPU path of every kernel and the oracle of every kernel test.

Token ranks
-----------
Attention masks in kvpress are described by *ranks* instead of dense masks. The rank of a token is
its index among the real (non-padding) tokens of its batch row: 0, 1, 2, ...; padding tokens have
rank -1. A query of rank ``i`` may attend a key of rank ``j`` when

* ``j >= 0`` (the key is a real token) and ``j <= i`` (causal), and
* ``recent is None``, or ``i - j < recent``, or ``j < sink`` (A-shape: sinks plus a recent window,
  StreamingLLM / DuoAttention streaming heads), and
* ``window is None`` or ``i - j < window`` (the model's own sliding window, if any).

A query with no allowed key (a padding query) gets a zero output. Keys may come in any order (a
cache may keep them compacted or in a ring): only their ranks matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rank_mask(
    q_rank: torch.Tensor,
    k_rank: torch.Tensor,
    sink: int = 0,
    recent: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean mask ``[B, 1, Lq, Lk]`` (True = attend) from query ranks ``[B, Lq]`` and key ranks ``[B, Lk]``."""
    qr = q_rank[:, None, :, None].long()
    kr = k_rank[:, None, None, :].long()
    allowed = (kr >= 0) & (kr <= qr)
    if recent is not None:
        allowed &= (qr - kr < recent) | (kr < sink)
    if window is not None:
        allowed &= qr - kr < window
    return allowed


def rank_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_rank: torch.Tensor,
    k_rank: torch.Tensor,
    scale: float,
    sink: int = 0,
    recent: int | None = None,
    window: int | None = None,
    query_chunk: int = 1024,
) -> torch.Tensor:
    """Softmax attention under the rank mask (module docstring), GQA-native.

    Shapes: ``q [B, Hq, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (query head
    ``h`` reads KV head ``h // (Hq // Hkv)``), ``q_rank [B, Lq]``, ``k_rank [B, Lk]`` (int).
    Returns ``[B, Hq, Lq, D]`` in ``q.dtype``. Queries are processed ``query_chunk`` at a time so the
    dense mask never exceeds ``B * query_chunk * Lk`` booleans.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    out = torch.empty_like(q)
    for start in range(0, q.shape[2], query_chunk):
        stop = min(start + query_chunk, q.shape[2])
        allowed = rank_mask(q_rank[:, start:stop], k_rank, sink, recent, window)
        has_key = allowed.any(dim=-1, keepdim=True)
        chunk = F.scaled_dot_product_attention(
            q[:, :, start:stop],
            k,
            v,
            attn_mask=allowed | ~has_key,  # rows without keys attend everything, then are zeroed
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        out[:, :, start:stop] = chunk.masked_fill(~has_key, 0.0)
    return out


def split_cache_attention(
    q: torch.Tensor,
    full_k: torch.Tensor,
    full_v: torch.Tensor,
    full_rank: torch.Tensor,
    stream_k: torch.Tensor,
    stream_v: torch.Tensor,
    stream_rank: torch.Tensor,
    q_rank: torch.Tensor,
    retrieval_heads: torch.Tensor,
    streaming_heads: torch.Tensor,
    scale: float,
    sink: int,
    recent: int,
    window: int | None = None,
) -> torch.Tensor:
    """DuoAttention over a split cache (arXiv 2410.10819): retrieval heads read every cached token,
    streaming heads read only sinks plus a recent window.

    ``q [B, Hq, Lq, D]``; ``full_k``/``full_v [B, R, T, D]`` hold the retrieval KV heads listed in
    ``retrieval_heads [R]`` (KV-head indices, ascending) with ranks ``full_rank [B, T]``;
    ``stream_k``/``stream_v [B, S, C, D]`` hold the streaming KV heads ``streaming_heads [S]`` with
    ranks ``stream_rank [B, C]``; ``q_rank [B, Lq]``. ``R + S`` is the number of KV heads and query
    head ``h`` belongs to KV head ``h // (Hq // (R + S))``. Streaming heads use the A-shape mask
    (``sink``, ``recent``), retrieval heads the causal mask; both respect the model's ``window``.
    Returns ``[B, Hq, Lq, D]``.
    """
    num_kv_heads = len(retrieval_heads) + len(streaming_heads)
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for heads, k, v, k_rank, a_shape in (
        (retrieval_heads, full_k, full_v, full_rank, None),
        (streaming_heads, stream_k, stream_v, stream_rank, recent),
    ):
        if len(heads) == 0:
            continue
        q_heads = (heads.to(q.device)[:, None] * group + torch.arange(group, device=q.device)).flatten()
        out[:, q_heads] = rank_attention(
            q[:, q_heads], k, v, q_rank, k_rank, scale, sink=sink, recent=a_shape, window=window
        )
    return out


def write_new_into(new_kv, targets) -> None:
    """Write the new tokens ``new_kv = (k, v)`` (``[B, num_kv_heads, n, D]``) into the last ``n``
    positions of cache buffers, in place: ``targets`` is a list of ``(k_buffer, v_buffer, heads)``,
    buffer ``[B, len(heads), T, D]`` holding the KV heads ``heads``. A cache holds values, not a
    graph: the write is not recorded by autograd (as in the decode kernel)."""
    k, v = new_kv
    n = k.shape[2]
    with torch.no_grad():
        for k_buffer, v_buffer, heads in targets:
            heads = heads.to(k.device)
            for buffer, new in ((k_buffer, k), (v_buffer, v)):
                torch.index_select(new.detach(), 1, heads, out=buffer.narrow(2, buffer.shape[2] - n, n))


def write_new_tokens(new_kv, full_k, full_v, stream_k, stream_v, retrieval_heads, streaming_heads) -> None:
    """:func:`write_new_into` for a split cache: KV heads ``retrieval_heads`` into the full buffers,
    ``streaming_heads`` into the window buffers (what the decode kernel does with ``new_kv``)."""
    write_new_into(new_kv, [(full_k, full_v, retrieval_heads), (stream_k, stream_v, streaming_heads)])
