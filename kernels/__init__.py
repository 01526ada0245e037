"""Attention kernels: Triton on CUDA, the plain-torch references everywhere else.

Every public function here has the signature and semantics of its reference in
``kvpress.kernels.reference``. The dispatcher picks the Triton kernels (``prefill``, ``decode``)
when the tensors live on a CUDA device and Triton imports, and the reference otherwise. The
environment variable ``KVPRESS_KERNELS`` (or the module attribute ``BACKEND``) overrides the choice:
``auto`` (default), ``reference`` (always the torch reference), ``triton`` (always Triton, also on
CPU tensors under ``TRITON_INTERPRET=1``; used by the CPU tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import reference
from .reference import rank_mask, write_new_tokens

try:
    from .decode import decode_attention, made_once
    from .prefill import prefill_attention
except ImportError:  # no (usable) triton: the references serve everything
    decode_attention = prefill_attention = made_once = None

__all__ = ["rank_attention", "rank_mask", "split_cache_attention", "write_new_tokens"]

BACKEND = os.environ.get("KVPRESS_KERNELS", "auto")


def _use_triton(t: torch.Tensor) -> bool:
    if BACKEND == "reference" or prefill_attention is None:
        return False
    return BACKEND == "triton" or t.is_cuda


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
    if not _use_triton(q):
        return reference.rank_attention(q, k, v, q_rank, k_rank, scale, sink=sink, recent=recent, window=window)
    if q.shape[2] == 1:
        return decode_attention(q, q_rank, scale, q.shape[1] // k.shape[1],
                                split=(k, v, k_rank, _all_heads(k.shape[1], q.device), sink, recent),
                                window=window, out=torch.empty_like(q))
    return prefill_attention(q, k, v, q_rank, k_rank, scale, sink=sink, recent=recent, window=window)


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
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """DuoAttention over a split cache; see :func:`kvpress.kernels.reference.split_cache_attention`.

    ``new_kv``: the forward's new tokens ``(k, v)``, ``[B, num_kv_heads, n, D]``, when the last ``n``
    positions of the four buffers are room for them not written yet: they are written first (see
    :func:`write_new_tokens`), at decode on Triton by the decode kernel itself.

    On Triton: decode (one query token) is one split-K launch that serves both head groups, plus a
    merge launch (``decode``); prefill runs the streaming heads through the linear-cost
    A-shape kernel (``prefill``) and the retrieval heads through torch SDPA's fused causal kernels
    when the batch has no padding and the queries are the whole cache, else through the rank-mask
    kernel.
    """
    on_triton = _use_triton(q)
    if on_triton and q.shape[2] == 1 and q.shape[3] % 8 == 0:  # decode: D a multiple of 8, heads of any int dtype
        rh, sh = _on(retrieval_heads, q.device), _on(streaming_heads, q.device)
        return decode_attention(q, q_rank, scale, q.shape[1] // (rh.shape[0] + sh.shape[0]),
                                split=(full_k, full_v, full_rank, rh, 0, None),
                                single=(stream_k, stream_v, stream_rank, sh, sink, recent),
                                window=window, new_kv=new_kv)
    if new_kv is not None:
        write_new_tokens(new_kv, full_k, full_v, stream_k, stream_v, retrieval_heads, streaming_heads)
    if not on_triton:
        return reference.split_cache_attention(
            q, full_k, full_v, full_rank, stream_k, stream_v, stream_rank, q_rank,
            retrieval_heads, streaming_heads, scale, sink, recent, window,
        )
    group = q.shape[1] // (len(retrieval_heads) + len(streaming_heads))
    out = torch.empty_like(q)  # the two groups cover every query head
    rh = retrieval_heads.to(q.device, torch.long)
    sh = streaming_heads.to(q.device, torch.long)
    if len(sh):
        prefill_attention(q, stream_k, stream_v, q_rank, stream_rank, scale, sink, recent, window,
                          heads=sh, group=group, out=out)
    if len(rh):
        if not _causal_sdpa(q, full_k, full_v, full_rank, q_rank, rh, group, scale, window, out):
            prefill_attention(q, full_k, full_v, q_rank, full_rank, scale, 0, None, window,
                              heads=rh, group=group, out=out)
    return out


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


_ALL_HEADS: dict = {}


def _all_heads(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` on ``device``, made once (see :func:`~kvpress.kernels.decode.made_once`)."""
    return made_once(_ALL_HEADS, (device, n), lambda: torch.arange(n, device=device))


def _causal_sdpa(q, k, v, k_rank, q_rank, heads, group, scale, window, out) -> bool:
    """Retrieval-head prefill through SDPA's flash kernel when plain causal attention is exact:
    no sliding window, the queries are the whole cache and no row has padding (one host sync)."""
    if not q.is_cuda or window is not None or q.shape[2] != k.shape[2]:
        return False
    pos = torch.arange(k.shape[2], device=q.device)
    if not bool(((k_rank == pos).all() & (q_rank == pos).all()).item()):
        return False
    q_heads = (heads[:, None] * group + torch.arange(group, device=q.device)).flatten()
    try:
        with _fused_sdpa_only():
            result = F.scaled_dot_product_attention(
                q.index_select(1, q_heads), k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
    except RuntimeError:  # no fused kernel takes these inputs (dtype, head dim): use the Triton kernel
        return False
    out.index_copy_(1, q_heads, result)
    return True


def _fused_sdpa_only():
    """SDPA restricted to its fused causal kernels, cuDNN first, never the math or memory-efficient
    ones (which would materialise or mask the whole score matrix). On the H100 (torch 2.11), 16
    query heads over 4 KV heads at 128K took 121 ms with SDPA's own choice but 215 ms with the
    flash backend forced, so flash is only the fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch < 2.6: no priorities
        return sdpa_kernel(backends)
