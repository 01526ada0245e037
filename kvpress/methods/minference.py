"""MInference 1.0 (Jiang et al., 2024, arXiv 2407.02490): dynamic sparse prefill.

Every query head has one pattern, chosen offline (``kvpress-calibrate minference``): A-shape
(``n_init`` sinks + ``n_local`` recent tokens), vertical-slash (VS: ``vertical_size`` key columns +
``slash_size`` diagonals) or block-sparse (``top_k`` 64-token key blocks per 64-token query block).
At prefill the exact index of each VS and block-sparse head is built from the input itself (the
last 64 queries for VS, mean-pooled blocks for block-sparse), for all heads at once and without
repeating K/V per query head, then attention runs under it (``kvpress.kernels.minference``). Decode
is dense, and prefill stays dense where sparse would not pay (short inputs, or budgets close to the
whole context). Later chunks of a chunked prefill build their indices against every previous key.

``kvpress.patch(model, "minference")`` keeps the dense cache and replaces its prefill;
``kvpress.patch(model, "minference+duo", config={...})``: DuoAttention's cache and decode, its
streaming heads with the A-shape kernel, its retrieval heads' prefill sparse by this method.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch

from .. import kernels
from ..adapters import ModelShape
from ..cache import HeadGroup
from ..configfile import atomic_write, load_config_file, save_config_file
from ..kernels import minference_reference as R
from ..kernels.reference import rank_mask
from .base import GroupedMethod, HeadAxis

try:
    from ..kernels import minference as triton_kernels
    from ..kernels.prefill import prefill_attention
except ImportError:  # no usable triton: the torch references serve everything
    triton_kernels = prefill_attention = None

CONFIG_FILE_NAME = "kvpress-minference.safetensors"
# the reference's names, in code order, and "dense": a head whose every candidate lost too much
# attention at calibration (``kvpress-calibrate minference --min-recall``) keeps causal attention
PATTERNS = ("vertical_and_slash", "stream_llm", "block_sparse", "dense")
VS, A_SHAPE, BLOCK_SPARSE, DENSE = 0, 1, 2, 3
DEFAULT = ("vertical_and_slash", 1000, 6096)  # the reference's pattern of a head without an entry
WORK_CHECK_KEYS = 65536  # from this many keys, MInferenceConfig.max_work is checked once the index is built


@dataclass
class MInferenceConfig:
    """Per query head sparse prefill patterns and when to use them.

    Args:
        patterns: one dict per layer mapping a query-head index to ``(pattern, a, b)`` with pattern
            ``"vertical_and_slash"`` (``a`` = vertical columns, ``b`` = slash diagonals; at least 30
            and 50), ``"stream_llm"`` (A-shape: ``a`` = sink tokens, ``b`` = recent tokens) or
            ``"block_sparse"`` (``a`` = key blocks of 64 tokens kept per query block; 100 if <= 0) or
            ``"dense"`` (causal attention; ``a``, ``b`` unused: 0). Heads without an entry get VS
            (1000, 6096), as in the reference. ``None``: no calibrated
            patterns; every head gets VS (``vertical_size``, ``slash_size``) scaled down for short
            inputs by ``min(1, T / scale_length)`` (T = keys seen, minimums 30 and 50).
        scores: ``[num_layers, num_heads]`` attention mass each head's pattern recovered at
            calibration (informational), or None.
        vertical_size, slash_size: the VS budget (tokens) of heads without calibrated patterns.
        scale_length: keys at which the no-config budget reaches its full size (None: never scaled).
        min_length: prefills with fewer keys than this are dense. 131072: the measured crossover of
            ``benchmarks/bench_minference.py`` on an H200 for heads without a calibrated pattern (one
            Llama-3-8B-shaped layer, index included, VS (1000, 6096) on every head: 0.35x dense at
            32K, 0.65x at 64K, 1.19x at 128K; the reference's published Llama-3-8B mix: 0.49x, 1.00x,
            1.93x; ``benchmarks/results/minference_layer_1m_NVIDIA_H200.json``).
        min_queries: forwards with fewer new tokens than this are dense.
        index_queries: forwards with fewer new tokens than this over at least ``8 * index_queries``
            keys are dense (a chunk appended to a long cache): building the VS index reads the last
            64 queries' fp32 scores against every key several times, which costs about as much as
            1.1K-1.7K queries of dense attention over the same keys (H200, 32 heads: 6.6 ms at 128K,
            22 ms at 512K, 40 ms at 1M; ``benchmarks/results/minference_layer_1m_NVIDIA_H200.json``).
        max_density: a layer prefills dense when its heads' estimated kept keys per query average
            more than this fraction of the keys a query sees on average (``T / 2``; above 1: never).
        max_work: a layer over at least ``WORK_CHECK_KEYS`` (65536) keys prefills dense when, once its
            VS index is built, the VS kernel would run more than this fraction of dense causal
            attention's work (64x64 tiles; the chosen diagonals are 64-key ranges per query block, so
            scattered ones cost far more than their count). 0.45 was set when the VS kernel ran at
            about half of dense SDPA's FLOP/s per tile on the H200 (sparse paid below ~0.5); its
            per-tile speed has grown since and the threshold was not re-measured (a conservative
            setting: layers near it prefill dense). None: never checked.
        union_heads: query heads per program of the VS kernel. 1: one program per query head (each
            head walks its own index); 2 or 4: the heads of a KV head in units of that many, each
            unit walking the union of its heads' indices with every head masked to its own (K/V
            read once per unit, taller tiles, but every head pays the union's keys;
            ``kernels.minference.vs_union_attention``). Same result either way; 1 is faster in
            every case measured on the H200 (``kvpress/kernels/minference.py`` docstring).
        model_shape: the model the patterns were calibrated for; checked at patch time when set.
    """

    patterns: list[dict[int, tuple[str, int, int]]] | None = None
    scores: torch.Tensor | None = None
    vertical_size: int = 1000
    slash_size: int = 6096
    scale_length: int | None = 131072
    min_length: int = 131072
    min_queries: int = 64
    index_queries: int = 4096
    max_density: float = 0.5
    max_work: float | None = 0.45
    union_heads: int = 1
    model_shape: ModelShape | None = None

    # what a tensor-parallel rank keeps: its query heads' entries (kvpress.methods.base.select_heads)
    head_axes: ClassVar[dict] = {"patterns": HeadAxis("query", keyed=True), "scores": HeadAxis("query", dim=1)}

    def __post_init__(self):
        if self.patterns is not None:
            self.patterns = [{int(h): _pattern(p, layer, h) for h, p in layer_patterns.items()}
                             for layer, layer_patterns in enumerate(self.patterns)]
        if self.scores is not None:
            self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.vertical_size < 1 or self.slash_size < 1:
            raise ValueError(f"MInferenceConfig budgets must be >= 1 token, got vertical_size={self.vertical_size}, "
                             f"slash_size={self.slash_size}")
        if self.min_length < 0 or self.min_queries < 0 or self.index_queries < 0 or not self.max_density > 0.0:
            raise ValueError(f"MInferenceConfig needs min_length >= 0, min_queries >= 0 and max_density > 0, got "
                             f"min_length={self.min_length}, min_queries={self.min_queries}, index_queries="
                             f"{self.index_queries}, max_density={self.max_density}")
        if self.max_work is not None and not self.max_work > 0.0:
            raise ValueError(f"MInferenceConfig.max_work must be > 0 (a fraction of dense work) or None, got {self.max_work}")
        if self.union_heads not in (1, 2, 4):
            raise ValueError(f"MInferenceConfig.union_heads is 1, 2 or 4 (query heads per VS program), got {self.union_heads}")
        if self.scale_length is not None and self.scale_length < 1:
            raise ValueError(f"MInferenceConfig.scale_length must be >= 1 or None, got {self.scale_length}")

    def head_pattern(self, layer: int, head: int, length: int) -> tuple[int, int, int]:
        """``(kind, a, b)`` of one query head for an input of ``length`` keys (kind: VS, A_SHAPE, BLOCK_SPARSE, DENSE)."""
        if self.patterns is None:
            f = 1.0 if self.scale_length is None else min(1.0, length / self.scale_length)
            return VS, max(R.MIN_VERTICAL, math.ceil(self.vertical_size * f)), max(R.MIN_SLASH, math.ceil(self.slash_size * f))
        name, a, b = self.patterns[layer].get(head, DEFAULT)
        return PATTERNS.index(name), a, b

    # -- files ----------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the project's config file (safetensors: ``patterns [L, H, 3]`` int32 (kind, a, b;
        kind -1 = no entry) and ``scores``; JSON metadata with the other fields and the model's shape)."""
        tensors = {}
        if self.patterns is not None:
            heads = max([h + 1 for layer in self.patterns for h in layer] + [self.model_shape.num_heads if self.model_shape else 0])
            table = torch.full((len(self.patterns), heads, 3), -1, dtype=torch.int32)
            for layer, entries in enumerate(self.patterns):
                for h, (name, a, b) in entries.items():
                    table[layer, h] = torch.tensor([PATTERNS.index(name), a, b])
            tensors["patterns"] = table
        if self.scores is not None:
            tensors["scores"] = self.scores
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("patterns", "scores", "model_shape")}
        return save_config_file(path, "minference", tensors, fields, self.model_shape)

    @classmethod
    def load(cls, path, **options) -> MInferenceConfig:
        """Read the project's file (:meth:`save`) or the reference's JSON (:meth:`from_reference_json`)."""
        if Path(path).suffix == ".json":
            return dataclasses.replace(cls.from_reference_json(path), **options)
        tensors, fields, shape = load_config_file(path, "minference")
        patterns = None
        if "patterns" in tensors:
            patterns = [{h: (PATTERNS[kind], a, b) for h, (kind, a, b) in enumerate(layer.tolist()) if kind >= 0}
                        for layer in tensors["patterns"]]
        return dataclasses.replace(cls(patterns=patterns, scores=tensors.get("scores"), model_shape=shape, **fields),
                                   **options)

    @classmethod
    def from_reference_json(cls, path) -> MInferenceConfig:
        """The reference's config: a JSON list with one entry per layer mapping the query-head index (a
        string) to ``[pattern_name, vertical_or_n_init, slash_or_n_local, score]``. It holds no model
        shape, so only its layer count is checked against the model."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the MInference config {path}: {error}") from None
        if not isinstance(data, list) or not all(isinstance(layer, dict) for layer in data):
            raise ValueError(f"{path}: an MInference config is a JSON list with one object per layer "
                             '({"<query head>": [pattern, a, b, score]})')
        patterns = [{int(h): tuple(entry[:3]) for h, entry in layer.items()} for layer in data]
        heads = max([int(h) + 1 for layer in data for h in layer] or [0])
        scores = torch.tensor([[float(layer.get(str(h), [0, 0, 0, 0.0])[3]) if len(layer.get(str(h), [])) > 3 else 0.0
                                for h in range(heads)] for layer in data])
        return cls(patterns=patterns, scores=scores)

    def save_reference_json(self, path) -> Path:
        """Write the reference's JSON format (every head of ``patterns``; scores 0 where unknown)."""
        if self.patterns is None:
            raise ValueError("this MInferenceConfig has no per-head patterns to write")
        data = []
        for layer, entries in enumerate(self.patterns):
            row = {}
            for h, (name, a, b) in sorted(entries.items()):
                score = float(self.scores[layer, h]) if self.scores is not None and h < self.scores.shape[1] else 0.0
                row[str(h)] = [name, a, b, score]
            data.append(row)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))


