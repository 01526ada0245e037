"""Attention kernels: Triton on CUDA, the plain-torch references everywhere else.

Every public function here has the signature and semantics of its reference in
``kvpress.kernels.reference``. The dispatcher picks the Triton kernels (``prefill``, ``decode``)
when the tensors live on a CUDA device and Triton imports, and the reference otherwise. The
environment variable ``KVPRESS_KERNELS`` (or the module attribute ``BACKEND``) overrides the choice:
``auto`` (default), ``reference`` (always the torch reference), ``triton`` (always Triton, also on
CPU tensors under ``TRITON_INTERPRET=1``; used by the CPU tests).
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import reference
from .reference import rank_mask, write_new_into, write_new_tokens

try:
    from .decode import decode_attention, made_once
    from .prefill import prefill_attention
except ImportError:  # no (usable) triton: the references serve everything
    decode_attention = prefill_attention = made_once = None

__all__ = ["grouped_attention", "rank_attention", "rank_mask", "split_cache_attention", "write_new_into", "write_new_tokens"]

BACKEND = os.environ.get("KVPRESS_KERNELS", "auto")


def use_triton(t: torch.Tensor) -> bool:
    """Whether ``t``'s attention runs the Triton kernels (CUDA, or forced by ``BACKEND``) or the reference."""
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
    if not use_triton(q):
        return reference.rank_attention(q, k, v, q_rank, k_rank, scale, sink=sink, recent=recent, window=window)
    if q.shape[2] == 1:
        return decode_attention(q, q_rank, scale, q.shape[1] // k.shape[1],
                                split=(k, v, k_rank, _all_heads(k.shape[1], q.device), sink, recent),
                                window=window, out=torch.empty_like(q))
    return prefill_attention(q, k, v, q_rank, k_rank, scale, sink=sink, recent=recent, window=window)


def grouped_attention(q, groups, q_rank, scale, window=None, new_kv=None, full_prefill=None) -> torch.Tensor:
    """Attention over a cache whose KV heads are split into groups (``kvpress.cache.HeadGroup``:
    ``heads [n]``, ``k``/``v [B, n, T, D]``, ``rank [B, T]``, ``window`` with ``sink``/``recent`` or
    None for a group that keeps every token); query head ``h`` reads KV head ``h // group``.

    ``q [B, Hq, Lq, D]``, ``q_rank [B, Lq]``; ``window``: the model's sliding window or None.
    A group with a ``length`` (an int32 device tensor; ``HeadGroup.length``) uses only that many of
    its slots: the Triton decode kernel reads it on the device (a CUDA-graph step), other paths
    narrow the group to it.
    ``new_kv``: the forward's new tokens ``(k, v)``, ``[B, num_kv_heads, n, D]``, when the last ``n``
    slots of every group's buffers are room for them not written yet: they are written first (at
    decode on Triton, by the decode kernel itself). ``full_prefill(q, k, v, q_rank, k_rank, q_heads,
    scale, window)``: the attention of groups that keep every token at prefill (a sparse prefill
    method; ``q_heads``: the global indices of q's heads, a list); None = dense causal.

    On Triton: decode (one query token, at most two groups) is one split-K launch serving both
    groups plus a merge launch (``decode``); prefill runs windowed groups through the linear-cost
    A-shape kernel (``prefill``) and full groups through ``full_prefill``, or torch SDPA's fused
    causal kernels when the batch has no padding and the queries are the whole cache, else the
    rank-mask kernel. Elsewhere: the torch reference. Returns ``[B, Hq, Lq, D]``.
    """
    groups = [g for g in groups if len(g.heads)]
    num_kv_heads = sum(len(g.heads) for g in groups)
    group = q.shape[1] // num_kv_heads if num_kv_heads else 1
    on_triton = use_triton(q)
    with _on_device(q):
        if on_triton and q.shape[2] == 1 and q.shape[3] % 8 == 0 and 0 < len(groups) <= 2:
            # the larger group (the one that keeps every token, if any) is split along the keys
            ordered = sorted(groups, key=lambda g: (g.window is not None, -g.k.shape[2]))
            split, single = [(g.k, g.v, g.rank, _on(g.heads, q.device), *_a_shape(g), _length(g))
                             for g in ordered] + [None] * (2 - len(ordered))
            return decode_attention(q, q_rank, scale, group, split=split, single=single, window=window, new_kv=new_kv)
        groups = [_in_use(g) for g in groups]
        if new_kv is not None:
            write_new_into(new_kv, [(g.k, g.v, g.heads) for g in groups])
        out = torch.empty_like(q) if num_kv_heads * group == q.shape[1] else torch.zeros_like(q)
        for g in groups:
            heads = _on(g.heads, q.device).long()
            q_heads = (heads[:, None] * group + torch.arange(group, device=q.device)).flatten()
            sink, recent = _a_shape(g)
            if recent is None and full_prefill is not None and q.shape[2] > 1:
                q_list = q_heads.tolist()  # one host sync (the sparse method plans its heads on the host)
                if len(groups) == 1 and q_list == list(range(q.shape[1])):  # every query head in order: no copies
                    return full_prefill(q, g.k, g.v, q_rank, g.rank, q_list, scale, window)
                out.index_copy_(1, q_heads, full_prefill(q.index_select(1, q_heads), g.k, g.v, q_rank, g.rank,
                                                         q_list, scale, window))
            elif not on_triton:
                out[:, q_heads] = reference.rank_attention(q[:, q_heads], g.k, g.v, q_rank, g.rank, scale,
                                                           sink=sink, recent=recent, window=window)
            elif recent is not None or not _causal_sdpa(q, g.k, g.v, g.rank, q_rank, heads, group, scale, window, out):
                prefill_attention(q, g.k, g.v, q_rank, g.rank, scale, sink, recent, window,
                                  heads=heads, group=group, out=out)
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
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """DuoAttention over a split cache (:func:`grouped_attention` with a group of retrieval heads
    that keeps every token and a group of streaming heads that keeps ``sink`` + ``recent``); see
    :func:`kvpress.kernels.reference.split_cache_attention`."""
    groups = [_Group(retrieval_heads, full_k, full_v, full_rank, None),
              _Group(streaming_heads, stream_k, stream_v, stream_rank, _Window(sink, recent))]
    return grouped_attention(q, groups, q_rank, scale, window=window, new_kv=new_kv)


class _Window(NamedTuple):
    sink: int
    recent: int


class _Group(NamedTuple):
    heads: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rank: torch.Tensor
    window: _Window | None


def _length(g) -> torch.Tensor | None:
    """A group's device length (``HeadGroup.length``: buffers of a fixed capacity), or None."""
    return getattr(g, "length", None)


def _in_use(g):
    """The group narrowed to the slots in use when it has a device length (reads it: a host sync,
    for the paths that are not captured in a CUDA graph)."""
    length = _length(g)
    if length is None:
        return g
    n = int(length.reshape(-1)[0])
    return _Group(g.heads, g.k.narrow(2, 0, n), g.v.narrow(2, 0, n), g.rank.narrow(1, 0, n), g.window)


def _a_shape(g) -> tuple[int, int | None]:
    return (0, None) if g.window is None else (g.window.sink, g.window.recent)


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (layers of one model may live on several)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


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
