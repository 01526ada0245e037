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
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import (advance_static_decode, prepare_static_decode, static_steps, static_tensors,
                    supports_static_decode)
from .kernels import fused as ops

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


def install(patcher, model: torch.nn.Module, method, fuse_ops: str | None = None) -> GraphRunner:
    """Swap ``model.forward`` (instance level, undone by the patcher) for the runner's; graphs are
    freed when the patch is undone. On CUDA the model's small ops are fused too (:func:`fuse`;
    ``fuse_ops`` overrides :data:`FUSE`)."""
    spec = FUSE if fuse_ops is None else fuse_ops
    if spec != "none" and next(model.parameters()).is_cuda:
        fuse(patcher, model, spec)
    runner = GraphRunner(model, method)

    @functools.wraps(runner.original)  # generate reads the forward's signature (position_ids, logits_to_keep)
    def forward(*args, **kwargs):
        return runner.forward(*args, **kwargs)

    patcher.hook(runner)  # undo: runner.remove()
    patcher.set(model, "forward", forward)
    patcher.set(model, "_kvpress_graph", runner)
    return runner


# -- fused ops (issue #15: the launch-bound tail of a decode step) ---------------------------------

FUSE_PARTS = ("norm", "rotary", "mlp", "residual", "next_norm", "qkv", "gate_up", "gemv", "gemv_norm")
# The parts ``decode="graph"`` fuses by default: those measured on the H200
# (benchmarks/results/graph_tpot_batch1_NVIDIA_H200_round2.json). The Triton GEMV (``gemv``,
# ``gemv_norm``) is slower there than cuBLAS over the concatenated weights; ``next_norm`` is not measured yet.
DEFAULT_PARTS = ("norm", "rotary", "mlp", "residual", "qkv", "gate_up")
# What ``decode="graph"`` fuses on CUDA: "default", "all", "none", or a comma-separated subset of FUSE_PARTS.
FUSE = os.environ.get("KVPRESS_FUSE", "default")


def fuse_parts(spec: str) -> tuple[str, ...]:
    named = {"all": FUSE_PARTS, "default": DEFAULT_PARTS, "none": ()}
    parts = named[spec] if spec in named else tuple(p for p in spec.split(",") if p)
    unknown = sorted(set(parts) - set(FUSE_PARTS))
    if unknown:
        raise ValueError(f"unknown fused parts {', '.join(unknown)}: use 'default', 'all', 'none' or some of "
                         f"{', '.join(FUSE_PARTS)}")
    return parts


