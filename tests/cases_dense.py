"""Conformance case of the dense baseline (every head keeps every token)."""

from conformance import ConformanceCase

FP32 = 4


def dense_bytes(model, length: int) -> int:
    config = model.config
    kv = config.num_hidden_layers * 2 * FP32 * config.head_dim * config.num_key_value_heads * length
    return kv + 4 * length + 4  # int32 ranks of every token + the real-token count


CASE = ConformanceCase(
    lossless=lambda model: dict(method="dense"),
    expected_bytes=dense_bytes,
    bad_input=[
        (dict(method="dense", config="/nonexistent/file"), ValueError, "takes no config file"),
        (dict(method="dense", sink=4), TypeError, "unknown option"),
    ],
)
