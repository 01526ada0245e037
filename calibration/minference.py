"""MInference kernel-aware pattern search (Jiang et al., 2024, arXiv 2407.02490, section 3.2).

    kvpress-calibrate minference --model PATH --out minference.safetensors [options]

For every layer and query head, each candidate pattern (candidates of about equal kernel cost) is
scored by the attention mass it recovers: on calibration samples, dense attention runs as usual and,
for the queries past ``start``, the softmax probabilities are summed over the keys each candidate's
index (built from the input exactly as at run time) keeps. Each head gets its best candidate. Scores
are computed a chunk of queries at a time: the full attention matrix is never held.

Defaults are the reference's: one 30K-token sample of text with passkeys (here from the bundled
corpus), queries past position 2500, candidates A-shape (100, 800); VS (30, 800), (100, 750),
(500, 700), (3500, 100); block-sparse keeping 1/8 of the key blocks. For a model whose context is
shorter than the sample, the sample is cut to the model's context and the start position and the
candidates' token budgets are scaled by the same factor (``--no-scale`` keeps them).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpress.adapters import describe
from kvpress.api import attention_override
from kvpress.kernels import minference_reference as R
from kvpress.kernels.reference import rank_mask
from kvpress.methods.minference import MInferenceConfig, plan_heads

from .data import PasskeyData, PasskeyRecipe, read_haystack

REFERENCE_LENGTH = 30000  # tokens of the reference's calibration sample
REFERENCE_START = 2500  # queries scored: those past this position
CANDIDATES = "ashape:100:800,vs:30:800,vs:100:750,vs:500:700,vs:3500:100,block:1/8"
NAMES = {"vs": "vertical_and_slash", "ashape": "stream_llm", "block": "block_sparse"}


def parse_candidates(text: str) -> list[tuple[str, float, float]]:
    """``"vs:A:B"`` (columns, diagonals), ``"ashape:A:B"`` (sinks, recent), ``"block:K"`` (key blocks)
    or ``"block:1/N"`` (a fraction of the blocks, stored as ``-1/N``), comma-separated."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            if parts[0] == "block" and len(parts) == 2:
                num, _, den = parts[1].partition("/")
                out.append(("block_sparse", -float(num) / float(den) if den else float(num), 0.0))
            elif parts[0] in ("vs", "ashape") and len(parts) == 3:
                out.append((NAMES[parts[0]], float(parts[1]), float(parts[2])))
            else:
                raise ValueError
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"bad candidate {item!r}: use vs:COLUMNS:DIAGONALS, ashape:SINK:RECENT, block:K "
                             "or block:1/N, comma-separated") from None
    return out


def scaled(candidates, factor: float) -> list[tuple[str, int, int]]:
    """Token budgets times ``factor`` (at least 1; VS at least 30 / 50); fractions of blocks stay."""
    out = []
    for name, a, b in candidates:
        if name == "block_sparse":
            out.append((name, a if a < 0 else max(1, round(a)), 0))
        else:
            a, b = max(1, round(a * factor)), max(1, round(b * factor))
            if name == "vertical_and_slash":
                a, b = max(a, R.MIN_VERTICAL), max(b, R.MIN_SLASH)
            out.append((name, a, b))
    return out


