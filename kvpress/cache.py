"""Cache layers: what each method really stores, plus the per-row token bookkeeping they share.

A kvpress cache is a plain transformers ``Cache`` whose layers are :class:`KVPressLayer`
subclasses, one per model layer. All layers of one cache share a :class:`TokenLedger`, which knows,
for every batch row, which tokens are real (not padding) and their *ranks* (index among the real
tokens; see ``kvpress.kernels.reference``). The ledger is told about each forward's new tokens by a
hook on the model (``TokenLedger.begin`` / ``end``); a layer's ``update`` then stores what its method
keeps and returns whatever its attention function needs.
"""

from __future__ import annotations

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

    def to(self, device) -> ForwardTokens:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return ForwardTokens(move(self.new_rank), move(self.all_rank),
                             {w: move(r) for w, r in self.window_rank.items()}, move(self.positions))


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

    @property
    def batch_size(self) -> int | None:
        return None if self.num_real is None else self.num_real.shape[0]

    def begin(self, attention_mask: torch.Tensor | None, batch_size: int, num_new: int, device,
              position_ids: torch.Tensor | None = None) -> None:
        """Register the ``num_new`` tokens of a forward; ``attention_mask`` is the usual 2D padding
        mask, ``position_ids`` what the model was given (None: it counts from ``seen``)."""
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

    def select_batch(self, index: torch.Tensor) -> None:
        for buffer in (self.rank, *self.window_rank.values()):
            if buffer is not None:
                buffer.select_batch(index)
        if self.num_real is not None:
            self.num_real = self.num_real.index_select(0, index.to(self.num_real.device))

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
        return self.new_k, self.new_v

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
    decode kernel: no torch op per layer)."""

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

    def select_batch(self, index: torch.Tensor) -> None:
        for pair in self.buffers:
            for buffer in pair:
                buffer.select_batch(index)


def begin_forward(cache: Cache, attention_mask, batch_size: int, num_new: int, device, position_ids=None) -> None:
    """Tell a kvpress cache about the ``num_new`` tokens of the forward about to run."""
    cache.layers[0].ledger.begin(attention_mask, batch_size, num_new, device, position_ids)


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