def fuse(patcher, model: torch.nn.Module, spec: str = "default") -> dict[str, int]:
    """Swap the decoder's small ops for fused kernels (``kvpress.kernels.fused``), each change recorded
    by ``patcher`` (exact undo). Parts (``spec``: "default" (:data:`DEFAULT_PARTS`), "all", or a
    comma-separated subset of :data:`FUSE_PARTS`):

    * ``norm``: every RMSNorm module runs one kernel (transformers' math: fp32 variance, cast, weight);
    * ``rotary``: the attention modules apply RoPE to q and k in one kernel (their forward is swapped
      for :func:`attention_forward`, unless the method swapped it already);
    * ``mlp``: SiLU(gate) * up in one kernel;
    * ``residual``: the decoder layer's residual add fused into its post-attention RMSNorm;
    * ``next_norm`` (with ``residual`` and ``norm``): the layer's last residual add fused with the
      RMSNorm that reads its output (the next layer's input norm, the model's final norm);
    * ``qkv`` / ``gate_up``: the q/k/v (gate/up) projections as one GEMM over their weights
      concatenated: the parameters stay the same objects but their data become row blocks of the
      concatenated tensor (no second copy); unpatching gives each its own storage back;
    * ``gemv``: the decoder's projections at decode (a few rows) through one Triton GEMV each
      (``kernels.fused.linear``), with SiLU(gate) * up computed in the down projection's loads and the
      residual adds in the output and down projections' stores;
    * ``gemv_norm`` (with ``gemv``, ``residual``, ``qkv`` and ``gate_up``): the decoder layer's two
      RMSNorms computed in the q/k/v and gate/up GEMVs' loads.

    The fused forwards run the kernels where ``kvpress.kernels`` runs Triton (CUDA) and no gradient
    is recorded, transformers' expressions otherwise. Returns how many modules each part changed."""
    from .adapters import describe

    parts = fuse_parts(spec)
    info = describe(model)
    heads = getattr(info, "heads", None)
    if heads is not None and heads.partial:  # tensor parallel: the projections are sharded and hooked
        log.info("kvpress decode='graph': no fused ops on a tensor-parallel model")
        return {}
    layers = getattr(info.base_model, info.facts.layers_attr)
    done = dict.fromkeys(parts, 0)
    for module in model.modules():
        if "norm" in parts and _is_rms_norm(module) and "forward" not in vars(module):
            patcher.swap_forward(module, norm_forward)
            done["norm"] += 1
    for layer, attention in zip(layers, info.attention_modules):
        if {"rotary", "qkv", "gemv"} & set(parts) and "forward" not in vars(attention) and _plain_attention(attention):
            patcher.set(attention, "_kvpress_window", info.layer_windows[attention.layer_idx])
            patcher.set(attention, "_kvpress_rotary", "rotary" in parts)
            patcher.set(attention, "_kvpress_gemv", "gemv" in parts)
            projections = [attention.q_proj, attention.k_proj, attention.v_proj]
            if "qkv" in parts and concatenate(patcher, attention, "_kvpress_qkv", projections):
                done["qkv"] += 1
            patcher.swap_forward(attention, attention_forward)
            if "rotary" in parts:
                done["rotary"] += 1
        mlp = getattr(layer, "mlp", None)
        if {"mlp", "gate_up", "gemv"} & set(parts) and _plain_mlp(mlp) and "forward" not in vars(mlp):
            if "gate_up" in parts and concatenate(patcher, mlp, "_kvpress_gate_up", [mlp.gate_proj, mlp.up_proj]):
                done["gate_up"] += 1
            patcher.set(mlp, "_kvpress_silu_mul", "mlp" in parts)
            patcher.set(mlp, "_kvpress_gemv", "gemv" in parts)
            if "gemv" in parts:
                done["gemv"] += 1
            patcher.swap_forward(mlp, mlp_forward)
            if "mlp" in parts:
                done["mlp"] += 1
        if "residual" in parts and _plain_layer(layer) and "forward" not in vars(layer):
            patcher.swap_forward(layer, layer_forward)
            done["residual"] += 1
            following = _following_norm(info, layers, layer)
            if ("next_norm" in parts and "gemv_norm" not in parts and following is not None
                    and _swapped(following, norm_forward)):
                stash = vars(following).get("_kvpress_stash")
                if stash is None:
                    stash = {}
                    patcher.set(following, "_kvpress_stash", stash)
                patcher.set(layer, "_kvpress_next_norm", (following,))  # in a tuple: not a submodule of the layer
                done["next_norm"] += 1
            if "gemv_norm" in parts and _is_rms_norm(layer.input_layernorm):
                patcher.set(layer, "_kvpress_gemv_norm", True)
                done["gemv_norm"] += 1
    log.info("kvpress decode='graph': fused %s", ", ".join(f"{k} x{v}" for k, v in done.items()))
    return done


def _following_norm(info, layers, layer):
    """The RMSNorm that reads ``layer``'s output: the next layer's input norm, or the model's final norm."""
    index = next(i for i, other in enumerate(layers) if other is layer)
    if index + 1 < len(layers):
        return getattr(layers[index + 1], "input_layernorm", None)
    norm = getattr(info.base_model, "norm", None)
    return norm if _is_rms_norm(norm) else None


def _is_rms_norm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float)
            and type(module).__name__ != "GemmaRMSNorm")


def _plain_linear(module) -> bool:
    """An ``nn.Linear`` itself (not quantized, sharded or hooked): its forward is ``F.linear``."""
    return (type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in vars(module))


