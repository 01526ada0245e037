"""What every method provides to ``kvpress.patch``, and the config handling they share.

A method is a :class:`Method` subclass with a typed config dataclass (``config_class``). Its runtime
is built once per patched model: the config is resolved the same way for every method (a config
object, a path to a config file, or None for the method's default), options override its fields
(type-checked), and the model's shape fingerprint is checked. The runtime then makes the cache
layers (``make_layer``, with the token bookkeeping its ``ledger_spec`` asks for), may change
attention modules (``prepare``), and computes attention (``attention``: ``prefill`` for a forward of
several tokens, ``decode`` for one).

Under tensor parallelism each rank's attention holds a share of the heads (``ModelInfo.heads``): the
config, resolved and checked against the whole model, is then cut to the rank's heads by
:func:`select_heads`, from what the config class declares per head (``head_axes``).

Most methods store K/V in head groups (:class:`~kvpress.cache.GroupedLayer`): subclass
:class:`GroupedMethod` and say which KV heads keep every token and which a window. A sparse prefill
method (``full_prefill``) can then serve another grouped method's cache (``"minference+duo"``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache

from .. import kernels
from ..adapters import HeadShard, ModelInfo
from ..cache import GroupedLayer, KVPressLayer, KVView, LedgerSpec, TokenLedger, Window
from ..parallel import DeviceLedger

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "data"


class Method(ABC):
    """A method's runtime for one patched model.

    Built by ``kvpress.patch`` from the model's :class:`ModelInfo`, the method's config and options;
    the constructor validates everything, so a bad config fails before the model is touched.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    # The file a calibrated config is looked up under in the model's own folder (None: not looked up).
    config_file_name: ClassVar[str | None] = None
    # A sparse prefill for groups that keep every token (``full_prefill``), usable before another method.
    prefill_only: ClassVar[bool] = False
    # ``full_prefill(layer_idx, q, k, v, q_rank, k_rank, q_heads, scale, window) -> out``, or None (dense).
    full_prefill = None

    def __init__(self, info: ModelInfo, config: Any = None, **options):
        self.info = info
        config = self.resolve_config(info, config, options)  # checked against the whole model
        if info.heads.partial:  # tensor parallel: this rank's heads only
            config = select_heads(config, info.heads, self.name)
        self.config = config
        self.check_config(self.config)  # against the heads this process computes (info.num_heads, ...)
        self.prefill_method: Method = self  # whose ``full_prefill`` serves this method's prefill

    # -- configs --------------------------------------------------------------------------------

    @classmethod
    def resolve_config(cls, info: ModelInfo, config: Any, options: dict):
        if config is None:
            config = cls.default_config(info)
        elif isinstance(config, (str, os.PathLike)):
            config = cls.config_class.load(config)
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"method {cls.name!r} takes a {cls.config_class.__name__} (or a path to its config file), "
                f"got {type(config).__name__}"
            )
        config = apply_options(config, options, cls.name)
        shape = getattr(config, "model_shape", None)
        if shape is not None:
            shape.check_matches(info.shape, f"this {cls.config_class.__name__}")
        return config

    @classmethod
    def default_config(cls, info: ModelInfo):
        """The config used when ``patch`` gets none: the calibrated file in the model's folder, a
        bundled one for this model, else the method's own fallback (:meth:`fallback_config`)."""
        found = shipped_config_file(cls, info)
        if found is not None:
            return cls.config_class.load(found)
        return cls.fallback_config(info)

    @classmethod
    def fallback_config(cls, info: ModelInfo):
        return cls.config_class()

    def check_config(self, config) -> None:
        """Checks of the config against the model beyond its fingerprint (e.g. per-head tensors' shapes)."""

    # -- the cache ------------------------------------------------------------------------------

    @abstractmethod
    def ledger_spec(self) -> LedgerSpec:
        """The token bookkeeping this method's cache layers need."""

    @abstractmethod
    def make_layer(self, layer_idx: int, ledger: TokenLedger) -> KVPressLayer:
        """The cache layer of one model layer (``owns_ledger`` for the last layer only)."""

    def make_layers(self) -> list[KVPressLayer]:
        ledger = DeviceLedger(self.ledger_spec())
        layers = [self.make_layer(i, ledger) for i in range(self.info.shape.num_layers)]
        for layer in layers:
            layer.method = self
        return layers

    def new_cache(self) -> Cache:
        """An empty cache of this method for the patched model."""
        return Cache(layers=self.make_layers())

    def owns(self, cache: Cache) -> bool:
        return bool(cache.layers) and all(getattr(layer, "method", None) is self for layer in cache.layers)

    # -- the model ------------------------------------------------------------------------------

    def prepare(self, patcher) -> None:
        """Instance-level changes to attention modules beyond the attention function (none by default;
        use ``patcher.set`` / ``patcher.swap_forward`` so that ``unpatch`` restores them)."""

    @abstractmethod
    def attention(self, module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask, **kwargs):
        """The attention function (transformers' AttentionInterface contract): ``query [B, H, Lq, D]``,
        ``key``/``value`` as returned by this method's cache layer; returns ``(out [B, Lq, H, D], None)``."""


