"""Plain-torch LESS (Dong et al., 2024, arXiv 2402.09398): the CPU path and the oracle of ``kvpress/kernels/less.py``.

LESS keeps a sparse set of tokens per (batch row, KV head) chosen by a cheap policy and folds every
evicted token, exactly once and at eviction, into a constant-size state per head:
``H = sum_s psi(k_s)^T v_s`` (``R x D``) and ``z = sum_s psi(k_s)`` (``R``), held in fp32. A query
then reads

    out = [sum_{s kept} exp(q.k_s * scale) v_s + phi(q) H] / [sum_{s kept} exp(q.k_s * scale) + phi(q).z]

computed in log space: ``lse_kept`` (log-sum-exp of the kept scores), ``log(max(phi(q).z, 1e-6))``,
one normaliser ``logaddexp`` of the two. A head that has folded nothing yet has no state term
(so LESS equals exact attention until the first eviction).

Policy (one rule for both of the paper's): a head keeps the ``sink`` first real tokens, the
``recent`` last ones (the current token included) and the ``heavy`` tokens of highest accumulated
attention probability among the others. Lambda (StreamingLLM) is ``heavy = 0``; H2O is ``sink = 0``.
The probabilities accumulated are those of the sparse attention over the kept tokens (the state term
is left out), so the kept sets are the same with or without a state: the plain policy is LESS with
the state switched off.

The cache of one layer (:class:`LessCache`) has ``S = sink + heavy + recent + 1`` slots per
(row, KV head), in any order, described by their token ranks (-1 = empty; see
``kvpress.kernels.reference``). Decode protocol, which the Triton kernels follow step for step:

1. the slot ``spare`` receives the new token; if ``pending``, it held the token evicted by the last
   step, which is folded into the state first;
2. the query attends every real slot of rank <= its own, plus the state;
3. if every slot is real, the lowest-scored evictable slot (rank >= sink and outside the recent
   window) becomes ``spare`` with ``pending`` set: it leaves attention now and is folded at the
   start of the next step. Otherwise an empty slot becomes ``spare``.

Prefill (any number of tokens, chunked prefill included) folds the pending token, attends the kept
slots plus the new tokens (causal) plus the state, then shrinks the candidates to the policy's
budget, folding every evicted token at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

STATE_FLOOR = 1e-6  # phi(q).z is clamped to this before its log (the reference's epsilon)


# -- feature maps ---------------------------------------------------------------------------------


@dataclass
class FeatureWeights:
    """Weights of the feature maps of one layer, one set per head (fp32 or the model's dtype).

    phi (per query head): ``q_w1 [Hq, D, N]``, ``q_w2 [Hq, N, R]``.
    psi (per state head; Hs = KV heads or query heads): ``k_w1 [Hs, D, N]``, ``k_w2 [Hs, N, R]``,
    ``k_scale [Hs, R]`` (|sD| multiplies the map), ``k_mix [Hs, R, R]`` (the R x R interaction) and
    ``k_mix_scale [Hs, R]`` (its scale).
    """

    q_w1: torch.Tensor
    q_w2: torch.Tensor
    k_w1: torch.Tensor
    k_w2: torch.Tensor
    k_scale: torch.Tensor
    k_mix: torch.Tensor
    k_mix_scale: torch.Tensor

    @classmethod
    def random(cls, query_heads: int, state_heads: int, head_dim: int, hidden: int, rank: int,
               seed: int = 0) -> "FeatureWeights":
        """Random fp32 maps (tests and probes) at a scale that keeps the features of unit-variance
        inputs of order one."""
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        return cls(q_w1=rnd(query_heads, head_dim, hidden) / 4, q_w2=rnd(query_heads, hidden, rank) / 4,
                   k_w1=rnd(state_heads, head_dim, hidden) / 4, k_w2=rnd(state_heads, hidden, rank) / 4,
                   k_scale=torch.rand(state_heads, rank, generator=g), k_mix=rnd(state_heads, rank, rank) / 3,
                   k_mix_scale=torch.rand(state_heads, rank, generator=g))

    @property
    def rank(self) -> int:
        return self.q_w2.shape[-1]

    @property
    def state_heads(self) -> int:
        return self.k_w1.shape[0]

    def to(self, *args, **kwargs) -> "FeatureWeights":
        return FeatureWeights(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def two_layer_map(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, absolute: bool = True) -> torch.Tensor:
    """``GELU(GELU(x w1) w2)`` per head, its absolute value unless ``absolute=False``: ``x [B, H, L, D]``,
    ``w1 [H, D, N]``, ``w2 [H, N, R]`` -> ``[B, H, L, R]`` fp32 (exact-erf GELU, no biases)."""
    hidden = F.gelu(torch.einsum("bhld,hdn->bhln", x.float(), w1.float()))
    out = F.gelu(torch.einsum("bhln,hnr->bhlr", hidden, w2.float()))
    return out.abs() if absolute else out


def phi(q: torch.Tensor, w: FeatureWeights) -> torch.Tensor:
    """Query features ``[B, Hq, L, R]`` (fp32) of ``q [B, Hq, L, D]``: ``|GELU(GELU(q W1) W2)|``."""
    return two_layer_map(q, w.q_w1, w.q_w2)


def key_features(h: torch.Tensor, k_scale: torch.Tensor, k_mix: torch.Tensor, k_mix_scale: torch.Tensor) -> torch.Tensor:
    """psi from the key map's output ``h = GELU(GELU(k W1) W2)`` ``[B, Hs, L, R]`` (before any absolute
    value), as the reference code: ``f = |k_scale| * h``, then ``|f + (f k_mix) * k_mix_scale|``."""
    f = h * k_scale.float().abs()[None, :, None]
    mix = torch.einsum("bhlr,hrs->bhls", f, k_mix.float())
    return (f + mix * k_mix_scale.float()[None, :, None]).abs()


def psi(k: torch.Tensor, w: FeatureWeights) -> torch.Tensor:
    """Key features ``[B, Hs, L, R]`` (fp32) of ``k [B, Hkv, L, D]`` (:func:`key_features` of the
    two-layer map). With ``Hs = G * Hkv`` state heads (one per query head), state head ``j`` reads
    KV head ``j // G``."""
    k = _expand_heads(k, w.state_heads)
    return key_features(two_layer_map(k, w.k_w1, w.k_w2, absolute=False), w.k_scale, w.k_mix, w.k_mix_scale)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``x [B, H, ...]`` repeated to ``heads`` heads (head ``j`` = ``x[:, j // (heads // H)]``)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


# -- the state term -------------------------------------------------------------------------------


def combine(o_kept: torch.Tensor, lse_kept: torch.Tensor, phi_q: torch.Tensor, hs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Merge sparse attention with the state through one log-space normaliser (fp32).

    ``o_kept [B, Hq, L, D]`` (normalised over the kept keys), ``lse_kept [B, Hq, L]`` (natural log;
    -inf when a query saw no key), ``phi_q [B, Hq, L, R]``, ``hs [B, Hs, R, D]``, ``z [B, Hs, R]``
    with ``Hs`` dividing ``Hq``. Heads whose ``z`` is all zero (nothing folded) add nothing.
    """
    heads = phi_q.shape[1]
    hs, z = _expand_heads(hs, heads), _expand_heads(z, heads)
    num = torch.einsum("bhlr,bhrd->bhld", phi_q, hs)
    den = torch.einsum("bhlr,bhr->bhl", phi_q, z)
    has_state = (z > 0).any(dim=-1)[:, :, None]
    lse_state = torch.where(has_state, den.clamp_min(STATE_FLOOR).log(), float("-inf"))
    lse = torch.logaddexp(lse_kept, lse_state)
    lse_safe = torch.where(torch.isfinite(lse), lse, 0.0)
    w_kept = torch.where(torch.isfinite(lse_kept), (lse_kept - lse_safe).exp(), 0.0)
    w_state = torch.where(has_state, (-lse_safe).exp(), 0.0)
    return o_kept.float() * w_kept[..., None] + num * w_state[..., None]


def masked_attention(q, k, v, allowed, scale: float):
    """Softmax attention with an explicit mask, returning ``(out, lse, scores)``, fp32.

    ``q [B, Hq, Lq, D]``, ``k``/``v [B, Hkv, Lk, D]``, ``allowed`` broadcastable to
    ``[B, Hkv, G, Lq, Lk]`` (G = Hq // Hkv). ``scores`` are the masked logits (-inf where not
    allowed), ``[B, Hq, Lq, Lk]``; a query without keys gets out 0 and lse -inf.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, lq, d)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isfinite(lse)[..., None], (s - lse.nan_to_num(neginf=0.0)[..., None]).exp(), 0.0)
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq), s.reshape(b, hq, lq, -1)


