"""Cache layers: what each method really stores, plus the per-row token bookkeeping they share.

A kvpress cache is a plain transformers ``Cache`` whose layers are :class:`KVPressLayer`
subclasses, one per model layer. All layers of one cache share a :class:`TokenLedger`, which knows,
for every batch row, which tokens are real (not padding) and their *ranks* (index among the real
tokens; see ``kvpress.kernels.reference``). The ledger is told about each forward's new tokens by a
hook on the model (``TokenLedger.begin`` / ``end``); a layer's ``update`` then stores what its method
keeps and returns whatever its attention function needs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

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

    @property
    def capacity(self) -> int:
        return 0 if self.storage is None else self.storage.shape[self.dim]

    def ensure_capacity(self, capacity: int) -> None:
        """Grow the storage to at least ``capacity`` entries (a copy), keeping what it holds."""
        if self.storage is None:
            raise RuntimeError("this buffer holds nothing yet: a forward must fill it before it is grown")
        if capacity > self.capacity:
            shape = list(self.storage.shape)
            shape[self.dim] = capacity
            grown = self.storage.new_empty(shape)
            grown.narrow(self.dim, 0, self.length).copy_(self.tensor)
            self.storage = grown

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

    def replace(self, x: torch.Tensor, room: int = 0, in_place: bool = False) -> None:
        """Hold ``x`` from now on, with room for ``room`` more entries. ``in_place``: copy ``x`` into
        the storage when it is large enough (its address stays: what a captured CUDA graph reads)."""
        length = x.shape[self.dim]
        if in_place and self._fits(x, length + room):
            self.storage.narrow(self.dim, 0, length).copy_(x)
            self.length = length
            return
        if room:
            size = list(x.shape)
            size[self.dim] += room
            storage = x.new_empty(size)
            storage.narrow(self.dim, 0, length).copy_(x)
            x = storage
        self.storage, self.length = x, length

    def keep(self, index: torch.Tensor, room: int = 0, in_place: bool = False) -> None:
        """Keep, in each batch row, only the entries at ``index [B, W]`` along ``dim``, in that order
        (with room for ``room`` more; ``in_place`` as in :meth:`replace`)."""
        filled = self.tensor
        view = [1] * filled.dim()
        view[0], view[self.dim] = index.shape
        size = list(filled.shape)
        size[self.dim] = index.shape[1]
        self.replace(filled.gather(self.dim, index.view(view).expand(size)), room, in_place)

    def _fits(self, x: torch.Tensor, entries: int) -> bool:
        if self.storage is None or self.capacity < entries or x.dim() != self.storage.dim():
            return False
        return all(a == b for i, (a, b) in enumerate(zip(x.shape, self.storage.shape)) if i != self.dim)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def select_batch(self, index: torch.Tensor, in_place: bool = False) -> None:
        """Reindex the batch rows (``in_place``: keep the storage and its capacity when the batch
        size stays, as a beam search's reorder between static decode steps)."""
        if self.storage is not None:
            rows = self.tensor.index_select(0, index.to(self.storage.device))
            self.replace(rows, self.capacity - self.length if in_place else 0, in_place)


@dataclass(frozen=True)
class Window:
    """Tokens a windowed buffer keeps per row: the ``sink`` first and ``recent`` last real tokens
    (StreamingLLM; DuoAttention's streaming heads). A model's own sliding window ``w`` is
    ``Window(0, w)``."""

    sink: int
    recent: int

    @property
    def slack(self) -> int:
        return window_slack(self.sink, self.recent)


@dataclass(frozen=True)
class LedgerSpec:
    """What token bookkeeping a method's cache layers need (the rest is not kept, so a cache whose
    layers keep no full history holds bookkeeping of constant size).

    all_ranks: ranks of every token seen (for layers that keep every token).
    windows: the sink + recent windows some layer keeps (each tracked once, shared by all layers).
    positions: the rotary positions of each forward's new tokens (methods that rebuild keys).
    """

    all_ranks: bool = False
    windows: tuple[Window, ...] = ()
    positions: bool = False

    def merged(self, other: LedgerSpec) -> LedgerSpec:
        windows = tuple(dict.fromkeys(self.windows + other.windows))
        return LedgerSpec(self.all_ranks or other.all_ranks, windows, self.positions or other.positions)


@dataclass
class ForwardTokens:
    """What the ledger knows about the tokens of the forward in progress (on one device)."""

    new_rank: torch.Tensor  # [B, n] int32 ranks of the new tokens (-1 = padding); also the query ranks
    all_rank: torch.Tensor | None = None  # [B, T + n] ranks of every token seen (LedgerSpec.all_ranks)
    window_rank: dict = field(default_factory=dict)  # Window -> [B, C + n] ranks of (window buffer ++ new tokens)
    positions: torch.Tensor | None = None  # [B, n] int64 rotary positions of the new tokens (LedgerSpec.positions)
    # Static decode steps (:class:`StaticDecode`): Window (None: the full buffers) -> [1] int32 slots
    # in use on the device, the new token's the last of them; the rank tensors above (and the layers'
    # buffers) are then whole storages of a fixed capacity. None: every slot of them is in use.
    lengths: dict | None = None
    slot: torch.Tensor | None = None  # [1] int64: the new token's slot in the full buffers (static steps)

    def to(self, device) -> ForwardTokens:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return ForwardTokens(move(self.new_rank), move(self.all_rank),
                             {w: move(r) for w, r in self.window_rank.items()}, move(self.positions),
                             None if self.lengths is None else {w: move(n) for w, n in self.lengths.items()},
                             move(self.slot))


def static_bucket(slots: int) -> int:
    """Capacity that full buffers grow to when a static decode step needs ``slots`` of them: the
    next multiple of 1/32 of ``slots``' power of two (at least 4096) above ``slots``, so that a
    captured graph serves 3-6% more tokens (at least 4096) before the buffers grow again."""
    unit = max(4096, (1 << (max(slots, 1) - 1).bit_length()) // 32)
    return (slots // unit + 1) * unit


@dataclass
class StaticDecode:
    """Device-side state of decode steps that run on buffers of a fixed capacity, so that a CUDA
    graph can replay them (``kvpress.graph``): nothing in such a step depends on host integers.

    ``lengths [1 + windows]`` (int32): slots in use of the full buffers (the tokens seen) and of each
    window buffer, in ``LedgerSpec.windows`` order; a step adds one to each, writes the new token's
    rank at the new last slot, and the attention reads the counts on the device. ``valid [B]``:
    whether each row's new token is real (copied in before each step). The host keeps the same
    counts (``seen``, the buffers' ``length``) and advances them after each step
    (:meth:`TokenLedger.advance_static`)."""

    lengths: torch.Tensor
    valid: torch.Tensor


class TokenLedger:
    """Per-row token bookkeeping shared by all layers of one cache.

    The core is small: tokens seen (``seen``, padding included: what transformers calls the cache
    length), real tokens per row (``num_real``) and the ranks of each forward's new tokens. What a
    method asks for through its :class:`LedgerSpec` comes on top: the ranks of every token, the
    rotary positions of the new tokens, and sink + recent windows.

    A window buffer is appended to like a full cache (tokens that left the window stay, masked by
    their ranks) and compacted to the window once it holds ``window.slack`` more slots than the
    window: after the forward that fills it, :meth:`compaction` gives the positions each layer keeps
    (``KVPressLayer.after_forward``), with room for ``slack`` more. Decode thus costs one in-place
    append per buffer and layer, and a gather every ``slack`` steps.

    Layers on several devices (``device_map``) get the bookkeeping on their own device: each
    forward's tensors are copied once per device (:meth:`current`).
    """

    def __init__(self, spec: LedgerSpec = LedgerSpec(), slack: int | None = None):
        self.spec = spec
        self.slack = {w: (slack if slack is not None else w.slack) for w in spec.windows}
        self.seen = 0
        self.num_real: torch.Tensor | None = None  # [B] int32
        self.rank = AppendBuffer(dim=1) if spec.all_ranks else None  # [B, T] int32
        self.window_rank = {w: AppendBuffer(dim=1) for w in spec.windows}  # [B, C] int32, -1 = empty slot
        self._compaction: dict = {}  # Window -> [B, W] positions kept by the last forward's compaction
        self.step: ForwardTokens | None = None
        self._on_device: dict = {}
        self.recovering = False  # this forward follows one that failed half-way (see ``begin``)
        self.static: StaticDecode | None = None  # device counters of static decode steps (prepare_static)
        self.capturing = False  # forwards are static decode steps (set around them by kvpress.graph)
        self.epoch = 0  # bumped whenever a buffer may have been reallocated or the counters went stale
        self._synced = -1  # the epoch at which ``static.lengths`` was last written from the host counts
        self._static_epoch, self._static_until = -1, 0  # prepare_static_decode's check: nothing to do below ``until``

    @property
    def batch_size(self) -> int | None:
        return None if self.num_real is None else self.num_real.shape[0]

    def begin(self, attention_mask: torch.Tensor | None, batch_size: int, num_new: int, device,
              position_ids: torch.Tensor | None = None) -> None:
        """Register the ``num_new`` tokens of a forward; ``attention_mask`` is the usual 2D padding
        mask, ``position_ids`` what the model was given (None: it counts from ``seen``)."""
        if self.capturing:
            return self._begin_static(batch_size, num_new, position_ids)
        self.epoch += 1
        self.recovering = self.step is not None
        if self.recovering:  # the previous forward failed half-way: forget its tokens (layers: ``committed``)
            n = self.step.new_rank.shape[1]
            if self.rank is not None:
                self.rank.truncate(self.seen)
            for buffer in self.window_rank.values():
                buffer.truncate(buffer.length - n)
        if self.num_real is None:
            self.num_real = torch.zeros(batch_size, dtype=torch.int32, device=device)
        elif batch_size != self.batch_size:
            raise ValueError(
                f"this cache holds {self.batch_size} sequences but the input has {batch_size}; "
                "start a new cache (pass no cache) for a new batch"
            )
        self._compaction, self._on_device = {}, {}
        valid = _new_token_mask(attention_mask, batch_size, num_new, device)
        count = valid.cumsum(dim=1, dtype=torch.int32)
        new_rank = torch.where(valid, self.num_real[:, None] + count - 1, -1).to(torch.int32)
        step = ForwardTokens(new_rank=new_rank)
        if self.rank is not None:
            step.all_rank = self.rank.append(new_rank)
        for window, buffer in self.window_rank.items():
            step.window_rank[window] = buffer.append(new_rank)
        if self.spec.positions:
            if position_ids is None:
                position_ids = torch.arange(self.seen, self.seen + num_new, device=device)[None]
            step.positions = position_ids.to(device=device, dtype=torch.long).expand(batch_size, num_new)
        self.step = step

    def end(self) -> None:
        """Commit the forward registered by :meth:`begin` (and compact the windows that are full)."""
        if self.capturing:
            self.num_real.add_(self.static.valid.to(torch.int32))  # the host counts advance in advance_static
            self.step, self._on_device = None, {}
            return
        step = self.step
        self.seen += step.new_rank.shape[1]
        self.num_real = self.num_real + (step.new_rank >= 0).sum(dim=1, dtype=torch.int32)
        for window, buffer in self.window_rank.items():
            slack = self.slack[window]
            if buffer.length >= window.sink + window.recent + slack:
                ranks = buffer.tensor
                keep = (ranks >= 0) & ((ranks < window.sink) | (ranks >= self.num_real[:, None] - window.recent))
                kept = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : window.sink + window.recent]
                self._compaction[window] = kept
                buffer.replace(torch.where(keep.gather(1, kept), ranks.gather(1, kept), -1), room=slack)
        self.step, self._on_device = None, {}

    def compaction(self, window: Window, device) -> torch.Tensor | None:
        """Positions each row keeps of ``window``'s buffer after the forward that just ended (None: no compaction)."""
        kept = self._compaction.get(window)
        return kept if kept is None or kept.device == device else kept.to(device)

    def committed(self) -> tuple[int, dict]:
        """Tokens per row of every committed forward: in a full cache, and in each window buffer."""
        n = self.step.new_rank.shape[1]
        return self.seen, {w: b.length - n for w, b in self.window_rank.items()}

    def current(self, device=None) -> ForwardTokens:
        """The forward in progress, its tensors on ``device`` (default: where the input is)."""
        if self.step is None:
            raise RuntimeError(
                "this kvpress cache layer was called outside a forward of its patched model: either the model's "
                "layers were called directly (call the patched model itself: model(...) or model.generate(...)), "
                "or the cache belongs to a model that has since been unpatched (start a new cache)"
            )
        if device is None or self.step.new_rank.device == torch.device(device):
            return self.step
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.step.to(device)
        return self._on_device[device]

    # -- static decode steps (kvpress.graph) ----------------------------------------------------

    def static_room(self, window: Window | None) -> tuple[int, int]:
        """(slots a buffer of ``window`` (None: a full buffer) needs for one more static step, the
        capacity to grow it to when it has fewer)."""
        if window is None:
            return self.seen + 1, static_bucket(self.seen + 1)
        room = window.sink + window.recent + self.slack[window]
        return room, room

    def prepare_static(self, device) -> int:
        """Make the rank buffers big enough for one more static step (growing them outside any
        graph; a growth bumps ``epoch``) and the device counters (:class:`StaticDecode`) match the
        host's. Returns how many static steps the buffers now have room for."""
        if self.num_real is None or self.step is not None:
            raise RuntimeError("static decode steps follow a completed forward (a prefill) of this cache")
        buffers = ([(self.rank, None)] if self.rank is not None else []) + [(b, w) for w, b in self.window_rank.items()]
        for buffer, window in buffers:
            needed, capacity = self.static_room(window)
            if buffer.capacity < needed:
                buffer.ensure_capacity(capacity)
                self.epoch += 1
        steps = self.rank.capacity - self.seen if self.rank is not None else 1 << 30
        if self.static is None:
            self.static = StaticDecode(lengths=torch.zeros(1 + len(self.window_rank), dtype=torch.int32, device=device),
                                       valid=torch.ones(self.batch_size, dtype=torch.bool, device=device))
            self.epoch += 1
        if self._synced != self.epoch:
            counts = [self.seen] + [b.length for b in self.window_rank.values()]
            for i, count in enumerate(counts):
                self.static.lengths[i].fill_(count)  # a launch each, no host sync
            self._synced = self.epoch
        return steps

    def _begin_static(self, batch_size: int, num_new: int, position_ids) -> None:
        """:meth:`begin` of a static decode step: device work only, on buffers of a fixed capacity."""
        if num_new != 1 or batch_size != self.batch_size or self.static is None:
            raise RuntimeError("a static decode step takes one new token per row of a prepared cache (prepare_static)")
        lengths = self.static.lengths
        lengths.add_(1)
        slots = (lengths - 1).long()
        new_rank = torch.where(self.static.valid[:, None], self.num_real[:, None], -1).to(torch.int32)
        step = ForwardTokens(new_rank=new_rank, lengths={None: lengths[0:1]}, slot=slots[0:1])
        if self.rank is not None:
            self.rank.storage.index_copy_(1, slots[0:1], new_rank)
            step.all_rank = self.rank.storage
        for i, (window, buffer) in enumerate(self.window_rank.items()):
            buffer.storage.index_copy_(1, slots[i + 1:i + 2], new_rank)
            step.window_rank[window] = buffer.storage
            step.lengths[window] = lengths[i + 1:i + 2]
        if self.spec.positions:
            if position_ids is None:
                raise RuntimeError("a static decode step needs the model's position_ids")
            step.positions = position_ids.to(dtype=torch.long).expand(batch_size, 1)
        self._compaction, self._on_device = {}, {}
        self.step = step

    def advance_static(self) -> dict:
        """After a static step ran: advance the host counts by its token and compact the window
        buffers that are full, in place (as :meth:`end` does). Returns ``{window: kept [B, W]}``
        for the layers (``KVPressLayer.advance_static``)."""
        self.seen += 1
        if self.rank is not None:
            self.rank.length += 1
        kept = {}
        for window, buffer in self.window_rank.items():
            buffer.length += 1
            if buffer.length >= window.sink + window.recent + self.slack[window]:
                ranks = buffer.tensor
                keep = (ranks >= 0) & ((ranks < window.sink) | (ranks >= self.num_real[:, None] - window.recent))
                kept[window] = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : window.sink + window.recent]
                buffer.replace(torch.where(keep.gather(1, kept[window]), ranks.gather(1, kept[window]), -1),
                               room=self.slack[window], in_place=True)
        if kept:
            self.epoch += 1  # the window counts changed on the host only
        return kept

    def static_tensors(self) -> list[torch.Tensor]:
        """The tensors a static step reads or writes in place (a captured graph holds their addresses)."""
        buffers = [b for b in (self.rank, *self.window_rank.values()) if b is not None]
        return [b.storage for b in buffers] + [self.num_real, self.static.lengths, self.static.valid]

    def select_batch(self, index: torch.Tensor) -> None:
        self.epoch += 1
        if self.static is not None and self.static.valid.shape[0] != index.shape[0]:
            self.static = None  # made again for the new batch size
        in_place = self.static is not None  # static steps ran: keep what a captured graph reads
        for buffer in (self.rank, *self.window_rank.values()):
            if buffer is not None:
                buffer.select_batch(index, in_place)
        if self.num_real is not None:
            rows = self.num_real.index_select(0, index.to(self.num_real.device))
            if in_place and rows.shape == self.num_real.shape:
                self.num_real.copy_(rows)
            else:
                self.num_real = rows

    def tensors(self) -> list[torch.Tensor]:
        buffers = [self.rank, *self.window_rank.values()]
        held = [b.storage for b in buffers if b is not None and b.storage is not None]
        return held + ([self.num_real] if self.num_real is not None else [])


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
    # Whether the layer runs static decode steps (``kvpress.graph``: buffers of a fixed capacity,
    # counts on the device): then it implements prepare_static, static_tensors and advance_static.
    static_decode = False

    def __init__(self, ledger: TokenLedger, owns_ledger: bool):
        super().__init__()
        self.ledger = ledger
        # Exactly one layer applies batch ops to the shared ledger: the last one, so that every layer
        # before it still sees the old batch size (``batch_repeat_interleave``).
        self.owns_ledger = owns_ledger

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

    def prepare_static(self) -> int:
        """Make every buffer big enough for one more static decode step (``TokenLedger.static_room``),
        growing it outside any graph (and bumping ``ledger.epoch`` if it does); returns how many
        static steps the buffers now have room for (window buffers, compacted in place, always have)."""
        raise NotImplementedError(f"{type(self).__name__} does not run static decode steps")

    def static_tensors(self) -> list[torch.Tensor]:
        """The tensors a static step of this layer reads or writes (a captured graph holds their addresses)."""
        raise NotImplementedError(f"{type(self).__name__} does not run static decode steps")

    def advance_static(self, kept: dict) -> None:
        """After a static step ran: advance the host lengths by its token and apply the window
        compactions ``kept`` (``TokenLedger.advance_static``) in place."""
        raise NotImplementedError(f"{type(self).__name__} does not run static decode steps")

    def _reindex(self, index: torch.Tensor) -> None:
        self.ledger.epoch += 1
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
            self._reindex(torch.arange(size, device=self.ledger.num_real.device).repeat_interleave(repeats))

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


@dataclass
class HeadGroup:
    """KV heads of one layer stored together and attended under one rule.

    ``window`` None: the group keeps every token (causal attention over all of them); else it keeps
    ``window.sink`` first and ``window.recent`` last real tokens per row (A-shape attention)."""

    heads: torch.Tensor  # [n] int64 KV-head indices, on the layer's device
    k: torch.Tensor  # [B, n, T, D]; during a forward the last slots are the new tokens' (see KVView)
    v: torch.Tensor
    rank: torch.Tensor  # [B, T] int32 ranks of the stored tokens (-1 = padding / empty slot)
    window: Window | None = None
    length: torch.Tensor | None = None  # [1] int32 on the device: slots of k/v/rank in use (static steps); None: all


@dataclass
class KVView:
    """What a grouped cache layer hands the attention function for one forward.

    Every group's buffers already have room for the forward's ``n`` new tokens (their last ``n``
    slots) but do not hold them yet: the attention must write ``new_k``/``new_v`` there exactly once,
    through :meth:`take_new` (a kernel that writes them itself) or :meth:`write_new`; the layer
    checks it after the forward."""

    groups: list[HeadGroup]
    query_rank: torch.Tensor  # [B, n]
    new_k: torch.Tensor  # [B, num_kv_heads, n, D] the new tokens of every KV head
    new_v: torch.Tensor
    pending: bool = True

    def take_new(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens, for a caller that writes them; marks them written."""
        if not self.pending:
            raise RuntimeError("this forward's new tokens were already written into the cache")
        self.pending = False
        new = self.new_k, self.new_v
        self.new_k = self.new_v = None  # the view lives until the forward ends: hold no layer's chunk K/V that long
        return new

    def write_new(self) -> None:
        """Write the new tokens into every group's buffers."""
        from . import kernels

        kernels.write_new_into(self.take_new(), [(g.k, g.v, g.heads) for g in self.groups])


class GroupedLayer(KVPressLayer):
    """A cache layer whose KV heads are split into groups (:class:`HeadGroup`), each stored in its own
    pair of append buffers ``[B, n, T, D]``: heads that keep every token, and heads that keep a
    sink + recent window (compacted when the ledger says so). Dense is one group of every head;
    DuoAttention is a group of retrieval heads and a group of streaming heads; a layer of the model's
    own sliding window keeps ``Window(0, sliding_window)``.

    A forward reserves room for its tokens and the attention writes them (at decode, inside the
    decode kernel: no torch op per layer). A static decode step (``kvpress.graph``) hands the
    attention the whole storages with their lengths on the device instead, and the host lengths
    advance afterwards (:meth:`advance_static`)."""

    static_decode = True

    def __init__(self, ledger: TokenLedger, owns_ledger: bool, groups: list[tuple[torch.Tensor, Window | None]]):
        super().__init__(ledger, owns_ledger)
        self.group_specs = [(heads.to(torch.long), window) for heads, window in groups if len(heads)]
        self.buffers = [(AppendBuffer(dim=2), AppendBuffer(dim=2)) for _ in self.group_specs]
        self.view: KVView | None = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.group_specs = [(heads.to(self.device), window) for heads, window in self.group_specs]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[KVView, None]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.ledger.current(key_states.device)
        if step.lengths is not None:  # a static decode step: whole storages, lengths on the device
            groups = [HeadGroup(heads, keys.storage, values.storage, step.all_rank if window is None else step.window_rank[window],
                                window, step.lengths[window])
                      for (heads, window), (keys, values) in zip(self.group_specs, self.buffers)]
            self.view = KVView(groups, step.new_rank, key_states, value_states)
            return self.view, None
        if self.ledger.recovering:  # drop what this layer appended in a forward that failed half-way
            full, windows = self.ledger.committed()
            for (_, window), pair in zip(self.group_specs, self.buffers):
                for buffer in pair:
                    buffer.truncate(full if window is None else windows[window])
        groups = []
        for (heads, window), (keys, values) in zip(self.group_specs, self.buffers):
            rank = step.all_rank if window is None else step.window_rank[window]
            groups.append(HeadGroup(heads, keys.reserve(key_states, heads), values.reserve(value_states, heads), rank, window))
        self.view = KVView(groups, step.new_rank, key_states, value_states)
        return self.view, None

    def after_forward(self) -> None:
        view, self.view = self.view, None
        if view is not None and view.pending:
            raise RuntimeError("the attention of a kvpress cache layer did not write the forward's new tokens")
        for (_, window), pair in zip(self.group_specs, self.buffers):
            kept = None if window is None else self.ledger.compaction(window, self.device)
            if kept is not None:
                for buffer in pair:
                    buffer.keep(kept, room=self.ledger.slack[window])

    def held_tensors(self) -> list[torch.Tensor]:
        return [b.storage for pair in self.buffers for b in pair if b.storage is not None]

    def prepare_static(self) -> int:
        steps = 1 << 30
        for (_, window), pair in zip(self.group_specs, self.buffers):
            needed, capacity = self.ledger.static_room(window)
            for buffer in pair:
                if buffer.capacity < needed:
                    buffer.ensure_capacity(capacity)
                    self.ledger.epoch += 1
                if window is None:
                    steps = min(steps, buffer.capacity - self.ledger.seen)
        return steps

    def static_tensors(self) -> list[torch.Tensor]:
        return [b.storage for pair in self.buffers for b in pair] + [heads for heads, _ in self.group_specs]

    def advance_static(self, kept: dict) -> None:
        for (_, window), pair in zip(self.group_specs, self.buffers):
            for buffer in pair:
                buffer.length += 1
                if kept and window in kept:
                    buffer.keep(kept[window], room=self.ledger.slack[window], in_place=True)

    def select_batch(self, index: torch.Tensor) -> None:
        for pair in self.buffers:
            for buffer in pair:
                buffer.select_batch(index, in_place=self.ledger.static is not None)


def begin_forward(cache: Cache, attention_mask, batch_size: int, num_new: int, device, position_ids=None) -> None:
    """Tell a kvpress cache about the ``num_new`` tokens of the forward about to run."""
    cache.layers[0].ledger.begin(attention_mask, batch_size, num_new, device, position_ids)


def end_forward(cache: Cache) -> None:
    """Commit the forward that just ran through every layer of a kvpress cache."""
    cache.layers[0].ledger.end()
    for layer in cache.layers:
        layer.after_forward()


def supports_static_decode(cache: Cache) -> bool:
    """Whether every layer of a kvpress cache runs static decode steps (``kvpress.graph``)."""
    return is_kvpress_cache(cache) and all(layer.static_decode for layer in cache.layers)


def prepare_static_decode(cache: Cache, device) -> None:
    """Room for one more static decode step in every buffer of ``cache`` (grown outside any graph,
    by whole buckets: :func:`static_bucket`), device counters in sync with the host's. Cheap when
    nothing changed since the last call and the buffers still have room."""
    ledger = cache.layers[0].ledger
    if ledger.epoch == ledger._static_epoch and ledger.seen < ledger._static_until:
        return
    steps = min([layer.prepare_static() for layer in cache.layers] + [ledger.prepare_static(device)])
    ledger._static_epoch, ledger._static_until = ledger.epoch, ledger.seen + steps


def static_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every tensor a static decode step of ``cache`` reads or writes in place."""
    return cache.layers[0].ledger.static_tensors() + [t for layer in cache.layers for t in layer.static_tensors()]


def advance_static_decode(cache: Cache) -> None:
    """Host bookkeeping after a static decode step of ``cache`` ran (on the device, or replayed)."""
    kept = cache.layers[0].ledger.advance_static()
    for layer in cache.layers:
        layer.advance_static(kept)


@contextmanager
def static_steps(cache: Cache):
    """Within the block, forwards of the patched model on ``cache`` are static decode steps."""
    ledger = cache.layers[0].ledger
    ledger.capturing = True
    try:
        yield
    finally:
        ledger.capturing = False
        if ledger.step is not None:  # the step failed half-way: it left no host count behind
            ledger.step, ledger._on_device = None, {}
            ledger.epoch += 1
            for layer in cache.layers:
                if hasattr(layer, "view"):
                    layer.view = None


def is_kvpress_cache(cache) -> bool:
    return isinstance(cache, Cache) and bool(cache.layers) and all(isinstance(x, KVPressLayer) for x in cache.layers)


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes of device memory held by a cache's tensors (allocated capacity, bookkeeping included).

    Works on kvpress caches and on plain transformers caches (keys and values of each layer), so the
    two can be compared directly. Tensors shared between layers are counted once.
    """
    storages: dict[int, int] = {}
    for layer in cache.layers:
        if isinstance(layer, KVPressLayer):  # what is allocated, capacity included
            for tensor in layer.held_tensors() + layer.ledger.tensors():
                if tensor.numel():
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        else:  # transformers' layers: the keys and values they hold (a sliding layer's window, not the
            # prefill tensor its window is briefly a view of)
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor) and tensor.numel():
                    storages[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(storages.values())