def vs_block_mask(q_rank, k_rank, vertical, slash, window=None):
    """``kernels.minference_reference.vs_mask``, the same boolean ``[B, H, Lq, T]``, built once per
    64-rank query block (every row of a block keeps the same keys before the causal mask) and
    expanded to the rows: about 64x fewer gathers, for the search and the recall probes on CPU."""
    B, T = k_rank.shape
    H, Lq = vertical.shape[1], q_rank.shape[1]
    kr = k_rank.long()
    col = torch.zeros(B, H, T + 1, dtype=torch.bool, device=k_rank.device)
    col.scatter_(2, vertical.long().clamp(max=T), True)
    columns = col[..., :T].gather(2, kr.clamp(min=0)[:, None].expand(B, H, T))
    # count[x] = chosen offsets < x; some offset in [d, d + 63] covers distance d iff count[d + 64] > count[d].
    ind = torch.zeros(B, H, T + R.BLOCK + 1, dtype=torch.int32, device=k_rank.device)
    ind.scatter_(2, slash.long().clamp(max=T + R.BLOCK), 1)
    ind[..., -1] = 0
    count = F.pad(ind.cumsum(-1), (1, 0))[..., : T + R.BLOCK + 1]
    qb = torch.where(q_rank >= 0, q_rank.long() // R.BLOCK, 0)
    b0 = int(qb.min())
    nb = int(qb.max()) - b0 + 1
    d = ((b0 + torch.arange(nb, device=k_rank.device)) * R.BLOCK)[None, :, None] - kr[:, None, :]  # [B, nb, T]
    lo = count.gather(2, d.clamp(0, T).flatten(1)[:, None].expand(B, H, -1)).view(B, H, nb, T)
    hi = count.gather(2, (d + R.BLOCK).clamp(0, T + R.BLOCK).flatten(1)[:, None].expand(B, H, -1)).view(B, H, nb, T)
    rows = columns[:, :, None, :] | (hi > lo)  # [B, H, nb, T]: the keys of each query block
    m = qb - b0
    mask = rows[0].index_select(1, m[0])[None] if B == 1 else rows.gather(2, m[:, None, :, None].expand(B, H, Lq, T))
    return R._rank_mask(q_rank, k_rank, window) & mask


def block_rows_mask(q_rank, k_rank, blocks, window=None, first=None):
    """``kernels.minference_reference.block_mask``, the same boolean ``[B, H, Lq, T]``, built once per
    64-rank query block and expanded to the rows (as :func:`vs_block_mask`)."""
    B, H, nqb, _ = blocks.shape
    T, Lq = k_rank.shape[1], q_rank.shape[1]
    nkb = (T + R.BLOCK - 1) // R.BLOCK
    first = R.first_query_block(q_rank) if first is None else first
    keep = torch.zeros(B, H, nqb, nkb + 1, dtype=torch.bool, device=blocks.device)
    keep.scatter_(3, torch.where(blocks >= 0, blocks.long(), nkb), True)
    kb = torch.where(k_rank >= 0, k_rank.long() // R.BLOCK, 0)
    m = torch.where(q_rank >= 0, q_rank.long() // R.BLOCK - first[:, None], 0).clamp(0, nqb - 1)  # [B, Lq]
    m0, m1 = int(m.min()), int(m.max()) + 1
    rows = keep[:, :, m0:m1].gather(3, kb[:, None, None, :].expand(B, H, m1 - m0, T))  # [B, H, nb, T]
    mask = (rows[0].index_select(1, m[0] - m0)[None] if B == 1
            else rows.gather(2, (m - m0)[:, None, :, None].expand(B, H, Lq, T)))
    return R._rank_mask(q_rank, k_rank, window) & mask


class PatternProbe:
    """Dense attention that also adds, per (layer, query head, candidate), the attention mass the
    candidate's index keeps for the queries past ``start`` (``mass``) and for the last ``LAST_Q``
    queries alone (``mass_last``: a sample's closing questions and answers, where it retrieves)."""

    def __init__(self, num_layers, num_heads, candidates, start, score_bytes=1 << 28):
        self.candidates, self.start, self.score_bytes = candidates, start, score_bytes
        self.mass = torch.zeros(num_layers, num_heads, len(candidates), dtype=torch.float64)
        self.mass_last = torch.zeros_like(self.mass)

    def resolved(self, name, a, b, length):
        if name == "block_sparse" and a < 0:  # a fraction of the key blocks
            return name, max(1, round(-a * ((length + R.BLOCK - 1) // R.BLOCK))), 0
        return name, int(a), int(b)

    def attention(self, module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=query.shape[1] != key.shape[1])
        B, H, L, _ = query.shape
        if L > self.start:
            mass, mass_last = self.score(query, key, scale, sliding_window)
            self.mass[module.layer_idx] += mass.cpu()
            self.mass_last[module.layer_idx] += mass_last.cpu()
        return out.transpose(1, 2), None

    @torch.no_grad()
    def score(self, q, k, scale, window):
        B, H, L, _ = q.shape
        Hkv = k.shape[1]
        rank = torch.arange(L, device=q.device, dtype=torch.int32)[None].expand(B, L)
        indices = []
        vertical = slash = None
        for name, a, b in (self.resolved(*c, L) for c in self.candidates):
            if name == "vertical_and_slash":
                if vertical is None:
                    vertical, slash = R.vs_scores(q, k, rank, rank, scale, window)
                sizes = [torch.full((H,), min(x, L), dtype=torch.long, device=q.device) for x in (a, b)]
                indices.append((name, R._top(vertical, sizes[0], rank.long()), R._top(slash, sizes[1], None)))
            elif name == "block_sparse":
                indices.append((name, R.block_index(q, k, rank, rank, a), None))
            else:
                indices.append((name, a, b))
        mass = torch.zeros(H, len(indices), dtype=torch.float64, device=q.device)
        mass_last = torch.zeros_like(mass)
        chunk = max(R.BLOCK, self.score_bytes // (B * H * L * 4 * 3) // R.BLOCK * R.BLOCK)
        first = R.first_query_block(rank)
        last_from = L - min(R.LAST_Q, L - self.start)  # the last queries (all scored ones if fewer)
        for s in range(self.start, L, chunk):
            e = min(L, s + chunk)
            qr = rank[:, s:e]
            scores = torch.matmul(R._grouped(q[:, :, s:e], Hkv), k.transpose(-1, -2)).float()
            scores = scores.view(B, H, e - s, L) * scale
            allowed = R._rank_mask(qr, rank, window)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            for c, (name, x, y) in enumerate(indices):
                if name == "vertical_and_slash":
                    keep = vs_block_mask(qr, rank, x, y, window)
                elif name == "block_sparse":
                    keep = block_rows_mask(qr, rank, x, window, first)
                else:
                    keep = rank_mask(qr, rank, x, y, window)
                kept = (probs * keep).sum(dim=-1, dtype=torch.float64)  # [B, H, rows]
                mass[:, c] += kept.sum(dim=(0, 2))
                mass_last[:, c] += kept[:, :, max(0, last_from - s):].sum(dim=(0, 2))
        return mass, mass_last


@torch.no_grad()
def search_patterns(model, tokenizer, length: int | None = None, samples: int = 1, candidates: str = CANDIDATES,
                    start: int | None = None, scale: bool = True, haystack=None, num_passkeys: int = 4,
                    passkey_words: int = 8, seed: int = 0, score: str = "all", min_recall: float = 0.0,
                    progress: bool = True) -> MInferenceConfig:
    """Search every query head's pattern on ``samples`` samples of ``length`` tokens (default: the
    reference's 30K, cut to the model's context) and return the config (model shape recorded).

    ``score``: what a candidate is ranked by: ``"all"`` (the reference's rule) the share of the
    attention mass its index keeps for the queries past ``start``; ``"question"`` the smaller of
    that and the share for the sample's last 64 queries (its closing questions and answers, whose
    attention reaches back to the needles). ``min_recall``: a head whose best candidate scores below
    this gets the ``dense`` pattern (0: always the best candidate)."""
    if not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"--min-recall is a share of the attention mass in [0, 1], got {min_recall}")
    if score not in ("all", "question"):
        raise ValueError(f"--score is 'all' or 'question', got {score!r}")
    shape = describe(model).shape
    context = getattr(model.config, "max_position_embeddings", None) or REFERENCE_LENGTH
    length = length or min(REFERENCE_LENGTH, context)
    if length > context:
        raise ValueError(f"--length {length} exceeds the model's max_position_embeddings ({context})")
    factor = min(1.0, length / REFERENCE_LENGTH) if scale else 1.0
    start = round(REFERENCE_START * factor) if start is None else start
    if not 0 <= start < length:
        raise ValueError(f"--start {start} must be below --length {length}")
    chosen = scaled(parse_candidates(candidates), factor)
    recipe = PasskeyRecipe(min_length=length, max_length=length, num_lengths=1, num_passkeys=num_passkeys,
                           passkey_words=passkey_words)
    data = PasskeyData(tokenizer, recipe, read_haystack(haystack), seed=seed)
    probe = PatternProbe(shape.num_layers, shape.num_heads, chosen, start)
    device = next(model.parameters()).device
    for index in tqdm(range(samples), disable=not progress, desc="minference pattern search"):
        with attention_override(model, probe):
            model.base_model(input_ids=data.sample(index).input_ids.to(device), use_cache=False)
    mass = probe.mass / (samples * (length - start))
    if score == "question":
        mass = torch.minimum(mass, probe.mass_last / (samples * min(R.LAST_Q, length - start)))
    best = mass.argmax(-1)
    scores = mass.max(-1).values.float()
    patterns = []
    for layer in range(shape.num_layers):
        row = {}
        for h in range(shape.num_heads):
            if scores[layer, h] < min_recall:
                row[h] = ("dense", 0, 0)
            else:
                row[h] = probe.resolved(*chosen[best[layer, h]], length)
        patterns.append(row)
    return MInferenceConfig(patterns=patterns, scores=scores, model_shape=shape)


def default_budget(length: int) -> tuple[int, int]:
    """The VS budget ``(vertical, slash)`` of a head without a calibrated pattern at ``length`` keys:
    the reference's (1000, 6096) for 128K tokens times ``length / 131072`` (rounded up), at least
    (30, 50), never above the reference's. This is ``MInferenceConfig``'s no-config rule (its
    ``scale_length``). Below 4K tokens it keeps only the 30 forced columns (no column is chosen
    from the input), which loses retrieval: see :func:`scaled_budget`."""
    f = min(1.0, length / 131072)
    return max(R.MIN_VERTICAL, math.ceil(1000 * f)), max(R.MIN_SLASH, math.ceil(6096 * f))


def scaled_budget(length: int, floor: int = 64, vertical: int = 1000, slash: int = 6096,
                  reference_length: int = 131072) -> tuple[int, int]:
    """A VS budget for ``length`` keys that scales only the part chosen from the input: the forced
    30 first columns and 100 nearest diagonals, plus the reference's remaining 970 columns and 5996
    diagonals times ``length / reference_length`` (rounded up), each at least ``floor`` (one 64-key
    tile), never above the reference's. At 128K it is the reference's (1000, 6096); at 8K (94, 475);
    at 2K (94, 194)."""
    f = min(1.0, length / reference_length)
    fc, fd = R.FORCED_COLUMNS, R.FORCED_DIAGONALS
    return (fc + max(floor, math.ceil((vertical - fc) * f)), fd + max(floor, math.ceil((slash - fd) * f)))


def budget_config(length: int, floor: int = 64, **options) -> MInferenceConfig:
    """Every head VS with :func:`scaled_budget` at ``length`` (``options``: other config fields)."""
    a, b = scaled_budget(length, floor)
    return MInferenceConfig(vertical_size=a, slash_size=b, scale_length=None, **options)


# ----------------------------------------------------------------------------------------------
# Attention recall of a config (how much of the true attention its index keeps)


def plan_index(plan, q, k, q_rank, k_rank, scale, window=None):
    """The VS and block-sparse indices of ``plan`` built from ``q``/``k`` as ``sparse_prefill`` builds
    them at run time: ``(vertical, slash, blocks)`` (None for a pattern the plan does not use)."""
    dev, Hq = q.device, q.shape[1]
    vertical = slash = blocks = None
    if plan.vs:
        sizes = [torch.ones(Hq, dtype=torch.long, device=dev) for _ in range(2)]
        for size, values in zip(sizes, plan.vs_sizes):
            size[torch.tensor(plan.vs, device=dev)] = torch.tensor(values, device=dev)
        vertical, slash = R.vs_index(q, k, q_rank, k_rank, scale, sizes[0], sizes[1], window,
                                     heads=torch.tensor(plan.vs, device=dev))
    if plan.block:
        blocks = R.block_index(q, k, q_rank, k_rank, torch.tensor(plan.block_sizes, device=dev),
                               heads=torch.tensor(plan.block, device=dev))
    return vertical, slash, blocks


def plan_mask(plan, num_heads, q_rank, k_rank, index, window=None, first=None):
    """Boolean ``[B, Hq, Lq, T]``: the keys each query head attends under ``plan`` and its ``index``
    (:func:`plan_index`) for the queries ``q_rank`` (a chunk of them; ``first``: the rank block of
    the first query of the whole prefill)."""
    vertical, slash, blocks = index
    B, T = k_rank.shape
    mask = torch.zeros(B, num_heads, q_rank.shape[1], T, dtype=torch.bool, device=k_rank.device)
    if plan.vs:
        mask[:, plan.vs] = vs_block_mask(q_rank, k_rank, vertical, slash, window)
    if plan.block:
        mask[:, plan.block] = block_rows_mask(q_rank, k_rank, blocks, window, first)
    for (sink, recent), heads in plan.a_shape.items():
        mask[:, heads] = rank_mask(q_rank, k_rank, sink, recent, window)
    return mask


class RecallProbe:
    """Dense attention (the model runs unpatched) that measures, per layer and query head, the share
    of each query's attention probability mass that ``config``'s index keeps (attention recall), the
    share of the causal query-key pairs the index keeps (density), and whether the method would run
    the layer dense instead (then both are 1). Queries are scored from rank ``start`` on; the last
    64 queries (the question, which builds the VS index) are also reported alone."""

    def __init__(self, config: MInferenceConfig, num_layers: int, num_heads: int, start: int = 0,
                 score_bytes: int = 1 << 28):
        self.config, self.start, self.score_bytes = config, start, score_bytes
        self.kept = torch.zeros(num_layers, num_heads, dtype=torch.float64)  # summed recall, queries >= start
        self.kept_last = torch.zeros(num_layers, num_heads, dtype=torch.float64)  # the last 64 queries
        self.pairs = torch.zeros(num_layers, num_heads, dtype=torch.float64)  # kept query-key pairs
        self.causal = torch.zeros(num_layers, dtype=torch.float64)  # causal pairs (per head)
        self.queries = torch.zeros(num_layers, dtype=torch.float64)
        self.dense = [False] * num_layers

    def attention(self, module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=query.shape[1] != key.shape[1])
        self.score(module.layer_idx, query, key, scale, sliding_window)
        return out.transpose(1, 2), None

    @torch.no_grad()
    def score(self, layer, q, k, scale, window):
        B, H, L, _ = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        c = self.config
        plan = plan_heads(c, layer, list(range(H)), T)
        start, last = min(self.start, L - 1), max(0, L - R.LAST_Q)
        n_scored, n_last = B * (L - start), B * (L - last)
        self.queries[layer] += n_scored
        if T < c.min_length or L < c.min_queries or plan.kept > c.max_density * T / 2:
            self.dense[layer] = True  # what ``MInference.full_prefill`` does: every key, recall 1
            self.kept[layer] += n_scored
            self.kept_last[layer] += n_last
            self.causal[layer] += B * ((L - start) * (L + start + 1) / 2)
            self.pairs[layer] += B * ((L - start) * (L + start + 1) / 2)
            return
        rank = torch.arange(L, device=q.device, dtype=torch.int32)[None].expand(B, L)
        index = plan_index(plan, q, k, rank, rank, scale, window)
        first = R.first_query_block(rank)
        chunk = max(R.BLOCK, self.score_bytes // (B * H * T * 4 * 3) // R.BLOCK * R.BLOCK)
        for s in range(start, L, chunk):
            e = min(L, s + chunk)
            qr = rank[:, s:e]
            scores = torch.matmul(R._grouped(q[:, :, s:e], Hkv), k.transpose(-1, -2)).float()
            allowed = R._rank_mask(qr, rank, window)
            probs = (scores.view(B, H, e - s, T) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
            keep = plan_mask(plan, H, qr, rank, index, window, first) & allowed
            kept = (probs * keep).sum(-1, dtype=torch.float64)  # [B, H, e - s]
            self.kept[layer] += kept.sum((0, 2)).cpu()
            if e > last:
                self.kept_last[layer] += kept[:, :, max(0, last - s):].sum((0, 2)).cpu()
            self.pairs[layer] += keep.sum((0, 2, 3), dtype=torch.float64).cpu()
            self.causal[layer] += allowed.sum(dtype=torch.float64).cpu()

    def result(self, samples: int) -> dict:
        """Per layer and head (lists): ``recall`` (queries from ``start``), ``recall_last`` (last 64
        queries), ``density`` (kept / causal query-key pairs), ``dense`` (layers run dense)."""
        recall = self.kept / self.queries[:, None].clamp(min=1)
        recall_last = self.kept_last / (samples * R.LAST_Q)
        density = self.pairs / self.causal[:, None].clamp(min=1)
        return {
            "recall": recall.mean().item(),
            "recall_last": recall_last.mean().item(),
            "density": density.mean().item(),
            "recall_per_layer": recall.mean(-1).tolist(),
            "recall_last_per_layer": recall_last.mean(-1).tolist(),
            "density_per_layer": density.mean(-1).tolist(),
            "recall_per_head": recall.tolist(),
            "min_head_recall": recall.min().item(),
            "dense_layers": [i for i, d in enumerate(self.dense) if d],
        }


@torch.no_grad()
def attention_recall(model, inputs, config: MInferenceConfig, start: int | float = 1 / 12) -> dict:
    """Attention recall of ``config`` on an unpatched ``model`` over the token sequences ``inputs``
    (each ``[1, T]`` ids, T >= 64): see :class:`RecallProbe`. ``start``: first scored query, a rank
    or a fraction of T (default 1/12, as the search's 2500 of 30000)."""
    shape = describe(model).shape
    device = next(model.parameters()).device
    probe = RecallProbe(config, shape.num_layers, shape.num_heads)
    for ids in inputs:
        T = ids.shape[-1]
        probe.start = round(start * T) if isinstance(start, float) else int(start)
        with attention_override(model, probe):
            model.base_model(input_ids=ids.to(device), use_cache=False)
    return probe.result(len(inputs))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kvpress-calibrate minference`` options."""
    parser.add_argument("--model", required=True, help="local model folder (transformers format)")
    parser.add_argument("--out", required=True, help="config file to write (safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer folder, if not the model's")
    parser.add_argument("--reference-json", help="also write the reference's JSON format here")
    parser.add_argument("--length", type=int, default=None,
                        help=f"tokens per sample (default {REFERENCE_LENGTH}, cut to the model's context)")
    parser.add_argument("--samples", type=int, default=1, help="calibration samples (default 1)")
    parser.add_argument("--candidates", default=CANDIDATES, help=f"candidate patterns (default {CANDIDATES})")
    parser.add_argument("--start", type=int, default=None,
                        help=f"score queries past this position (default {REFERENCE_START}, scaled like the budgets)")
    parser.add_argument("--no-scale", action="store_true",
                        help="keep the candidates' budgets and the start position unscaled for short samples")
    parser.add_argument("--haystack", nargs="*", help="haystack text files (.txt or .gz); default: the bundled corpus")
    parser.add_argument("--num-passkeys", type=int, default=4, help="passkeys hidden in each sample (default 4)")
    parser.add_argument("--passkey-words", type=int, default=8, help="words per passkey (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", default="all", choices=["all", "question"],
                        help="rank candidates by the attention mass kept for every query past --start ('all', the "
                             "reference's rule) or by the smaller of that and the mass kept for the sample's last 64 "
                             "queries ('question': its closing questions, which retrieve)")
    parser.add_argument("--min-recall", type=float, default=0.0,
                        help="heads whose best candidate keeps less of their attention mass than this stay dense "
                             "(default 0: the reference's rule; 'dense' entries are not the reference's format)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from .cli import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype, args.tokenizer)
        started = time.perf_counter()
        config = search_patterns(model, tokenizer, length=args.length, samples=args.samples,
                                 candidates=args.candidates, start=args.start, scale=not args.no_scale,
                                 haystack=args.haystack, num_passkeys=args.num_passkeys,
                                 passkey_words=args.passkey_words, seed=args.seed, score=args.score,
                                 min_recall=args.min_recall,
                                 progress=not args.no_progress)
        config.save(args.out)
        if args.reference_json:
            config.save_reference_json(args.reference_json)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvpress-calibrate: error: {error}", file=sys.stderr)
        return 2
    counts = {}
    for layer in config.patterns:
        for name, a, b in layer.values():
            counts[(name, a, b)] = counts.get((name, a, b), 0) + 1
    summary = ", ".join(f"{name}({a}, {b}): {n}" for (name, a, b), n in sorted(counts.items(), key=lambda x: -x[1]))
    print(f"wrote {args.out}: {summary}; mean recovered mass {config.scores.mean():.3f} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvpress-calibrate minference", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