# -- the cache of one layer -----------------------------------------------------------------------


@dataclass
class LessCache:
    """What one layer keeps: ``S`` slots per (row, KV head) and the fp32 state per state head.

    k, v: ``[B, Hkv, S, D]`` (model dtype); rank: ``[B, Hkv, S]`` int32 (-1 = empty);
    score: ``[B, Hkv, S]`` fp32 accumulated attention probability (H2O); spare: ``[B, Hkv]`` int32
    slot for the next token; pending: ``[B, Hkv]`` int32 (1 = ``spare`` holds an evicted token not
    folded yet); hs: ``[B, Hs, R, D]`` fp32; z: ``[B, Hs, R]`` fp32.
    """

    k: torch.Tensor
    v: torch.Tensor
    rank: torch.Tensor
    score: torch.Tensor
    spare: torch.Tensor
    pending: torch.Tensor
    hs: torch.Tensor
    z: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, slots: int, head_dim: int, state_heads: int, rank: int, dtype, device):
        return cls(
            k=torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device),
            rank=torch.full((batch, kv_heads, slots), -1, dtype=torch.int32, device=device),
            score=torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=device),
            spare=torch.zeros(batch, kv_heads, dtype=torch.int32, device=device),
            pending=torch.zeros(batch, kv_heads, dtype=torch.int32, device=device),
            hs=torch.zeros(batch, state_heads, rank, head_dim, dtype=torch.float32, device=device),
            z=torch.zeros(batch, state_heads, rank, dtype=torch.float32, device=device),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def select_batch(self, index: torch.Tensor) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name).index_select(0, index.to(self.k.device)))


