"""The public entry points: ``patch``, ``unpatch``, ``make_cache``.

``patch`` changes a model in place and records every change, so ``unpatch`` (or a failure half-way
through ``patch``) puts back exactly what was there:

* the model's attention implementation is set to ``"kvpress"``, an attention function registered
  with transformers' ``AttentionInterface`` that forwards each call to the method attached to the
  calling attention module;
* every attention module gets the method's runtime as ``_kvpress_method`` (and the method may swap
  attention modules' forwards, ``Method.prepare``);
* a pre-forward hook on the base model puts the method's cache in place (a new one, or the layers of
  an empty cache the caller passed) and tells the cache's token ledger about the new tokens and
  their padding; a post-forward hook commits them.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .adapters import describe
from .cache import begin_forward, end_forward, is_kvpress_cache
from .methods import GroupedMethod, Method, get_method

ATTENTION_NAME = "kvpress"


@dataclass
class Patcher:
    """Applies attribute changes and hooks, remembering how to undo each, in reverse order.

    Undo restores exactly what was there: the same objects (submodules, parameters and buffers of an
    ``nn.Module`` included), and removes what was not."""

    undo_steps: list = field(default_factory=list)

    def set(self, obj, name: str, value) -> None:
        had, old = _own_attribute(obj, name)
        setattr(obj, name, value)
        self.undo_steps.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def swap_forward(self, module: torch.nn.Module, forward) -> None:
        """Make ``module.forward`` call ``forward(module, *args, **kwargs)`` (instance level)."""
        self.set(module, "forward", types.MethodType(forward, module))

    def hook(self, handle) -> None:
        self.undo_steps.append(handle.remove)

    def undo(self) -> None:
        while self.undo_steps:
            self.undo_steps.pop()()


def _own_attribute(obj, name: str):
    """Whether ``obj`` itself holds ``name`` (not its class), and the value."""
    if isinstance(obj, torch.nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                return True, table[name]
    return name in vars(obj), vars(obj).get(name)


@dataclass
class PatchState:
    method: Method
    patcher: Patcher

    def __deepcopy__(self, memo):
        raise TypeError(
            "a model patched by kvpress cannot be copied (its hooks and attention routing would still point at the "
            "original): kvpress.unpatch(model), copy it, then patch each copy"
        )


def patch(model: torch.nn.Module, method: str | list[str], config=None, *, prefill_chunk_size: int | None = None,
          decode: str = "eager", **options):
    """Patch ``model``'s attention in place with a kvpress method and return the model.

    Args:
        model: a transformers causal LM of a supported family (or its bare base model).
        method: a method name (``kvpress.METHODS``: ``"dense"``, ``"duo"``, ...), or a sparse prefill
            method composed with a method that keeps a cache: ``"minference+duo"`` (or the list
            ``["minference", "duo"]``): the cache and decode are the last method's, prefill of the
            heads that keep every token the first's.
        config: the method's config object, or a path to its config file; None for the method's
            default. When composing, a dict from method name to its config.
        prefill_chunk_size: if set, ``model.generate`` prefills the prompt in chunks of this many
            tokens (transformers' ``generation_config.prefill_chunk_size``), which bounds prefill memory.
        decode: ``"eager"`` (default) or ``"graph"``: decode steps (one token per row, on CUDA) are
            captured in a CUDA graph per cache and replayed (``kvpress.graph``), which removes the
            host's per-layer work; prefill and anything unusual still run eagerly.
        **options: fields of the method's config to override (e.g. ``sink=``, ``recent=``, ``sparsity=``);
            when composing, each goes to the method whose config has that field.

    After patching, ``model(...)`` and ``model.generate(...)`` create the method's cache by
    themselves; an empty cache passed to the model is filled with the method's layers.
    """
    if isinstance(vars(model).get("_kvpress_patch"), PatchState):
        raise ValueError(
            f"this model is already patched with kvpress method {model._kvpress_patch.method.name!r}; "
            "call kvpress.unpatch(model) first"
        )
    info = describe(model)
    if any(hasattr(module, "_kvpress_method") for module in info.attention_modules):
        raise ValueError("this model's attention is already patched by kvpress (through another wrapper); unpatch it first")
    if prefill_chunk_size is not None and (
        not isinstance(prefill_chunk_size, int) or isinstance(prefill_chunk_size, bool) or prefill_chunk_size < 1
    ):
        raise ValueError(f"prefill_chunk_size must be a positive number of tokens, got {prefill_chunk_size!r}")
    if prefill_chunk_size is not None and getattr(model, "generation_config", None) is None:
        raise ValueError("prefill_chunk_size applies to model.generate; this model has no generation_config")
    if decode not in ("eager", "graph"):
        raise ValueError(f"decode must be 'eager' or 'graph' (CUDA-graph decode steps), got {decode!r}")
    runtime = build_runtime(info, method, config, options)  # validates everything before the model is touched

    patcher = Patcher()
    try:
        route_attention(patcher, model, info.attention_modules, runtime)
        runtime.prepare(patcher)
        signature = list(inspect.signature(info.base_model.forward).parameters)
        cache_arg = cache_argument(signature)
        patcher.hook(info.base_model.register_forward_pre_hook(_before_forward(runtime, signature, cache_arg), with_kwargs=True))
        patcher.hook(info.base_model.register_forward_hook(_after_forward(cache_arg), with_kwargs=True))
        if prefill_chunk_size is not None:
            patcher.set(model.generation_config, "prefill_chunk_size", prefill_chunk_size)
        if decode == "graph":
            from .graph import install

            install(patcher, model, runtime)
        patcher.set(model, "_kvpress_patch", PatchState(runtime, patcher))
    except BaseException:
        patcher.undo()
        raise
    return model


def build_runtime(info, method: str | list[str], config, options: dict) -> Method:
    """The runtime of ``method`` (one name, or a prefill method composed with a cache method)."""
    names = method.split("+") if isinstance(method, str) else list(method)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"method must be a method name or a list of them, got {method!r}")
    classes = [get_method(name) for name in names]
    if len(classes) == 1:
        return classes[0](info, config, **options)
    if len(classes) != 2 or not classes[0].prefill_only or classes[1].prefill_only or not issubclass(classes[1], GroupedMethod):
        raise ValueError(
            f"cannot compose {'+'.join(names)!r}: a composition is a sparse prefill method followed by a method "
            "with a grouped cache, e.g. 'minference+duo'"
        )
    configs = config if config is not None else {}
    if not isinstance(configs, dict) or set(configs) - set(names):
        raise TypeError(f"when composing methods, config is a dict from method name ({', '.join(names)}) to its config")
    split = {name: {} for name in names}
    for key, value in options.items():
        owners = [c.name for c in classes if key in {f.name for f in dataclasses.fields(c.config_class)}]
        if len(owners) != 1:
            raise TypeError(f"option {key!r} belongs to {'both' if owners else 'neither'} of {', '.join(names)}")
        split[owners[0]][key] = value
    prefill, cached = (cls(info, configs.get(cls.name), **split[cls.name]) for cls in classes)
    cached.prefill_method = prefill
    cached.name = "+".join(names)
    return cached


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: the model computes exactly what it computed before, with the same modules."""
    state = vars(model).get("_kvpress_patch")
    if not isinstance(state, PatchState):
        raise ValueError("this model is not patched by kvpress (patch it with kvpress.patch(model, method))")
    state.patcher.undo()
    return model


def make_cache(model: torch.nn.Module) -> Cache:
    """An empty cache of the method a model is patched with, to pass to the model or ``generate``."""
    state = vars(model).get("_kvpress_patch")
    if not isinstance(state, PatchState):
        raise ValueError("this model is not patched by kvpress; call kvpress.patch(model, method) first")
    return state.method.new_cache()


def route_attention(patcher: Patcher, model, attention_modules, runtime) -> None:
    """Make every module in ``attention_modules`` call ``runtime.attention`` as its attention function."""
    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, _attention)
    patcher.set(model.config, "_attn_implementation_internal", ATTENTION_NAME)
    for module in attention_modules:
        patcher.set(module, "_kvpress_method", runtime)


