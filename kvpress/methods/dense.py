"""The dense baseline: every KV head keeps every token, attention through kvpress's kernels.

``kvpress.patch(model, "dense")`` computes what the unpatched model computes (to kernel rounding)
with the same cache and kernel machinery as the compressing methods, so that every benchmark and
test can compare a method with the full cache measured the same way. Layers of the model's own
sliding window keep only their window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import GroupedMethod


@dataclass
class DenseConfig:
    """The dense method has no settings."""

    head_axes: ClassVar[dict] = {}  # nothing per head: runs unchanged on a tensor-parallel rank's heads

    @classmethod
    def load(cls, path) -> DenseConfig:
        raise ValueError("the dense method takes no config file; call kvpress.patch(model, 'dense')")


class Dense(GroupedMethod):
    """Full cache of every KV head (the baseline of every comparison)."""

    name = "dense"
    config_class = DenseConfig
