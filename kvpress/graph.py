"""CUDA-graph decode: ``kvpress.patch(model, method, decode="graph")``.

A decode step of an eager transformers model spends most of its time on the host (Python and
launches: ~30 ms for an 8B Llama at 128K tokens with DuoAttention, where the GPU needs ~5 ms). The
runner here captures the whole step, the model and its LM head, in one CUDA graph and replays it:

* the patched model's ``forward`` is swapped at instance level (``Patcher.swap_forward``); a call
  that is a plain decode step (one new token per row, on CUDA, with a kvpress cache that has been
  prefilled) is replayed, anything else (prefill, chunks, unusual arguments) runs eagerly;
* the cache runs *static* decode steps (``kvpress.cache.StaticDecode``): buffers of a fixed
  capacity, the counts of slots in use on the device, advanced inside the graph, the new token's
  rank written at a device index, the decode kernel reading the counts on the device, no host
  sync and no allocation outside the graph's pool. The host advances its own counts after each
  replay (``advance_static_decode``) and compacts full window buffers in place, between replays;
* buffers grow outside the graph by whole buckets (``static_bucket``: 3-6% of the length, at least
  4096 tokens); a growth (or anything else that moves a buffer: a batch reorder, an eager forward
  that compacted or grew) makes the next step capture a new graph. One graph is kept per live
  cache (its batch size and capacity bucket); it is freed when its cache is dropped, when it is
  captured again, and at ``unpatch``.

Within a graph the new token of every row is taken as real unless the call's ``attention_mask``
says otherwise (its last column is copied in on the device), exactly as the eager step does, so a
replayed step computes what the eager step computes. The first step of each graph runs the static
step once for real (compiling and warming up), then captures it. Without CUDA the same static steps
run uncaptured (what the CPU tests check against the eager path).
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch

from .cache import (advance_static_decode, prepare_static_decode, static_steps, static_tensors,
                    supports_static_decode)

log = logging.getLogger("kvpress")

DECODE_MODES = ("eager", "graph")
# Keyword arguments a decode step may carry (with their eager meaning kept by the replay); any
# other one makes the step run eagerly.
_KNOWN = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds", "use_cache",
          "return_dict", "output_attentions", "output_hidden_states", "logits_to_keep", "labels"}


@dataclass
class Captured:
    """One captured decode step of one cache: its graph (None when steps run uncaptured), the
    static inputs it reads, the output it writes, and (weakly) what it was captured over."""

    graph: object
    input_ids: torch.Tensor  # [B, 1]
    position_ids: torch.Tensor  # [B, 1]
    output: dict | None  # the output's tensors the graph writes (in its pool), by field; the cache is not kept
    output_type: type | None
    ledger: weakref.ref
    tensors: list  # weak references to the tensors the step reads or writes in place
    epoch: int  # the ledger's epoch when ``tensors`` were last checked

    def still_valid(self, cache) -> bool:
        current = static_tensors(cache)
        return len(current) == len(self.tensors) and all(ref() is t for ref, t in zip(self.tensors, current))


class GraphRunner:
    """Replays one CUDA graph per live cache for the decode steps of a patched model (module docstring)."""

    def __init__(self, model: torch.nn.Module, method, capture: bool | None = None):
        self.model = model
        self.method = method
        self.original = model.forward  # bound: the class's forward, or whatever wrapper was there
        params = inspect.signature(self.original).parameters
        self.cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
        self.takes_logits_to_keep = "logits_to_keep" in params
        self.capture = capture  # None: capture on CUDA, run uncaptured elsewhere
        self.graphs: dict[int, Captured] = {}  # id(ledger) -> its graph
        self.told: set[str] = set()
        self.replays = 0  # decode steps replayed (or run as static steps when not capturing)
        self.first_steps = 0  # steps that started an entry (a warm-up, then a capture on CUDA)
        self.captures = 0
        self.inside = False

    # -- the patched forward ------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self.inside:  # the runner's own call of the model (through its hooks)
            return self.original(*args, **kwargs)
        decode = self._decode_inputs(args, kwargs)
        if decode is None:
            return self.original(*args, **kwargs)
        return self.step(*decode)

    def _decode_inputs(self, args, kwargs):
        """(cache, input_ids, attention_mask, position_ids) when the call is a decode step this runner
        replays, else None (eager)."""
        if self.cache_arg is None or len(args) > 1:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or cache is None:
            return None  # prefill, or no cache yet: eager
        if kwargs.get("inputs_embeds") is not None or not self.method.owns(cache):
            return None
        ledger = cache.layers[0].ledger
        if ledger.num_real is None or ledger.step is not None or ledger.batch_size != ids.shape[0]:
            return None  # not prefilled, a failed forward to recover from, or a wrong batch: eager says so
        why = self._unsupported(ids, kwargs) or (None if id(ledger) in self.graphs else self._unsupported_cache(ids, cache))
        if why is not None:
            self._tell(why)
            return None
        return cache, ids, kwargs.get("attention_mask"), kwargs.get("position_ids")

    def _unsupported(self, ids, kwargs) -> str | None:
        unknown = sorted(set(kwargs) - _KNOWN)
        if unknown:
            return f"arguments {', '.join(unknown)}"
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False or kwargs.get("labels") is not None:
            return "use_cache=False, return_dict=False or labels"
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return "output_attentions or output_hidden_states"
        if kwargs.get("logits_to_keep") not in (None, 0, 1):
            return f"logits_to_keep={kwargs.get('logits_to_keep')!r}"
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != ids.shape[0]):
            return "an attention_mask that is not the usual 2D padding mask"
        if positions is not None and (not isinstance(positions, torch.Tensor) or positions.shape[-1] != 1
                                      or positions.dim() != 2 or positions.shape[0] not in (1, ids.shape[0])):
            return "position_ids that are not [batch, 1]"
        return None

    def _unsupported_cache(self, ids, cache) -> str | None:
        if not supports_static_decode(cache):
            return f"the cache layers of method {self.method.name!r} (they do not run static decode steps yet)"
        devices = {getattr(layer, "device", ids.device) for layer in cache.layers}
        if devices != {ids.device}:
            return "a model on several devices"
        if self._capturing(ids.device) and not torch.cuda.is_available():
            return "no CUDA"
        return None

    def _capturing(self, device) -> bool:
        return self.capture if self.capture is not None else device.type == "cuda"

    def _tell(self, why: str) -> None:
        if why not in self.told:
            self.told.add(why)
            log.warning("kvpress decode='graph': decoding eagerly (not in a CUDA graph) because of %s", why)

    # -- a decode step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, cache, input_ids, attention_mask, position_ids):
        """One decode step of ``cache``: replayed from its graph (captured first if needed)."""
        ledger = cache.layers[0].ledger
        device = input_ids.device
        prepare_static_decode(cache, device)  # grows buffers (a new bucket) outside any graph
        entry = self.graphs.get(id(ledger))
        if entry is not None and entry.epoch != ledger.epoch:
            if entry.ledger() is ledger and entry.still_valid(cache):
                entry.epoch = ledger.epoch
            else:
                self._drop(id(ledger))
                entry = None
        valid = ledger.static.valid
        if attention_mask is None:
            valid.fill_(True)
        else:
            valid.copy_(attention_mask[:, -1])
        if entry is None:
            return self._first_step(cache, ledger, input_ids, position_ids, device)
        self._set_inputs(entry, ledger, input_ids, position_ids)
        if entry.graph is None:
            with static_steps(cache):
                out = self._call(cache, entry)
        else:
            entry.graph.replay()
            out = entry.output_type(**{k: cache if v is None else v for k, v in entry.output.items()})
        advance_static_decode(cache)
        self.replays += 1
        return _fresh(out)

    def _first_step(self, cache, ledger, input_ids, position_ids, device):
        """Run the static step for real (compile, warm up), then capture it for the next steps."""
        self.first_steps += 1
        batch = input_ids.shape[0]
        entry = Captured(graph=None, input_ids=torch.empty(batch, 1, dtype=torch.long, device=device),
                         position_ids=torch.empty(batch, 1, dtype=torch.long, device=device), output=None, output_type=None,
                         ledger=weakref.ref(ledger, self._forget(id(ledger))),
                         tensors=[weakref.ref(t) for t in static_tensors(cache)], epoch=ledger.epoch)
        self._set_inputs(entry, ledger, input_ids, position_ids)
        capture = self._capturing(device)
        if capture:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), static_steps(cache):
                out = self._call(cache, entry)
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            with static_steps(cache):
                out = self._call(cache, entry)
        out = _fresh(out)  # on the current stream, after the warm-up
        advance_static_decode(cache)
        self.replays += 1
        if capture:
            self._drop_dead()
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), static_steps(cache):
                    captured = self._call(cache, entry)
                # the output's tensors by field (None: where the cache goes; a reference to it here
                # would keep the cache alive as long as the graph)
                entry.output = {k: None if v is cache else v for k, v in captured.items()}
                entry.output_type, entry.graph = type(captured), graph
                self.captures += 1
            except Exception as error:  # not capturable: this cache's steps run uncaptured
                self._tell(f"a step that could not be captured ({type(error).__name__}: {error})")
                entry.graph = entry.output = None
            entry.epoch = ledger.epoch  # a compaction after the warm-up moved no tensor (in place)
        self.graphs[id(ledger)] = entry
        return out

    def _set_inputs(self, entry: Captured, ledger, input_ids, position_ids) -> None:
        entry.input_ids.copy_(input_ids)
        if position_ids is None:  # what the model counts by itself: the tokens seen so far
            entry.position_ids.fill_(ledger.seen)
        else:
            entry.position_ids.copy_(position_ids)

    def _call(self, cache, entry: Captured):
        """The model's static step on the entry's inputs (through ``model(...)``: its hooks run)."""
        kwargs = {"input_ids": entry.input_ids, "position_ids": entry.position_ids, "attention_mask": None,
                  self.cache_arg: cache, "use_cache": True, "return_dict": True}
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self.inside = True
        try:
            return self.model(**kwargs)
        finally:
            self.inside = False

    # -- graphs' lifetime ---------------------------------------------------------------------

    def _forget(self, key: int):
        runner = weakref.ref(self)

        def forget(_):  # the cache's ledger was freed: so is its graph
            alive = runner()
            if alive is not None:
                alive._drop(key)
        return forget

    def _drop(self, key: int) -> None:
        entry = self.graphs.pop(key, None)
        if entry is not None:
            entry.graph = entry.output = None

    def _drop_dead(self) -> None:
        for key in [k for k, e in self.graphs.items() if e.ledger() is None]:
            self._drop(key)

    def remove(self) -> None:
        """Free every graph (``unpatch``)."""
        for key in list(self.graphs):
            self._drop(key)


def _fresh(out):
    """A copy of a model output whose tensors the next replay does not overwrite (the cache is kept)."""
    return type(out)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})


def install(patcher, model: torch.nn.Module, method) -> GraphRunner:
    """Swap ``model.forward`` (instance level, undone by the patcher) for the runner's; graphs are
    freed when the patch is undone."""
    runner = GraphRunner(model, method)

    @functools.wraps(runner.original)  # generate reads the forward's signature (position_ids, logits_to_keep)
    def forward(*args, **kwargs):
        return runner.forward(*args, **kwargs)

    patcher.hook(runner)  # undo: runner.remove()
    patcher.set(model, "forward", forward)
    patcher.set(model, "_kvpress_graph", runner)
    return runner