@dataclass(frozen=True)
class Policy:
    """Token budget of one head (tokens): sinks, heavy hitters, recent window (current token included)."""

    sink: int = 0
    heavy: int = 0
    recent: int = 1

    @property
    def budget(self) -> int:
        return self.sink + self.heavy + self.recent

    @property
    def slots(self) -> int:
        return self.budget + 1


def fold(cache: LessCache, k: torch.Tensor, v: torch.Tensor, evicted: torch.Tensor, w: FeatureWeights) -> None:
    """Fold the tokens ``evicted [B, Hkv, L]`` (bool) of ``k``/``v [B, Hkv, L, D]`` into the state, in place."""
    feats = psi(k, w) * _expand_heads(evicted, w.state_heads)[..., None].float()  # [B, Hs, L, R]
    cache.hs += torch.einsum("bhlr,bhld->bhrd", feats, _expand_heads(v, w.state_heads).float())
    cache.z += feats.sum(dim=2)


def fold_pending(cache: LessCache, w: FeatureWeights) -> None:
    """Step 1 of every forward: fold the token evicted by the last decode step, if any."""
    index = cache.spare.long()[..., None, None].expand(-1, -1, 1, cache.k.shape[-1])
    fold(cache, cache.k.gather(2, index), cache.v.gather(2, index), cache.pending[..., None] > 0, w)
    cache.pending.zero_()