@contextmanager
def attention_override(model, runtime):
    """Within the block, the model's attention calls ``runtime.attention(module, q, k, v, mask, **kw)``
    on raw key/value tensors (no kvpress cache): how calibration observes and changes attention."""
    patcher = Patcher()
    try:
        route_attention(patcher, model, describe(model).attention_modules, runtime)
        yield model
    finally:
        patcher.undo()


def _attention(module, query, key, value, attention_mask, **kwargs):
    """The ``"kvpress"`` attention function: runs the method attached to the calling module."""
    method = getattr(module, "_kvpress_method", None)
    if method is None:
        raise RuntimeError(
            "this model uses attn_implementation='kvpress' but is not patched; call kvpress.patch(model, ...) "
            "or model.set_attn_implementation('sdpa')"
        )
    return method.attention(module, query, key, value, attention_mask, **kwargs)


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 names it `cache`; older, `past_key_values`


def cache_argument(signature: list[str]) -> str:
    """The name under which a base model's forward takes its cache."""
    for name in CACHE_ARGUMENTS:
        if name in signature:
            return name
    raise ValueError(f"this model's forward takes no cache argument ({' or '.join(CACHE_ARGUMENTS)}); kvpress cannot patch it")


def given_cache(kwargs: dict):
    """The cache a forward call was given, under either name (the new name wins, as in transformers)."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _before_forward(method: Method, signature: list[str], cache_arg: str):
    def hook(module, args, kwargs):
        kwargs = {**dict(zip(signature, args)), **kwargs}
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return None  # let the model raise its own error
        cache = given_cache(kwargs)
        if cache is None:
            cache = method.new_cache()
        elif not method.owns(cache):
            if not isinstance(cache, Cache) or is_kvpress_cache(cache) or cache.get_seq_length() > 0:
                what = ("a kvpress cache of another patch (of this model before it was unpatched, or of another model)"
                        if is_kvpress_cache(cache) else f"a {type(cache).__name__} that is not empty" if isinstance(cache, Cache)
                        else f"a {type(cache).__name__}, not a transformers Cache")
                raise ValueError(
                    f"the cache passed to this patched model is {what}: pass no cache, an empty transformers Cache, "
                    "or a cache this model made (kvpress.make_cache(model) or the one its last output returned)"
                )
            cache.layers, cache.layer_class_to_replicate = method.make_layers(), None
        begin_forward(cache, kwargs.get("attention_mask"), tokens.shape[0], tokens.shape[1], tokens.device,
                      kwargs.get("position_ids"))
        for name in CACHE_ARGUMENTS:
            kwargs.pop(name, None)
        kwargs[cache_arg] = cache
        return (), kwargs

    return hook


def _after_forward(cache_arg: str):
    def hook(module, args, kwargs, output):
        end_forward(kwargs[cache_arg])

    return hook
