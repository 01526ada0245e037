"""kvpress methods: one module per method, each with its config dataclass and runtime."""

from .base import GroupedMethod, Method
from .dense import Dense, DenseConfig
from .duo import DuoAttention, DuoConfig
from .less import Less, LessConfig
from .minference import MInference, MInferenceConfig
from .palu import Palu, PaluConfig

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Dense, DuoAttention, MInference, Palu, Less)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown kvpress method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = [
    "METHODS", "Dense", "DenseConfig", "DuoAttention", "DuoConfig", "GroupedMethod", "Less", "LessConfig",
    "MInference", "MInferenceConfig", "Method", "Palu", "PaluConfig", "get_method",
]