def _pattern(p, layer, head) -> tuple[str, int, int]:
    if len(p) < 3 or p[0] not in PATTERNS or not all(isinstance(x, (int, float)) for x in p[1:3]):
        raise ValueError(f"MInference pattern of layer {layer}, head {head} is {p!r}; expected "
                         f"(name, a, b) with name one of {', '.join(PATTERNS)} and integer sizes")
    return str(p[0]), int(p[1]), int(p[2])


# ----------------------------------------------------------------------------------------------
# Sparse prefill of one layer


class HeadPlan(NamedTuple):
    """The patterns of the query heads of one ``full_prefill`` call (local head indices)."""

    vs: list[int]
    vs_sizes: tuple[list[int], list[int]]  # vertical, slash per VS head
    block: list[int]
    block_sizes: list[int]
    a_shape: dict[tuple[int, int | None], list[int]]  # (sink, recent) -> heads; (0, None): dense heads
    kept: float  # estimated kept keys per query, averaged over the heads


def plan_heads(config: MInferenceConfig, layer: int, q_heads: list[int], length: int) -> HeadPlan:
    vs, vs_v, vs_s, block, block_k, a_shape, kept = [], [], [], [], [], {}, 0.0
    for j, h in enumerate(q_heads):
        kind, a, b = config.head_pattern(layer, h, length)
        if kind == VS:
            a, b = max(a, R.MIN_VERTICAL), max(b, R.MIN_SLASH)
            vs.append(j), vs_v.append(a), vs_s.append(b)
            kept += a + b
        elif kind == BLOCK_SPARSE:
            a = a if a > 0 else 100
            block.append(j), block_k.append(a)
            kept += a * R.BLOCK
        elif kind == DENSE:  # the rank-mask kernel with no window: causal attention
            a_shape.setdefault((0, None), []).append(j)
            kept += length / 2
        else:
            a_shape.setdefault((a, b), []).append(j)
            kept += a + b
    return HeadPlan(vs, (vs_v, vs_s), block, block_k, a_shape, kept / max(1, len(q_heads)))