def decode_step(q, k_new, v_new, q_rank, cache: LessCache, w: FeatureWeights, policy: Policy, scale: float,
                state: bool = True) -> torch.Tensor:
    """One decode step (module docstring), in place on ``cache``; returns ``out [B, Hq, 1, D]`` in q's dtype.

    ``q [B, Hq, 1, D]``, ``k_new``/``v_new [B, Hkv, 1, D]`` (post-RoPE), ``q_rank [B]`` int (-1 =
    padding). ``state=False``: the plain sparse policy (nothing folded, no state term).
    """
    if state:
        fold_pending(cache, w)
    b, hkv, slots, d = cache.k.shape
    spare = cache.spare.long()
    rows = torch.arange(b, device=q.device)[:, None]
    heads = torch.arange(hkv, device=q.device)[None, :]
    cache.k[rows, heads, spare] = k_new[:, :, 0].to(cache.k.dtype)
    cache.v[rows, heads, spare] = v_new[:, :, 0].to(cache.v.dtype)
    cache.rank[rows, heads, spare] = q_rank.to(torch.int32)[:, None].expand(b, hkv)
    cache.score[rows, heads, spare] = 0.0

    qr = q_rank.long()[:, None, None]
    allowed = (cache.rank >= 0) & (cache.rank <= qr)  # [B, Hkv, S]
    o_kept, lse_kept, s = masked_attention(q, cache.k, cache.v, allowed[:, :, None, None, :], scale)
    if state:
        out = combine(o_kept, lse_kept, phi(q, w), cache.hs, cache.z)
    else:
        out = o_kept
    if policy.heavy:
        p = (s - lse_kept.nan_to_num(neginf=0.0)[..., None]).exp()  # -inf scores give 0
        cache.score += p.view(b, hkv, -1, slots).sum(dim=2)
    select_spare(cache, qr[..., 0], policy)
    if not state:
        cache.pending.zero_()  # the plain policy drops the evicted token
    return out.to(q.dtype)


def select_spare(cache: LessCache, q_rank: torch.Tensor, policy: Policy) -> None:
    """Step 3: choose the slot of the next token (``q_rank [B, 1]`` the current token's rank)."""
    full = (cache.rank >= 0).all(dim=-1)
    evictable = (cache.rank >= policy.sink) & (cache.rank <= q_rank[:, :, None] - policy.recent)
    key = cache.score if policy.heavy else cache.rank.float()
    victim = torch.where(evictable, key, float("inf")).argmin(dim=-1)
    empty = (cache.rank < 0).to(torch.uint8).argmax(dim=-1)
    cache.spare = torch.where(full, victim, empty).to(torch.int32)
    cache.pending = (full & evictable.any(dim=-1)).to(torch.int32)


def kept_attention(q, keys, values, ranks, q_rank, scale: float, heavy: bool, query_chunk: int = 512):
    """The new tokens' attention over the candidates of a prefill (kept slots, then the new tokens)
    under the rank mask (a key of rank <= the query's; -1 = empty or padding), ``query_chunk``
    queries at a time (no ``L x L`` matrix).

    ``q [B, Hq, n, D]``, ``keys``/``values [B, Hkv, Lk, D]``, ``ranks [B, Hkv, Lk]``, ``q_rank [B, n]``.
    Returns ``(out [B, Hq, n, D] fp32, lse [B, Hq, n] (natural log, -inf without keys), mass)``:
    ``mass [B, Hkv, Lk]`` (with ``heavy``, else None) is each candidate's attention probability
    summed over the queries and the KV head's query heads (what H2O accumulates)."""
    b, hkv, lk, d = keys.shape
    n = q.shape[2]
    out = q.new_empty(b, q.shape[1], n, d, dtype=torch.float32)
    lse = q.new_empty(b, q.shape[1], n, dtype=torch.float32)
    mass = keys.new_zeros(b, hkv, lk, dtype=torch.float32) if heavy else None
    for start in range(0, n, query_chunk):
        stop = min(start + query_chunk, n)
        qr = q_rank[:, start:stop].long()
        allowed = (ranks[:, :, None, :] >= 0) & (ranks[:, :, None, :] <= qr[:, None, :, None])  # [B, Hkv, Lq, Lk]
        out[:, :, start:stop], lse[:, :, start:stop], s = masked_attention(q[:, :, start:stop], keys, values,
                                                                           allowed[:, :, None], scale)
        if heavy:
            p = (s - lse[:, :, start:stop].nan_to_num(neginf=0.0)[..., None]).exp()
            mass += p.view(b, hkv, -1, stop - start, lk).sum(dim=(2, 3))
    return out, lse, mass


