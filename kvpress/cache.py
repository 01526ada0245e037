"""Cache layers: what each method really stores, plus the per-row token bookkeeping they share.

A kvpress cache is a plain transformers ``Cache`` whose layers are :class:`KVPressLayer`
subclasses, one per model layer. All layers of one cache share a :class:`TokenLedger`, which knows,
for every batch row, which tokens are real (not padding) and their *ranks* (index among the real
tokens; see ``kvpress.kernels.reference``). The ledger is told about each forward's new tokens by a
hook on the model (``TokenLedger.begin`` / ``end``); a layer's ``update`` then stores what its method
keeps and returns whatever its attention function needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def window_slack(sink: int, recent: int) -> int:
    """Slots a sink + recent window buffer may fill past the window before it is compacted."""
    return max(16, (sink + recent) // 4)


class AppendBuffer:
    """A tensor that grows along ``dim`` with amortised O(1) appends.

    Entries are appended (:meth:`append`) or reserved to be written by the caller (:meth:`reserve`).
    The first allocation is exactly the size of the first entries (a first append adopts its
    tensor: no copy); later ones grow the capacity by at least 1/16 (and 64 slots), so decoding
    copies the buffer rarely and over-allocates by at most ~6%. ``tensor`` is the filled part (a view).
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.storage: torch.Tensor | None = None
        self.length = 0

    @property
    def tensor(self) -> torch.Tensor | None:
        return None if self.storage is None else self.storage.narrow(self.dim, 0, self.length)

    def reserve(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Make room for ``x`` (only its entries ``heads`` along dim 1, when given) without writing
        it; returns the filled part, whose last ``x.shape[dim]`` entries are the new, unwritten slots."""
        n = x.shape[self.dim]
        needed = self.length + n
        if self.storage is None:
            shape = list(x.shape)
            if heads is not None:
                shape[1] = len(heads)
            self.storage = x.new_empty(shape)
        elif needed > self.storage.shape[self.dim]:
            shape = list(self.storage.shape)
            shape[self.dim] = max(needed, shape[self.dim] + max(shape[self.dim] // 16, 64))
            grown = self.storage.new_empty(shape)
            grown.narrow(self.dim, 0, self.length).copy_(self.tensor)
            self.storage = grown
        self.length = needed
        return self.tensor

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append ``x``; returns the filled part."""
        n = x.shape[self.dim]
        if self.storage is None:  # adopt the first tensor: no copy
            self.storage, self.length = x.contiguous(), n
            return self.storage
        filled = self.reserve(x)
        filled.narrow(self.dim, self.length - n, n).copy_(x)
        return filled

    def replace(self, x: torch.Tensor, room: int = 0) -> None:
        """Hold ``x`` from now on, with room for ``room`` more entries."""
        length = x.shape[self.dim]
        if room:
            size = list(x.shape)
            size[self.dim] += room
            storage = x.new_empty(size)
            storage.narrow(self.dim, 0, length).copy_(x)
            x = storage
        self.storage, self.length = x, length

    def keep(self, index: torch.Tensor, room: int = 0) -> None:
        """Keep, in each batch row, only the entries at ``index [B, W]`` along ``dim``, in that order
        (with room for ``room`` more)."""
        filled = self.tensor
        view = [1] * filled.dim()
        view[0], view[self.dim] = index.shape
        size = list(filled.shape)
        size[self.dim] = index.shape[1]
        self.replace(filled.gather(self.dim, index.view(view).expand(size)), room)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.storage is not None:
            self.replace(self.tensor.index_select(0, index.to(self.storage.device)))


@dataclass
class ForwardTokens:
    """What the ledger knows about the tokens of the forward in progress."""

    new_rank: torch.Tensor  # [B, n] int32 ranks of the new tokens (-1 = padding); also the query ranks
    all_rank: torch.Tensor  # [B, T + n] int32 ranks of every token seen, new ones included
    window_rank: torch.Tensor | None = None  # [B, C + n] ranks of (window buffer ++ new tokens)


class TokenLedger:
    """Per-row token bookkeeping shared by all layers of one cache.

    ``window=(sink, recent)`` also tracks a sink + recent window (StreamingLLM-style) for layers that
    keep only the ``sink`` first and ``recent`` last real tokens of each row (sinks are the first
    *real* tokens of a row, never padding). Such a window buffer is appended to like the full cache
    (tokens that left the window stay, masked by their ranks) and compacted to the window once it
    has ``slack`` (default :func:`window_slack`) slots more than the window: after the forward that
    fills it, ``compaction`` holds the positions each layer keeps (``KVPressLayer.after_forward``),
    with room for ``slack`` more. Decode thus costs one in-place append per buffer and layer, and a
    gather every ``slack`` steps.
    """

    def __init__(self, window: tuple[int, int] | None = None, slack: int | None = None):
        if slack is None and window is not None:
            slack = window_slack(*window)
        self.window = window
        self.slack = slack
        self.seen = 0  # tokens seen per row, padding included (what transformers calls the cache length)
        self.rank = AppendBuffer(dim=1)  # [B, T] int32
        self.num_real: torch.Tensor | None = None  # [B] int32
        self.window_rank = AppendBuffer(dim=1)  # [B, C] int32 ranks in the window buffer, -1 = empty slot
        self.compaction: torch.Tensor | None = None  # [B, W] positions kept by the last forward's compaction
        self.step: ForwardTokens | None = None
        self.recovering = False  # this forward follows one that failed half-way (see ``begin``)

    @property
    def batch_size(self) -> int | None:
        return None if self.num_real is None else self.num_real.shape[0]

    def begin(self, attention_mask: torch.Tensor | None, batch_size: int, num_new: int, device) -> None:
        """Register the ``num_new`` tokens of a forward; ``attention_mask`` is the usual 2D padding mask."""
        self.recovering = self.step is not None
        if self.recovering:  # the previous forward failed half-way: forget its tokens (layers: ``committed``)
            self.rank.truncate(self.seen)
            if self.window is not None:
                self.window_rank.truncate(self.window_rank.length - self.step.new_rank.shape[1])
        if self.num_real is None:
            self.num_real = torch.zeros(batch_size, dtype=torch.int32, device=device)
        elif batch_size != self.batch_size:
            raise ValueError(
                f"this cache holds {self.batch_size} sequences but the input has {batch_size}; "
                "start a new cache (pass past_key_values=None) for a new batch"
            )
        self.compaction = None
        valid = _new_token_mask(attention_mask, batch_size, num_new, device)
        count = valid.cumsum(dim=1, dtype=torch.int32)
        new_rank = torch.where(valid, self.num_real[:, None] + count - 1, -1).to(torch.int32)
        self.step = ForwardTokens(new_rank=new_rank, all_rank=self.rank.append(new_rank))
        if self.window is not None:
            self.step.window_rank = self.window_rank.append(new_rank)

    def end(self) -> None:
        """Commit the forward registered by :meth:`begin` (and compact the window when it is full)."""
        step = self.step
        self.seen += step.new_rank.shape[1]
        self.num_real = self.num_real + (step.new_rank >= 0).sum(dim=1, dtype=torch.int32)
        if self.window is not None and self.window_rank.length >= sum(self.window) + self.slack:
            sink, recent = self.window
            ranks = self.window_rank.tensor
            keep = (ranks >= 0) & ((ranks < sink) | (ranks >= self.num_real[:, None] - recent))
            self.compaction = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : sink + recent]
            kept = torch.where(keep.gather(1, self.compaction), ranks.gather(1, self.compaction), -1)
            self.window_rank.replace(kept, room=self.slack)
        self.step = None

    def committed(self) -> tuple[int, int]:
        """Tokens per row of every committed forward: in the full cache, and in the window buffer."""
        n = self.step.new_rank.shape[1]
        return self.seen, (self.window_rank.length - n if self.window is not None else 0)

    def current(self) -> ForwardTokens:
        if self.step is None:
            raise RuntimeError(
                "kvpress cache used outside a patched model forward: call the patched model itself "
                "(model(...) or model.generate(...)), not its layers"
            )
        return self.step

    def select_batch(self, index: torch.Tensor) -> None:
        self.rank.select_batch(index)
        self.window_rank.select_batch(index)
        if self.num_real is not None:
            self.num_real = self.num_real.index_select(0, index.to(self.num_real.device))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.rank.storage, self.num_real, self.window_rank.storage) if t is not None]


