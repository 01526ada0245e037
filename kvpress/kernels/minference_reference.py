"""MInference 1.0 (Jiang et al., arXiv 2407.02490) dynamic sparse prefill: plain-torch references.

These functions are the CPU path of ``kvpress/kernels/minference.py`` and the oracle of its tests. They
build the exact per-head index of each pattern from the input and compute attention under it.

Shapes: ``q [B, Hq, Lq, D]``, ``k``/``v [B, Hkv, T, D]`` with ``Hq % Hkv == 0`` (query head ``h``
reads KV head ``h // (Hq // Hkv)``; never repeated in memory), ranks ``q_rank [B, Lq]`` and
``k_rank [B, T]`` (int, -1 = padding, see ``kvpress/kernels/reference.py``). Keys are in rank order with
padding on the left and the queries are the last ``Lq`` real tokens (``T > Lq``: chunked prefill,
the index is built against every previous key). Everything is expressed in ranks, so a left-padded
row gives the same result as the row alone.

Patterns (64-token tiling as in the reference; ``BLOCK = 64``):

* **Vertical-slash (VS)**: scores of the last ``LAST_Q = 64`` real queries against every key,
  ``softmax(q k^T * scale)`` in fp32 under the causal mask; vertical score of key rank ``j`` = its
  column sum, slash score of offset ``o`` = the sum along the diagonal ``i - j = o``. The first
  ``FORCED_COLUMNS = 30`` key ranks and the ``FORCED_DIAGONALS = 100`` offsets nearest the diagonal
  are always kept; then the top ``vertical_size`` columns and top ``slash_size`` offsets (at least
  30 and 50). Attention under the index: query rank ``i`` in query block ``base = 64 * (i // 64)``
  attends key rank ``j <= i`` when ``j`` is a chosen column, or when some chosen offset ``o`` has
  ``base - o <= j <= base - o + 63`` (each diagonal is a 64-wide key range per 64-row query block,
  as the reference's kernel computes it; the union is exact, no key counted twice).
* **Block-sparse**: ``q`` and ``k`` mean-pooled over 64-rank blocks; block scores
  ``q_blk k_blk^T`` under the block-causal mask; each query block keeps its ``top_k`` key blocks.
  Unlike the reference, the diagonal block is always kept (so no query is left without a key).
* **A-shape** (``n_init`` sinks + ``n_local`` recent keys) is ``reference.rank_attention`` with
  ``sink=n_init, recent=n_local``.

The model's sliding ``window`` (if any) applies on top of every pattern (``i - j < window``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64  # tokens per query block / key block / diagonal range
LAST_Q = 64  # queries that score the VS index
FORCED_COLUMNS = 30  # first key ranks always kept (VS)
FORCED_DIAGONALS = 100  # offsets 0..99 always kept (VS)
MIN_VERTICAL, MIN_SLASH = 30, 50
SENTINEL = 1 << 30  # an unused entry of a vertical / slash index (sorts last)
FORCED = 1e4  # score of a forced entry (> any sum of probabilities over 64 queries); nearer ones rank higher
SCORE_BYTES = 1 << 30  # fp32 score bytes materialised at once while building indices


def _chunks(n: int, per_item: int, budget: int = SCORE_BYTES):
    """``range`` steps over ``n`` items so that ``step * per_item`` bytes stay under ``budget``."""
    step = max(1, budget // max(1, per_item))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, Hq, L, D] -> [B, Hkv, G * L, D]``: the query heads of a KV head stacked (a view when contiguous)."""
    B, Hq, L, D = q.shape
    return q.reshape(B, hkv, (Hq // hkv) * L, D)


def _sizes(sizes, n_heads: int, device) -> torch.Tensor:
    sizes = torch.as_tensor(sizes, dtype=torch.long, device=device)
    return sizes.expand(n_heads) if sizes.dim() == 0 else sizes


# ----------------------------------------------------------------------------------------------
# Index building


def last_queries(q: torch.Tensor, q_rank: torch.Tensor, n: int = LAST_Q):
    """The last ``min(n, Lq)`` query rows and their ranks (left padding: the real ones are last)."""
    n = min(n, q.shape[2])
    return q[:, :, -n:], q_rank[:, -n:]


def vs_scores(q, k, q_rank, k_rank, scale, window=None):
    """Vertical and slash scores of the last ``LAST_Q`` queries (fp32).

    Returns ``vertical [B, Hq, T]`` (per key *tensor column*; the forced first ranks are ``inf``,
    padding ``-inf``) and ``slash [B, Hq, T]`` (per *offset* ``o = i - j`` in ranks; offsets
    ``< FORCED_DIAGONALS`` are ``inf``, offsets that no real pair has are ``-inf``). Query heads are
    processed in chunks so that at most ``SCORE_BYTES`` of fp32 scores exist at a time.
    """
    B, Hq, _, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ql, qr = last_queries(q, q_rank)
    L = ql.shape[2]
    blocked = ~_rank_mask(qr, k_rank, window)  # [B, 1, L, T]
    # Rank of row r is a + r and of tensor column n is n - s for real tokens: offset = (a + s) - (n - r).
    a = qr[:, -1].long() - (L - 1)
    s = (T - 1) - k_rank[:, -1].long()
    o = torch.arange(T, device=q.device)
    c = (a + s)[:, None] - o[None, :] + (L - 1)  # [B, T]: index of offset o in the skewed sums
    c_ok = (c >= 0) & (c < T + L - 1) & (o[None, :] <= qr[:, -1:].long())
    vertical = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    slash = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    for h0, h1 in _chunks(Hkv, B * G * L * T * 4 * 3):
        scores = torch.matmul(_grouped(ql, Hkv)[:, h0:h1], k[:, h0:h1].transpose(-1, -2))
        scores = scores.view(B, (h1 - h0) * G, L, T).float().mul_(scale).masked_fill_(blocked, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        del scores
        p.nan_to_num_(0.0)  # query rows without a key (padding)
        vertical[:, h0 * G:h1 * G] = p.sum(-2)
        diag = _diagonal_sums(p)
        slash[:, h0 * G:h1 * G] = diag.gather(-1, c.clamp(0, T + L - 2)[:, None].expand(-1, (h1 - h0) * G, -1))
    # Forced entries outrank every real score, nearer ones first (ties broken the same on every device).
    slash = torch.where(c_ok[:, None], slash, float("-inf"))
    forced_o = c_ok & (o[None, :] < FORCED_DIAGONALS)
    slash = torch.where(forced_o[:, None], FORCED + (FORCED_DIAGONALS - o).float(), slash)
    real = k_rank >= 0
    forced_j = real & (k_rank < FORCED_COLUMNS)
    vertical = vertical.masked_fill(~real[:, None], float("-inf"))
    vertical = torch.where(forced_j[:, None], FORCED + (FORCED_COLUMNS - k_rank).float()[:, None], vertical)
    return vertical, slash


def _skewed_sums(padded: torch.Tensor, width: int) -> torch.Tensor:
    """``out[..., c] = sum_r padded[..., r, c + r]`` for ``c < width`` (``padded [..., L, W]``
    contiguous, ``W >= width + L - 1``): with a row stride one longer, ``view[r, c] = padded[r, c + r]``."""
    L, W = padded.shape[-2:]
    return padded.as_strided((*padded.shape[:-2], L, width), (*padded.stride()[:-2], W + 1, 1)).sum(-2)


def _diagonal_sums(p: torch.Tensor) -> torch.Tensor:
    """``[..., T + L - 1]`` sums of ``p [..., L, T]`` along its diagonals: entry ``c`` sums
    ``p[r, c + r - (L - 1)]`` over the rows where that column exists (``c = n - r + L - 1``).

    The interior (every row has the column) is a strided view of ``p`` itself; only the ``L - 1``
    partial diagonals at each end go through a zero-padded copy of ``L - 1`` columns."""
    L, T = p.shape[-2:]
    if T < 2 * L or not p.is_contiguous():
        return _skewed_sums(F.pad(p, (L - 1, L - 1)), T + L - 1)
    interior = p.as_strided((*p.shape[:-2], L, T - L + 1), (*p.stride()[:-2], T + 1, 1)).sum(-2)
    left = _skewed_sums(F.pad(p[..., :L - 1], (L - 1, 0)).contiguous(), L - 1)
    right = _skewed_sums(F.pad(p[..., T - L + 1:], (0, L - 1)).contiguous(), L - 1)
    return torch.cat([left, interior, right], -1)


def _top(scores: torch.Tensor, sizes: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    """Top ``sizes[h]`` entries per head of ``scores [B, H, N]`` (ascending, ``SENTINEL``-padded).
    ``values [B, N]`` maps an entry to what is stored (default: its index)."""
    n = min(int(sizes.max()), scores.shape[-1])
    top = scores.topk(n, dim=-1)
    picked = top.indices if values is None else values.gather(1, top.indices.flatten(1)).view_as(top.indices)
    unused = (top.values == float("-inf")) | (torch.arange(n, device=scores.device) >= sizes[:, None])
    return picked.masked_fill(unused, SENTINEL).sort(dim=-1).values.int()


def vs_index(q, k, q_rank, k_rank, scale, vertical_size, slash_size, window=None, heads=None):
    """Vertical-slash index of the query heads ``heads`` (default: all; module docstring).

    ``vertical_size`` / ``slash_size``: ints or ``[Hq]`` tensors (per head). Returns ``vertical
    [B, n, NV]`` (key ranks) and ``slash [B, n, NS]`` (offsets), int32, ascending, unused entries
    ``SENTINEL``, for the ``n`` heads.
    """
    Hq, T = q.shape[1], k.shape[2]
    vsz = _sizes(vertical_size, Hq, q.device).clamp(min=MIN_VERTICAL).clamp(max=T)
    ssz = _sizes(slash_size, Hq, q.device).clamp(min=MIN_SLASH).clamp(max=T)
    vertical, slash = vs_scores(q, k, q_rank, k_rank, scale, window)
    if heads is not None:
        vertical, slash, vsz, ssz = vertical[:, heads], slash[:, heads], vsz[heads], ssz[heads]
    return _top(vertical, vsz, k_rank.long()), _top(slash, ssz, None)


def _block_ids(rank: torch.Tensor) -> torch.Tensor:
    return torch.where(rank >= 0, rank.long() // BLOCK, -1)


def first_query_block(q_rank: torch.Tensor) -> torch.Tensor:
    """``[B]`` rank block of each row's first real query (0 for a row without one)."""
    lo = torch.where(q_rank >= 0, q_rank.long(), SENTINEL).amin(-1)
    return torch.where(lo == SENTINEL, 0, lo // BLOCK)


def query_blocks(lq: int) -> int:
    """Rank blocks that ``lq`` consecutive query ranks can touch."""
    return (lq + BLOCK - 1) // BLOCK + 1


def _pool(x: torch.Tensor, block: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``x [B, H, L, D]`` over tokens with the same ``block [B, L]`` id in ``[0, n)`` (others dropped)."""
    B, H, L, D = x.shape
    ids = torch.where((block >= 0) & (block < n), block, n)  # n = the dump slot
    sums = torch.zeros(B, H, n + 1, D, dtype=torch.float32, device=x.device)
    sums.scatter_add_(2, ids[:, None, :, None].expand(B, H, L, D), x.float())
    count = torch.zeros(B, n + 1, dtype=torch.float32, device=x.device).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=torch.float32))
    return (sums / count.clamp(min=1)[:, None, :, None])[:, :, :n], count[:, :n] > 0


def block_index(q, k, q_rank, k_rank, top_k, heads=None):
    """Block-sparse index of the query heads ``heads`` (default: all; module docstring).

    ``top_k``: int or tensor with one value per selected head (key blocks per query block). Returns
    ``blocks [B, n, NQB, K]`` int32: for the ``m``-th query block of a row (rank block
    ``first_query_block + m``, ``NQB = query_blocks(Lq)``) the kept key rank-blocks, ascending,
    unused entries ``-1``. Only the pooled keys (64x fewer than the keys) are gathered per head.
    """
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    heads = torch.arange(Hq, device=q.device) if heads is None else torch.as_tensor(heads, device=q.device)
    n_heads = heads.shape[0]
    nqb, nkb = query_blocks(Lq), (T + BLOCK - 1) // BLOCK
    sizes = _sizes(top_k, n_heads, q.device).clamp(min=1)
    first = first_query_block(q_rank)
    qb = torch.where(q_rank >= 0, _block_ids(q_rank) - first[:, None], -1)
    q_pool, q_has = _pool(q.index_select(1, heads), qb, nqb)  # [B, n, NQB, D]
    k_pool, k_has = _pool(k, _block_ids(k_rank), nkb)  # [B, Hkv, NKB, D]
    k_pool = k_pool.index_select(1, heads // (Hq // Hkv))  # [B, n, NKB, D]
    n = min(int(sizes.max()), nkb)
    out = torch.full((B, n_heads, nqb, n), -1, dtype=torch.int32, device=q.device)
    kb = torch.arange(nkb, device=q.device)
    for m0, m1 in _chunks(nqb, B * n_heads * nkb * 4 * 2):
        scores = torch.matmul(q_pool[:, :, m0:m1], k_pool.transpose(-1, -2))  # [B, n, m, NKB]
        rb = first[:, None] + torch.arange(m0, m1, device=q.device)  # [B, m] absolute query rank block
        ok = k_has[:, None, :] & (kb[None, None, :] <= rb[:, :, None]) & q_has[:, m0:m1, None]
        scores = scores.masked_fill(~ok[:, None], float("-inf"))
        scores = scores.masked_fill((kb[None, None, :] == rb[:, :, None])[:, None] & ok[:, None], float("inf"))
        top = scores.topk(n, dim=-1)
        unused = (top.values == float("-inf")) | (torch.arange(n, device=q.device) >= sizes[:, None, None])
        out[:, :, m0:m1] = top.indices.masked_fill(unused, -1).sort(dim=-1).values.int()
    return out


# ----------------------------------------------------------------------------------------------
# Masks and attention under an index


def _rank_mask(q_rank, k_rank, window=None):
    qr = q_rank[:, None, :, None].long()
    kr = k_rank[:, None, None, :].long()
    allowed = (kr >= 0) & (qr >= 0) & (kr <= qr)
    if window is not None:
        allowed &= qr - kr < window
    return allowed


def vs_mask(q_rank, k_rank, vertical, slash, window=None):
    """Boolean ``[B, H, Lq, T]`` mask of a VS index (module docstring)."""
    B, T = k_rank.shape
    H = vertical.shape[1]
    kr = k_rank.long()
    # Chosen columns, by key rank.
    col = torch.zeros(B, H, T + 1, dtype=torch.bool, device=k_rank.device)
    col.scatter_(2, vertical.long().clamp(max=T), True)
    columns = col[..., :T].gather(2, kr.clamp(min=0)[:, None].expand(B, H, T))  # [B, H, T]
    # Offsets: count[x] = chosen offsets < x; some offset in [d, d + 63] iff count[d + 64] > count[d].
    ind = torch.zeros(B, H, T + BLOCK + 1, dtype=torch.int32, device=k_rank.device)
    ind.scatter_(2, slash.long().clamp(max=T + BLOCK), 1)
    ind[..., -1] = 0
    count = F.pad(ind.cumsum(-1), (1, 0))[..., : T + BLOCK + 1]
    base = torch.where(q_rank >= 0, q_rank.long() // BLOCK * BLOCK, 0)
    d = base[:, :, None] - kr[:, None, :]  # [B, Lq, T]: chosen offsets in [d, d + 63] cover the key
    lo = count.gather(2, d.clamp(0, T).flatten(1)[:, None].expand(B, H, -1)).view(B, H, *d.shape[1:])
    hi = count.gather(2, (d + BLOCK).clamp(0, T + BLOCK).flatten(1)[:, None].expand(B, H, -1)).view_as(lo)
    return _rank_mask(q_rank, k_rank, window) & (columns[:, :, None, :] | (hi > lo))


def block_mask(q_rank, k_rank, blocks, window=None, first=None):
    """Boolean ``[B, H, Lq, T]`` mask of a block-sparse index (see :func:`block_index`); ``first [B]``:
    the rank block of ``blocks``' row 0 (default: :func:`first_query_block` of ``q_rank``)."""
    B, H, nqb, _ = blocks.shape
    nkb = (k_rank.shape[1] + BLOCK - 1) // BLOCK
    first = first_query_block(q_rank) if first is None else first
    keep = torch.zeros(B, H, nqb, nkb + 1, dtype=torch.bool, device=blocks.device)
    keep.scatter_(3, torch.where(blocks >= 0, blocks.long(), nkb), True)
    m = torch.where(q_rank >= 0, _block_ids(q_rank) - first[:, None], 0).clamp(0, nqb - 1)  # [B, Lq]
    rows = keep.gather(2, m[:, None, :, None].expand(B, H, -1, nkb + 1))  # [B, H, Lq, NKB + 1]
    kb = _block_ids(k_rank).clamp(min=0)
    cols = rows.gather(3, kb[:, None, None, :].expand(B, H, m.shape[1], -1))
    return _rank_mask(q_rank, k_rank, window) & cols


def masked_attention(q, k, v, mask, scale):
    """Softmax attention under a per-head boolean ``mask [B, Hq, Lq, T]`` (GQA-native through SDPA);
    rows without a key give zeros."""
    has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(~has_key, 0.0)


def vs_attention(q, k, v, q_rank, k_rank, vertical, slash, scale, window=None, query_chunk=256):
    """Attention under a VS index: dense attention under :func:`vs_mask`, ``query_chunk`` queries at a time."""
    out = torch.empty_like(q)
    for s in range(0, q.shape[2], query_chunk):
        e = min(q.shape[2], s + query_chunk)
        mask = vs_mask(q_rank[:, s:e], k_rank, vertical, slash, window)
        out[:, :, s:e] = masked_attention(q[:, :, s:e], k, v, mask, scale)
    return out


def block_sparse_attention(q, k, v, q_rank, k_rank, blocks, scale, window=None, query_chunk=256):
    """Attention under a block-sparse index: dense attention under :func:`block_mask`, ``query_chunk``
    queries at a time."""
    out = torch.empty_like(q)
    first = first_query_block(q_rank)
    for s in range(0, q.shape[2], query_chunk):
        e = min(q.shape[2], s + query_chunk)
        mask = block_mask(q_rank[:, s:e], k_rank, blocks, window, first)
        out[:, :, s:e] = masked_attention(q[:, :, s:e], k, v, mask, scale)
    return out