def prefill_step(q, k_new, v_new, q_rank, cache: LessCache, w: FeatureWeights, policy: Policy, scale: float,
                 state: bool = True, query_chunk: int = 512, attend=kept_attention) -> torch.Tensor:
    """A forward of ``n`` new tokens (prompt or prompt chunk), in place on ``cache``; returns
    ``out [B, Hq, n, D]``. ``q_rank [B, n]`` are the new tokens' ranks (-1 = padding). ``attend``:
    :func:`kept_attention` or a function with its contract (the Triton one)."""
    if state:
        fold_pending(cache, w)
    else:
        cache.pending.zero_()
    b, hkv, slots, d = cache.k.shape
    n = k_new.shape[2]
    keys = torch.cat([cache.k, k_new.to(cache.k.dtype)], dim=2)
    values = torch.cat([cache.v, v_new.to(cache.v.dtype)], dim=2)
    ranks = torch.cat([cache.rank, q_rank.to(torch.int32)[:, None, :].expand(b, hkv, n)], dim=2)
    o_kept, lse_kept, mass = attend(q, keys, values, ranks, q_rank, scale, policy.heavy > 0)
    scores = torch.cat([cache.score, cache.score.new_zeros(b, hkv, n)], dim=2)
    if policy.heavy:
        scores += mass
    out = torch.empty_like(q)
    for start in range(0, n, query_chunk):  # the state term, a chunk of queries at a time
        rows = slice(start, min(start + query_chunk, n))
        o = o_kept[:, :, rows]
        if state:
            o = combine(o, lse_kept[:, :, rows], phi(q[:, :, rows], w), cache.hs, cache.z)
        out[:, :, rows] = o.to(q.dtype)
    keep = shrink_mask(ranks, scores, q_rank, policy)
    if state:
        fold(cache, keys, values, (ranks >= 0) & ~keep, w)
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :slots]  # kept first
    kept = keep.gather(-1, order)
    cache.k = keys.gather(2, order[..., None].expand(-1, -1, -1, d))
    cache.v = values.gather(2, order[..., None].expand(-1, -1, -1, d))
    cache.rank = torch.where(kept, ranks.gather(-1, order), -1)
    cache.score = torch.where(kept, scores.gather(-1, order), 0.0)
    cache.spare = kept.sum(dim=-1, dtype=torch.int32)  # the first empty slot (at most budget are kept)
    cache.pending = torch.zeros_like(cache.spare)
    return out


def shrink_mask(ranks: torch.Tensor, scores: torch.Tensor, q_rank: torch.Tensor, policy: Policy) -> torch.Tensor:
    """Which of the candidates ``ranks [B, Hkv, L]`` a head keeps after a forward whose newest token
    of each row has the largest rank in ``q_rank [B, n]``: sinks, the recent window and the
    ``heavy`` best ``scores`` among the others (ties: the newer token)."""
    last = q_rank.max(dim=1).values.long()[:, None, None]
    real = ranks >= 0
    protected = real & ((ranks < policy.sink) | (ranks > last - policy.recent))
    keep = protected
    if policy.heavy:
        others = real & ~protected
        key = torch.where(others, scores + ranks.float() * 1e-12, float("-inf"))
        count = min(policy.heavy, key.shape[-1])
        top = key.topk(count, dim=-1).indices
        chosen = torch.zeros_like(keep).scatter_(-1, top, True) & others
        keep = keep | chosen
    return keep


# -- teacher-forced simulation (training and the runtime's oracle) ---------------------------------


