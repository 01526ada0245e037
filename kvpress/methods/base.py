"""What every method provides to ``kvpress.patch``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from transformers.cache_utils import Cache

from ..adapters import ModelInfo
from ..cache import KVPressLayer, TokenLedger


class Method(ABC):
    """A method's runtime for one patched model.

    Built by ``kvpress.patch`` from the model's :class:`ModelInfo`, the method's config and options;
    the constructor validates everything, so a bad config fails before the model is touched.
    """

    name: ClassVar[str]

    def __init__(self, info: ModelInfo):
        self.info = info

    @abstractmethod
    def make_ledger(self) -> TokenLedger:
        """The token bookkeeping this method's cache layers need."""

    @abstractmethod
    def make_layer(self, layer_idx: int, ledger: TokenLedger) -> KVPressLayer:
        """The cache layer of one model layer."""

    @abstractmethod
    def attention(self, module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask, **kwargs):
        """The attention function (transformers' AttentionInterface contract): ``query [B, H, Lq, D]``,
        ``key``/``value`` as returned by this method's cache layer; returns ``(out [B, Lq, H, D], None)``."""

    def patch_modules(self, patcher) -> None:
        """Instance-level changes to attention modules beyond the attention function (none by default)."""

    def make_layers(self) -> list[KVPressLayer]:
        ledger = self.make_ledger()
        layers = [self.make_layer(i, ledger) for i in range(self.info.shape.num_layers)]
        for layer in layers:
            layer.method = self
        return layers

    def new_cache(self) -> Cache:
        """An empty cache of this method for the patched model."""
        return Cache(layers=self.make_layers())

    def owns(self, cache: Cache) -> bool:
        return bool(cache.layers) and all(getattr(layer, "method", None) is self for layer in cache.layers)