class GroupedMethod(Method):
    """A method whose cache layers store K/V in head groups (:class:`~kvpress.cache.GroupedLayer`).

    Subclasses say, per layer, which KV heads keep a sink + recent window (``windowed_heads``);
    the others keep every token. Layers of the model's own sliding window keep only that window.
    """

    def windowed_heads(self, layer_idx: int) -> tuple[torch.Tensor, Window | None]:
        """``([num_kv_heads] bools, window)``: the heads (of this process, ``info.num_kv_heads``) that
        keep only ``window``. Default: none."""
        return torch.zeros(self.info.num_kv_heads, dtype=torch.bool), None

    def head_groups(self, layer_idx: int) -> list[tuple[torch.Tensor, Window | None]]:
        windowed, window = self.windowed_heads(layer_idx)
        own = self.info.layer_windows[layer_idx]
        full_window = Window(0, own) if own is not None else None  # the model's sliding window
        if window is not None and own is not None and window.recent >= own:
            window = full_window  # a recent window as wide as the model's own: the model's window is all it sees
        groups = [(torch.arange(len(windowed))[~windowed], full_window), (torch.arange(len(windowed))[windowed], window)]
        return [(heads, w) for heads, w in groups if len(heads)]

    def ledger_spec(self) -> LedgerSpec:
        spec = LedgerSpec()
        for i in range(self.info.shape.num_layers):
            windows = [w for _, w in self.head_groups(i)]
            spec = spec.merged(LedgerSpec(all_ranks=None in windows, windows=tuple(w for w in windows if w)))
        return spec

    def make_layer(self, layer_idx: int, ledger: TokenLedger) -> GroupedLayer:
        return GroupedLayer(ledger, owns_ledger=layer_idx == self.info.shape.num_layers - 1,
                            groups=self.head_groups(layer_idx))

    def attention(self, module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        if not isinstance(key, KVView):
            raise RuntimeError(
                f"kvpress method {self.name!r} got plain key/value tensors instead of its cache's view: this forward "
                "ran without the patched model's cache (it was replaced or dropped on the way to the attention). "
                "Call the patched model with no cache or with kvpress.make_cache(model)."
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        step = self.decode if query.shape[2] == 1 else self.prefill
        return step(module, query, key, scale, sliding_window).transpose(1, 2), None

    def prefill(self, module, query: torch.Tensor, view: KVView, scale: float, window: int | None) -> torch.Tensor:
        """Attention of a forward of several tokens: windowed groups under their A-shape mask, groups
        that keep every token through the prefill method's ``full_prefill`` (dense causal if None)."""
        full_prefill = self.prefill_method.full_prefill
        if full_prefill is not None:
            full_prefill = functools.partial(full_prefill, module.layer_idx)
        return kernels.grouped_attention(query, view.groups, view.query_rank, scale, window,
                                         new_kv=view.take_new(), full_prefill=full_prefill)

    def decode(self, module, query: torch.Tensor, view: KVView, scale: float, window: int | None) -> torch.Tensor:
        """Attention of one new token per row (the decode kernel also writes it into the cache)."""
        return kernels.grouped_attention(query, view.groups, view.query_rank, scale, window, new_kv=view.take_new())


def shipped_config_file(method: type[Method], info: ModelInfo) -> Path | None:
    """``<model folder>/<config_file_name>``, or one bundled with kvpress under the folder's name
    (``kvpress/data/<method>/<folder name>.*``), if it exists and was made for this model's shape."""
    source = Path(info.source) if info.source else None
    if source is None or method.config_file_name is None:
        return None
    candidates = [source / method.config_file_name, *sorted((SHIPPED_CONFIGS / method.name).glob(f"{source.name}.*"))]
    for candidate in candidates:
        if candidate.exists():
            shape = getattr(method.config_class.load(candidate), "model_shape", None)
            if shape in (None, info.shape):
                return candidate
    return None


# -- heads under tensor parallelism -------------------------------------------------------------


@dataclass(frozen=True)
class HeadAxis:
    """Where a config field holds one entry per head, for :func:`select_heads`.

    kind: ``"kv"`` (an entry per KV head) or ``"query"`` (per query head).
    dim: the tensor dimension that runs over the heads.
    keyed: the value is a dict keyed by head index (kept for the rank's heads, renumbered locally).
    A list or tuple value (e.g. one entry per layer) is cut element by element.
    """

    kind: str
    dim: int = 0
    keyed: bool = False


def select_heads(config, heads: HeadShard, method: str = "this method"):
    """``config`` cut to the heads ``heads`` (a tensor-parallel rank's share of every layer's heads).

    The config class declares its per-head fields in ``head_axes``: a dict from field name to a
    :class:`HeadAxis`, or, for a field holding a structure (a dataclass or dict per layer), to a dict
    from the structure's parts to their specs. ``head_axes = {}`` says nothing needs cutting; a config
    whose per-head decisions depend on other heads (a ranking over the whole model) first makes them
    head by head in ``per_head_form()``. A class may instead define ``select_heads(kv_heads,
    query_heads)`` itself (index lists of global heads) when its layout needs more than axes."""
    index = {"kv": list(heads.kv_heads), "query": list(heads.query_heads)}
    if hasattr(config, "select_heads"):
        return config.select_heads(index["kv"], index["query"])
    axes = getattr(config, "head_axes", None)
    if axes is None:
        raise ValueError(
            f"method {method!r} cannot run under tensor parallelism yet: {type(config).__name__} does not declare "
            "which of its fields hold one entry per head (head_axes), so it cannot be cut to this rank's heads. "
            "Load the model without tp_plan (device_map='auto' spreads it over several GPUs instead)."
        )
    if hasattr(config, "per_head_form"):
        config = config.per_head_form()
    cut = {name: _take_heads(getattr(config, name), spec, index) for name, spec in axes.items()}
    return dataclasses.replace(config, **cut) if cut else config


def _take_heads(value, spec, index: dict):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(_take_heads(v, spec, index) for v in value)
    if isinstance(spec, dict):  # a structure: cut its named parts
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(value, **{k: _take_heads(getattr(value, k), s, index) for k, s in spec.items()})
        return {**value, **{k: _take_heads(value[k], s, index) for k, s in spec.items() if k in value}}
    heads = index[spec.kind]
    if spec.keyed:
        return {local: value[glob] for local, glob in enumerate(heads) if glob in value}
    if isinstance(value, torch.Tensor):
        return value.index_select(spec.dim, torch.tensor(heads, device=value.device))
    raise TypeError(f"cannot cut a {type(value).__name__} to a rank's heads (HeadAxis applies to tensors, lists and dicts)")


# -- options ------------------------------------------------------------------------------------


def apply_options(config, options: dict, method: str):
    """``config`` with ``options`` replacing fields (type-checked; its own ``with_options`` if it has one)."""
    names = {f.name for f in dataclasses.fields(config)}
    if unknown := set(options) - names:
        raise TypeError(
            f"unknown option(s) for method {method!r}: {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(names))}"
        )
    check_field_types(type(config), options, method)
    if options:
        config = config.with_options(**options) if hasattr(config, "with_options") else dataclasses.replace(config, **options)
    check_field_types(type(config), {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, method)
    return config


def check_field_types(config_class: type, values: dict, method: str) -> None:
    """Raise ``TypeError`` for a value whose type does not match its field's annotation (int, float,
    bool, str and optional ones; other annotations are the config's own business)."""
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _matches(value, hint):
            raise TypeError(
                f"{method!r} option {name}={value!r} has the wrong type: expected {_describe(hint)}, "
                f"got {type(value).__name__}"
            )


def _arms(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value, hint) -> bool:
    for arm in _arms(hint):
        if arm is type(None):
            if value is None:
                return True
        elif arm is bool:
            if isinstance(value, bool):
                return True
        elif arm is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif arm is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif arm is str:
            if isinstance(value, str):
                return True
        else:
            return True  # not a simple type: not checked here
    return False


def _describe(hint) -> str:
    return " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a)) for a in _arms(hint))