def sparse_prefill(plan: HeadPlan, q, k, v, q_rank, k_rank, scale, window=None, use_triton=None,
                   union_heads: int = 1, max_work: float | None = None) -> torch.Tensor | None:
    """Attention of ``q [B, Hq, Lq, D]`` over ``k``/``v [B, Hkv, T, D]`` (keys in rank order, padding
    on the left) with each query head under its pattern of ``plan``. ``use_triton``: default = on CUDA;
    ``union_heads``, ``max_work``: see :class:`MInferenceConfig` (None is returned, before any
    attention runs, when the VS heads' work exceeds ``max_work`` of dense: the caller runs dense)."""
    use_triton = q.is_cuda and triton_kernels is not None if use_triton is None else use_triton
    dev, Hq, G = q.device, q.shape[1], q.shape[1] // k.shape[1]
    vertical = slash = blocks = None
    if plan.vs:
        vs_heads = torch.tensor(plan.vs, device=dev)
        sizes = [torch.ones(Hq, dtype=torch.long, device=dev) for _ in range(2)]
        for size, values in zip(sizes, plan.vs_sizes):
            size[vs_heads] = torch.tensor(values, device=dev)
        vertical, slash = R.vs_index(q, k, q_rank, k_rank, scale, sizes[0], sizes[1], window, heads=vs_heads)
    if plan.block:
        bs_heads = torch.tensor(plan.block, device=dev)
        blocks = R.block_index(q, k, q_rank, k_rank, torch.tensor(plan.block_sizes, device=dev), heads=bs_heads)
    per_head = None
    if plan.vs and max_work is not None and k.shape[2] >= WORK_CHECK_KEYS and triton_kernels is not None:
        per_head = triton_kernels.vs_prepare(q_rank, k_rank, vertical, slash)
        Lq, T = q.shape[2], k.shape[2]
        dense_tiles = q.shape[0] * len(plan.vs) * (Lq * T - Lq * (Lq - 1) / 2) / R.BLOCK**2  # causal (query, key) pairs
        if float(triton_kernels.tiles_run(per_head)) > max_work * dense_tiles:  # one host sync
            return None
    if not use_triton:
        return _reference_prefill(plan, q, k, v, q_rank, k_rank, scale, window, vertical, slash, blocks)
    out = torch.zeros_like(q)  # the kernels write real query rows only: padding rows stay 0 (not garbage)
    for (sink, recent), heads in plan.a_shape.items():
        # KV heads whose every query head is here: one program serves the group, written in place;
        # the other heads alone, each beside its own KV head (G times fewer tiles than their groups)
        whole = sorted(h for h in {x // G for x in heads} if all(h * G + g in heads for g in range(G)))
        alone = [x for x in heads if x // G not in whole]
        if whole:
            kv = torch.tensor(whole, device=dev)
            prefill_attention(q, k.index_select(1, kv), v.index_select(1, kv), q_rank, k_rank, scale, sink, recent,
                              window, heads=kv, group=G, out=out)
        if alone:
            idx = torch.tensor(alone, device=dev)
            kv = idx // G
            part = prefill_attention(q.index_select(1, idx), k.index_select(1, kv), v.index_select(1, kv), q_rank,
                                     k_rank, scale, sink, recent, window)
            out.index_copy_(1, idx, part)
    if plan.vs and union_heads > 1:
        triton_kernels.vs_union_attention(q, k, v, q_rank, k_rank, vertical, slash, scale, window, heads=vs_heads,
                                          out=out, per=union_heads)
    elif plan.vs:
        triton_kernels.vs_attention(q, k, v, q_rank, k_rank, vertical, slash, scale, window, heads=vs_heads,
                                    out=out, plan=per_head)
    if plan.block:
        triton_kernels.block_sparse_attention(q, k, v, q_rank, k_rank, blocks, scale, window, heads=bs_heads, out=out)
    return out


def _reference_prefill(plan, q, k, v, q_rank, k_rank, scale, window, vertical, slash, blocks, query_chunk=256):
    """The torch path: dense attention under the union of every head's mask, ``query_chunk`` queries at a time."""
    B, Hq, Lq, _ = q.shape
    T = k.shape[2]
    out = torch.empty_like(q)
    first = R.first_query_block(q_rank)
    for s in range(0, Lq, query_chunk):
        e = min(Lq, s + query_chunk)
        qr = q_rank[:, s:e]
        mask = torch.zeros(B, Hq, e - s, T, dtype=torch.bool, device=q.device)
        if plan.vs:
            mask[:, plan.vs] = R.vs_mask(qr, k_rank, vertical, slash, window)
        if plan.block:
            mask[:, plan.block] = R.block_mask(qr, k_rank, blocks, window, first)
        for (sink, recent), heads in plan.a_shape.items():
            mask[:, heads] = rank_mask(qr, k_rank, sink, recent, window)
        out[:, :, s:e] = R.masked_attention(q[:, :, s:e], k, v, mask, scale)
    return out


def keys_in_rank_order(q_rank: torch.Tensor, k_rank: torch.Tensor) -> bool:
    """Whether the real queries and keys of every row are contiguous, last, and ranked 0, 1, ... in
    order (left padding), what the sparse kernels assume (one host sync)."""
    ok = torch.ones((), dtype=torch.bool, device=k_rank.device)
    for rank in (q_rank, k_rank):
        n = torch.arange(rank.shape[1], device=rank.device)
        expected = n - (rank.shape[1] - 1) + rank[:, -1:].long()
        ok &= (rank.long() == torch.where(expected >= 0, expected, -1)).all() | (rank[:, -1:] < 0).all()
    return bool(ok)


# ----------------------------------------------------------------------------------------------
# The method


class MInference(GroupedMethod):
    """MInference's sparse prefill over the dense cache (every KV head keeps every token); decode dense.

    As the first method of a composition (``"minference+duo"``) it serves the other method's groups
    that keep every token through :meth:`full_prefill`."""

    name = "minference"
    config_class = MInferenceConfig
    config_file_name = CONFIG_FILE_NAME
    prefill_only = True

    def check_config(self, config: MInferenceConfig) -> None:
        shape = self.info.local_shape  # this process's heads (a tensor-parallel rank's share)
        if config.patterns is not None and len(config.patterns) != shape.num_layers:
            raise ValueError(f"this MInferenceConfig has patterns for {len(config.patterns)} layers, the model has "
                             f"{shape.num_layers}; load the config made for this model or calibrate one with "
                             "`kvpress-calibrate minference --model MODEL --out FILE`")
        if config.patterns is not None:
            bad = [h for layer in config.patterns for h in layer if h >= shape.num_heads]
            if bad:
                raise ValueError(f"this MInferenceConfig names query head {max(bad)}, the model has {shape.num_heads} "
                                 "query heads; load the config made for this model")

    def full_prefill(self, layer_idx, q, k, v, q_rank, k_rank, q_heads: list[int], scale, window) -> torch.Tensor:
        """Causal attention of ``q [B, nq, Lq, D]`` (global query heads ``q_heads``) over the keys ``k``/``v
        [B, nkv, T, D]`` of a group that keeps every token, sparse per head where it pays, else dense."""
        T = k.shape[2]
        plan = plan_heads(self.config, layer_idx, q_heads, T)
        Lq, c = q.shape[2], self.config
        dense = (T < c.min_length or Lq < c.min_queries or (Lq < c.index_queries and T >= 8 * c.index_queries)
                 or plan.kept > c.max_density * T / 2 or not keys_in_rank_order(q_rank, k_rank))
        out = None
        if not dense:  # None when the index would run more than max_work of dense attention's work
            out = sparse_prefill(plan, q, k, v, q_rank, k_rank, scale, window, use_triton=kernels.use_triton(q),
                                 union_heads=c.union_heads, max_work=c.max_work)
        if out is None:
            group = HeadGroup(torch.arange(k.shape[1], device=q.device), k, v, k_rank)
            return kernels.grouped_attention(q, [group], q_rank, scale, window)
        return out