def _new_token_mask(attention_mask, batch_size: int, num_new: int, device) -> torch.Tensor:
    """Which of the new tokens are real, as ``[B, num_new]`` bools, from a 2D padding mask."""
    if attention_mask is None:
        return torch.ones(batch_size, num_new, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(
            "kvpress needs the usual 2D padding mask of shape [batch, tokens] (1 = real token, 0 = padding) "
            f"or none; got {type(attention_mask).__name__} of shape {getattr(attention_mask, 'shape', None)}. "
            "Custom 4D masks are not supported by patched models."
        )
    if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < num_new:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, but the input has {batch_size} rows of "
            f"{num_new} new tokens; it must cover at least the new tokens (usually: all tokens so far)"
        )
    return attention_mask[:, -num_new:].to(device=device, dtype=torch.bool)


class KVPressLayer(CacheLayerMixin):
    """Base of every kvpress cache layer: sequence length from the ledger, batch ops, byte counting.

    Subclasses implement ``update`` (store what the method keeps, return what its attention needs),
    ``held_tensors`` (every tensor they store) and ``select_batch`` (reindex rows).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, ledger: TokenLedger, owns_ledger: bool):
        super().__init__()
        self.ledger = ledger
        self.owns_ledger = owns_ledger  # exactly one layer applies batch ops to the shared ledger

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.ledger.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.ledger.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def held_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def select_batch(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    def after_forward(self) -> None:
        """Called on every layer once a forward has run through all of them (and the ledger has
        committed it)."""

    def _reindex(self, index: torch.Tensor) -> None:
        if self.owns_ledger:
            self.ledger.select_batch(index)
        self.select_batch(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reindex(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reindex(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        size = self.ledger.batch_size
        if size is not None:
            self._reindex(torch.arange(size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "kvpress caches drop or compress tokens and cannot be cropped; assisted and speculative "
            "decoding are not supported on patched models"
        )

    def reset(self) -> None:
        raise NotImplementedError("kvpress caches cannot be reset; start a new one (past_key_values=None)")

    def offload(self):
        pass

    def prefetch(self):
        pass


def begin_forward(cache: Cache, attention_mask, batch_size: int, num_new: int, device) -> None:
    """Tell a kvpress cache about the ``num_new`` tokens of the forward about to run."""
    cache.layers[0].ledger.begin(attention_mask, batch_size, num_new, device)


def end_forward(cache: Cache) -> None:
    """Commit the forward that just ran through every layer of a kvpress cache."""
    cache.layers[0].ledger.end()
    for layer in cache.layers:
        layer.after_forward()


def is_kvpress_cache(cache) -> bool:
    return isinstance(cache, Cache) and bool(cache.layers) and all(isinstance(x, KVPressLayer) for x in cache.layers)


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes of device memory held by a cache's tensors (allocated capacity, bookkeeping included).

    Works on kvpress caches and on plain transformers caches (keys and values of each layer), so the
    two can be compared directly. Tensors shared between layers are counted once.
    """
    storages: dict[int, int] = {}
    for layer in cache.layers:
        if isinstance(layer, KVPressLayer):
            tensors = layer.held_tensors() + layer.ledger.tensors()
        else:
            tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