def eviction_times(q, k, policy: Policy, scale: float, start: int | None = None) -> torch.Tensor:
    """Decode-by-decode eviction of one unpadded batch: ``[B, Hkv, L]`` int64, the first query
    position that no longer sees each token (``L`` = never evicted).

    The first ``start`` tokens (default: the budget) are a prompt with full attention, shrunk to
    the budget afterwards (nothing to evict while it fits); then every position is one
    :func:`decode_step`. ``q [B, Hq, L, D]``, ``k [B, Hkv, L, D]``.
    """
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    start = policy.budget if start is None else start
    start = min(max(start, 1), length)
    evict_at = torch.full((b, hkv, length), length, dtype=torch.long, device=q.device)
    rank = torch.arange(length, device=q.device)
    if not policy.heavy:  # Lambda in closed form: the prompt keeps its last ``recent``, then each step evicts the oldest
        times = (rank + policy.recent + 1).clamp(min=start)
        return evict_at.copy_(torch.where((rank >= policy.sink) & (times < length), times, length).expand_as(evict_at))
    # The prompt: full causal attention, accumulated column mass, shrink.
    score = torch.zeros(b, hkv, length, device=q.device)
    if policy.heavy:
        s = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :start].float().view(b, hkv, g, start, d), k[:, :, :start].float()) * scale
        s = s.masked_fill(rank[None, None, None, :start, None] < rank[:start], float("-inf"))
        score[..., :start] = s.softmax(dim=-1).sum(dim=(2, 3))
    prompt_rank = rank[:start].int()[None].expand(b, -1)
    keep = shrink_mask(prompt_rank[:, None].expand(b, hkv, -1), score[..., :start], prompt_rank, policy)
    evict_at[..., :start] = torch.where(keep, length, start)
    alive = torch.zeros(b, hkv, length, dtype=torch.bool, device=q.device)
    alive[..., :start] = keep
    if policy.heavy:  # every decode query's logits at once: [B, Hkv, L - start, G, L]
        logits = torch.einsum("bhgqd,bhkd->bhqgk", q[:, :, start:].float().view(b, hkv, g, length - start, d), k.float()) * scale
    count = int(keep[0, 0].sum())  # tokens each head holds (the same for all: no padding here)
    for i in range(start, length):
        alive[..., i] = True
        count += 1
        if policy.heavy:
            s = logits[:, :, i - start, :, : i + 1].masked_fill(~alive[:, :, None, : i + 1], float("-inf"))
            score[..., : i + 1] += s.softmax(dim=-1).sum(dim=2)
        if count <= policy.budget:
            continue
        count -= 1
        evictable = alive[..., : i + 1] & (rank[: i + 1] >= policy.sink) & (rank[: i + 1] <= i - policy.recent)
        key = score[..., : i + 1] if policy.heavy else rank[: i + 1].float().expand(b, hkv, -1)
        victim = torch.where(evictable, key, float("inf")).argmin(dim=-1)
        alive.scatter_(-1, victim[..., None], False)
        evict_at.scatter_(-1, victim[..., None], i + 1)
    return evict_at


def simulate(q, k, v, evict_at: torch.Tensor, scale: float, w: FeatureWeights | None) -> torch.Tensor:
    """LESS attention of every position of an unpadded batch at once, from eviction times (training
    forward; equals running :func:`decode_step` position by position). ``w=None``: sparse only.
    Returns ``[B, Hq, L, D]`` fp32. Cost ``O(L^2)`` per head: for training lengths."""
    o_kept, lse_kept = sparse_part(q, k, v, evict_at, scale)
    if w is None:
        return o_kept
    return with_state(o_kept, lse_kept, phi(q, w), psi(k, w), v, evict_at)


def sparse_part(q, k, v, evict_at: torch.Tensor, scale: float):
    """``(o_kept, lse_kept)`` of every position: attention over the tokens each query still sees."""
    length = q.shape[2]
    pos = torch.arange(length, device=q.device)
    kept = (pos[None, :] <= pos[:, None]) & (evict_at[:, :, None, :] > pos[:, None])  # [B, Hkv, Lq, Lk]
    o_kept, lse_kept, _ = masked_attention(q, k, v, kept[:, :, None], scale)
    return o_kept, lse_kept


