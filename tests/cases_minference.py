"""Conformance case of MInference: sparse prefill per query head over the dense cache."""

from conformance import ConformanceCase

from kvpress.methods import METHODS
from kvpress.methods.minference import MInference, MInferenceConfig

METHODS.setdefault("minference", MInference)  # until kvpress.methods registers it itself

FP32 = 4
SPARSE_ALWAYS = dict(min_length=0, min_queries=0, max_density=1e9)  # sparse at any length, any number of queries


def mixed(model) -> MInferenceConfig:
    """Even query heads A-shape (2 sinks, 8 recent: lossy at any length), odd heads VS (30, 50)."""
    heads = model.config.num_attention_heads
    layer = {h: ("stream_llm", 2, 8) if h % 2 == 0 else ("vertical_and_slash", 30, 50) for h in range(heads)}
    return MInferenceConfig(patterns=[dict(layer) for _ in range(model.config.num_hidden_layers)])


def dense_bytes(model, length: int) -> int:
    config = model.config
    kv = config.num_hidden_layers * 2 * FP32 * config.head_dim * config.num_key_value_heads * length
    return kv + 4 * length + 4  # the dense cache: int32 ranks of every token + the real-token count


CASE = ConformanceCase(
    # budgets wider than any test input: the index keeps every key
    lossless=lambda model: dict(method="minference", vertical_size=1 << 20, slash_size=1 << 20, **SPARSE_ALWAYS),
    lossy=lambda model: dict(method="minference", config=mixed(model), **SPARSE_ALWAYS),
    chunk_invariant=False,  # each prefill chunk builds its own index from its last 64 queries
    expected_bytes=dense_bytes,
    bad_input=[
        (dict(method="minference", config=MInferenceConfig(patterns=[{}, {}, {}])), ValueError, "patterns for 3 layers"),
        (dict(method="minference", config=MInferenceConfig(patterns=[{9: ("vertical_and_slash", 30, 50)}, {}])),
         ValueError, "query head 9"),
        (dict(method="minference", min_length=2.5), TypeError, "min_length=2.5"),
        (dict(method="minference", max_density=0.0), ValueError, "max_density"),
        (dict(method="minference", sink=4), TypeError, "unknown option"),
    ],
)