def _plain_attention(module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (all(_plain_linear(getattr(module, n, None)) for n in names) and not module._forward_hooks
            and not module._forward_pre_hooks and isinstance(getattr(module, "head_dim", None), int)
            and hasattr(module, "layer_idx"))


def _plain_mlp(module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj")
    return (module is not None and all(_plain_linear(getattr(module, n, None)) for n in names)
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))  # torch.nn.functional.silu


def _plain_layer(layer) -> bool:
    if not all(hasattr(layer, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")):
        return False
    params = inspect.signature(type(layer).forward).parameters
    return _is_rms_norm(layer.post_attention_layernorm) and "position_embeddings" in params


class Concatenated:
    """Row blocks of one tensor as the weights (and biases) of several ``nn.Linear``: each parameter
    stays the same object, its data a view into ``weight`` (``bias``). ``extra`` weights (no module's,
    no bias: zeros in ``bias``) follow them; ``self.extra`` are their views. ``remove`` (at unpatch) gives
    each parameter its own storage back, with the same values."""

    def __init__(self, linears: list[torch.nn.Linear], extra: list[torch.Tensor] = ()):
        self.linears = linears
        # tensors of the parameters' kind: normal ones (a normal parameter refuses an inference tensor), or
        # inference tensors for a model made under torch.inference_mode (kept so, also after remove)
        self.inference = linears[0].weight.is_inference()
        rows = [m.weight.shape[0] for m in linears]
        extra_rows = [w.shape[0] for w in extra]
        with torch.inference_mode(self.inference), torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in linears] + [w.detach() for w in extra])
            self.bias = None
            if linears[0].bias is not None:
                self.bias = torch.cat([m.bias.detach() for m in linears] + [linears[0].bias.new_zeros(sum(extra_rows))])
        blocks = self.weight.split(rows + extra_rows)
        for m, w in zip(linears, blocks):
            m.weight.data = w
        self.extra = list(blocks[len(linears):])
        if self.bias is not None:
            for m, b in zip(linears, self.bias.split(rows + extra_rows)):
                m.bias.data = b
        self.pointers = self._pointers()

    def _pointers(self):
        return [(m.weight, m.weight.data_ptr(), m.bias, None if m.bias is None else m.bias.data_ptr()) for m in self.linears]

    def intact(self) -> bool:
        """Whether the linears still hold their parameters as views here (nothing replaced or moved them)."""
        return self.weight is not None and all(
            m.weight is w and m.weight.data_ptr() == wp and m.bias is b and (b is None or b.data_ptr() == bp)
            for m, (w, wp, b, bp) in zip(self.linears, self.pointers))

    def remove(self) -> None:
        """Each parameter that is still a view here gets its own storage back (same values, same kind)."""
        with torch.inference_mode(self.inference), torch.no_grad():
            for w, wp, b, bp in self.pointers:
                for p, ptr in ((w, wp), (b, bp)):
                    if p is not None and p.data_ptr() == ptr:
                        p.data = p.data.clone()
        self.weight = self.bias = None


def concatenate(patcher, module, name: str, linears, extra: list[torch.Tensor] = ()) -> bool:
    """Concatenate ``linears``' weights (same dtype, device, input size, bias or not), then ``extra``
    weights (:class:`Concatenated`), and hold them as ``module.<name>``; False when they cannot be."""
    weights = [m.weight for m in linears] + list(extra)
    if (len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or weights[0].device.type == "meta"
            or len({m.bias is None for m in linears}) != 1
            or (linears[0].bias is not None and len({(m.bias.dtype, m.bias.device) for m in linears}) != 1)
            or len({w.data_ptr() for w in weights}) != len(weights)):
        return False
    try:
        joined = Concatenated(list(linears), list(extra))
    except RuntimeError as error:  # a parameter that refuses the new data
        log.info("kvpress: %s not concatenated (%s)", name, error)
        return False
    patcher.hook(joined)
    patcher.set(module, name, joined)
    return True


def norm_forward(module, hidden_states):
    """An RMSNorm module's forward through ``kernels.fused.rms_norm`` (or what the layer before it
    computed for this very tensor, part ``next_norm``)."""
    stash = vars(module).get("_kvpress_stash")
    if stash and stash.get("input") is hidden_states:
        normed = stash["output"]
        stash.clear()
        return normed
    return ops.rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _add_then_norm(module, residual, hidden_states):
    """``residual + hidden_states``, the decoder layer's output; with ``next_norm``, the RMSNorm that
    reads it is computed in the same kernel and left for it (``norm_forward``)."""
    following = vars(module).get("_kvpress_next_norm", (None,))[0]
    stash = None if following is None else vars(following).get("_kvpress_stash")
    if stash is None or not _swapped(following, norm_forward):
        return residual + hidden_states
    normed, out = ops.rms_norm(hidden_states, following.weight, following.variance_epsilon, residual=residual)
    stash.clear()
    stash.update(input=out, output=normed)
    return out


def _linear(owner, linear, x, residual=None, silu_mul=False):
    """``linear(x)`` (``+ residual``), through the fused GEMV when ``owner`` has the ``gemv`` part."""
    if vars(owner).get("_kvpress_gemv"):
        return ops.linear(x, linear.weight, linear.bias, residual=residual, silu_mul=silu_mul)
    y = linear(ops.silu_mul_reference(*x.chunk(2, dim=-1)) if silu_mul else x)
    return y if residual is None else residual + y


def intact_join(module, name: str) -> Concatenated | None:
    """The :class:`Concatenated` weights held as ``module.<name>``, None when absent or no longer intact."""
    joined = vars(module).get(name)
    return joined if joined is not None and joined.intact() else None


def mlp_forward(module, x, residual=None, norm=None):
    """``down(silu(gate(x)) * up(x))`` (``+ residual``), with gate/up as one GEMM when concatenated
    and the product fused (with the ``gemv`` part: into the down projection's GEMV, the residual too).
    ``norm = (weight, eps)``: ``x`` is RMSNorm-ed first (in the gate/up GEMV's loads where it can)."""
    joined = intact_join(module, "_kvpress_gate_up")
    gemv = vars(module).get("_kvpress_gemv")
    if norm is not None and not (gemv and joined is not None):
        x, norm = ops.rms_norm(x, *norm), None
    if joined is not None:
        gate_up = ops.linear(x, joined.weight, joined.bias, norm=norm) if gemv else F.linear(x, joined.weight, joined.bias)
        if gemv:
            return _linear(module, module.down_proj, gate_up, residual=residual, silu_mul=True)
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        gate, up = _linear(module, module.gate_proj, x), _linear(module, module.up_proj, x)
    act = ops.silu_mul(gate, up) if vars(module).get("_kvpress_silu_mul") else module.act_fn(gate) * up
    return _linear(module, module.down_proj, act, residual=residual)


def attention_forward(module, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """transformers' Llama / Mistral / Qwen2 / Qwen3 attention forward, with q/k/v as one GEMM when
    concatenated and RoPE of q and k in one kernel (in place in the projections' output)."""
    if args or position_embeddings is None:
        return type(module).forward(module, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    return _attention(module, hidden_states, position_embeddings, attention_mask, None, kwargs)


def _attention(module, hidden_states, position_embeddings, attention_mask, residual, kwargs, norm=None):
    """:func:`attention_forward`'s body; with ``residual``, the output projection adds it; with
    ``norm = (weight, eps)``, ``hidden_states`` are RMSNorm-ed first (in the q/k/v GEMV's loads where it can)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, T, _ = hidden_states.shape
    D = module.head_dim
    joined = intact_join(module, "_kvpress_qkv")
    gemv = vars(module).get("_kvpress_gemv")
    if norm is not None and not (gemv and joined is not None):
        hidden_states, norm = ops.rms_norm(hidden_states, *norm), None
    if joined is not None:
        sizes = [m.weight.shape[0] for m in joined.linears]
        if gemv:
            qkv = ops.linear(hidden_states, joined.weight, joined.bias, norm=norm)
        else:
            qkv = F.linear(hidden_states, joined.weight, joined.bias)
        q, k, v = qkv.split(sizes, dim=-1)
    else:
        q, k, v = (_linear(module, p, hidden_states) for p in (module.q_proj, module.k_proj, module.v_proj))
    q, k, v = q.view(B, T, -1, D), k.view(B, T, -1, D), v.view(B, T, -1, D)
    if getattr(module, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
        q, k = module.q_norm(q), module.k_norm(k)
    cos, sin = position_embeddings
    if vars(module).get("_kvpress_rotary"):
        q, k = ops.rotary(q, k, cos, sin, inplace=not (q.requires_grad or k.requires_grad))
    else:
        q, k = ops.rotary_reference(q, k, cos, sin)
    if T > 1:  # prefill: the layouts transformers hands the attention ([B, T, H, D] storage)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    if cache is not None:
        k, v = cache.update(k, v, module.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation]
    window = vars(module).get("_kvpress_window")
    if window is not None:
        kwargs["sliding_window"] = window
    out, weights = attend(module, q, k, v, attention_mask, dropout=0.0, scaling=module.scaling, **kwargs)
    return _linear(module, module.o_proj, out.reshape(B, T, -1).contiguous(), residual=residual), weights


def _swapped(module, forward) -> bool:
    swap = vars(module).get("forward")
    return getattr(swap, "__func__", None) is forward


def layer_forward(module, hidden_states, *args, **kwargs):
    """transformers' decoder layer forward with the residual adds fused: into the post-attention
    RMSNorm, or (``gemv`` part) into the output and down projections."""
    if args:
        return type(module).forward(module, hidden_states, *args, **kwargs)
    residual = hidden_states
    attention, norm, mlp = module.self_attn, module.post_attention_layernorm, module.mlp
    if vars(attention).get("_kvpress_gemv") and _swapped(attention, attention_forward) and "position_embeddings" in kwargs:
        kwargs = dict(kwargs)
        first = module.input_layernorm
        prologue = vars(module).get("_kvpress_gemv_norm", False)
        if not prologue:
            hidden_states = first(hidden_states)
        hidden_states, _ = _attention(attention, hidden_states, kwargs.pop("position_embeddings"),
                                      kwargs.pop("attention_mask", None), residual, kwargs,
                                      norm=(first.weight, first.variance_epsilon) if prologue else None)
        residual = hidden_states
        if prologue and vars(mlp).get("_kvpress_gemv") and _swapped(mlp, mlp_forward):
            return mlp_forward(mlp, hidden_states, residual=residual, norm=(norm.weight, norm.variance_epsilon))
        hidden_states = norm(hidden_states)
    else:
        hidden_states = module.input_layernorm(hidden_states)
        hidden_states, _ = attention(hidden_states=hidden_states, **kwargs)
        hidden_states, residual = ops.rms_norm(hidden_states, norm.weight, norm.variance_epsilon, residual=residual)
    if vars(mlp).get("_kvpress_gemv") and _swapped(mlp, mlp_forward):
        return mlp_forward(mlp, hidden_states, residual=residual)
    return _add_then_norm(module, residual, mlp(hidden_states))