def with_state(o_kept, lse_kept, phi_q, psi_k, v, evict_at: torch.Tensor) -> torch.Tensor:
    """Add the state term to :func:`sparse_part`'s result, differentiably in ``phi_q [B, Hq, L, R]``
    and ``psi_k [B, Hs, L, R]``: query ``i`` reads the state of the tokens evicted before it.

    The state each query reads is built as the runtime builds it, by folding: every token's
    ``psi(k) v^T`` goes to the bucket of its eviction time, and a cumulative sum over time gives
    every position's ``(H, z)``. Cost ``O(L R D)`` per head (no ``L x L`` matrix)."""
    b, hq, length, d = o_kept.shape
    hkv, hs = evict_at.shape[1], psi_k.shape[1]
    g, rank = hq // hs, psi_k.shape[-1]
    when = _expand_heads(evict_at, hs).clamp(max=length)  # bucket L: never evicted
    v = _expand_heads(v, hs).float()
    folds = torch.cat([psi_k[..., :, None] * v[..., None, :], psi_k[..., None]], dim=-1)  # [B, Hs, L, R, D + 1]
    state = folds.new_zeros(b, hs, length + 1, rank, d + 1)
    state = state.scatter_add(2, when[..., None, None].expand_as(folds), folds)[:, :, :length].cumsum(dim=2)
    read = torch.einsum("bhgqr,bhqre->bhgqe", phi_q.reshape(b, hs, g, length, rank), state).reshape(b, hq, length, d + 1)
    num, den = read[..., :d], read[..., d]
    pos = torch.arange(length, device=o_kept.device)
    has_state = (evict_at.min(dim=-1).values[..., None] <= pos).repeat_interleave(hq // hkv, dim=1)  # [B, Hq, Lq]
    lse_state = torch.where(has_state, den.clamp_min(STATE_FLOOR).log(), float("-inf"))
    lse = torch.logaddexp(lse_kept, lse_state)
    lse_safe = torch.where(torch.isfinite(lse), lse, 0.0)
    w_kept = torch.where(torch.isfinite(lse_kept), (lse_kept - lse_safe).exp(), 0.0)
    w_state = torch.where(has_state, (-lse_safe).exp(), 0.0)
    return o_kept * w_kept[..., None] + num * w_state[..., None]


def column_mass(q, k, q_rank, k_rank, lse, scale: float, query_chunk: int = 256) -> torch.Tensor:
    """H2O's accumulated probabilities of a prefill without an ``L x L`` matrix: for each key, the sum
    over queries (and the query heads of its KV head) of ``exp(q.k * scale - lse_q)`` where allowed
    (causal by rank, per-head ``k_rank``). ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``,
    ``q_rank [B, Lq]``, ``k_rank [B, Hkv, Lk]``, ``lse [B, Hq, Lq]`` -> ``[B, Hkv, Lk]`` fp32."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    total = torch.zeros(b, hkv, k.shape[2], dtype=torch.float32, device=q.device)
    for start in range(0, lq, query_chunk):
        stop = min(start + query_chunk, lq)
        qr = q_rank[:, start:stop].long()
        allowed = (k_rank[:, :, None, :] >= 0) & (k_rank[:, :, None, :] <= qr[:, None, :, None])
        qg = q[:, :, start:stop].float().view(b, hkv, hq // hkv, stop - start, d)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scale
        l = lse[:, :, start:stop].view(b, hkv, hq // hkv, stop - start, 1)
        p = torch.where(allowed[:, :, None] & torch.isfinite(l), (s - l.nan_to_num(neginf=0.0)).exp(), 0.0)
        total += p.sum(dim=(2, 3))
    return total


def log_sum_exp(q, k, q_rank, k_rank, scale: float) -> torch.Tensor:
    """``lse [B, Hq, Lq]`` of the causal rank-masked scores (per-head ``k_rank [B, Hkv, Lk]``)."""
    allowed = (k_rank[:, :, None, :] >= 0) & (k_rank[:, :, None, :] <= q_rank.long()[:, None, :, None])
    return masked_attention(q, k, k, allowed[:, :, None], scale)[1]


def dense_attention(q, k, v, scale):
    """Causal attention of one unpadded batch (GQA), fp32: the unpatched model's attention."""
    b, hq, length, d = q.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return masked_attention(q, k, v, causal, scale)[0]


def state_bytes(head_dim: int, rank: int) -> int:
    """Bytes of one head's state (H and z, fp32)."""
    return 4 * rank * (head_dim + 1)


def tokens_of_state(head_dim: int, rank: int, dtype_bytes: int, state_per_kv_head: int = 1) -> int:
    """How many tokens' K and V take the memory of a KV head's state(s) (Baseline+ gets that many more)."""
    return math.ceil(state_per_kv_head * state_bytes(head_dim, rank) / (2 * head_dim * dtype_bytes))
