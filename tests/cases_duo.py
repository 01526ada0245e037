"""Conformance case of DuoAttention: retrieval heads keep every token, streaming heads sink + recent."""

import torch

import kvpress
from conformance import ConformanceCase

FP32, SINK, RECENT = 4, 4, 8


def gates(model, retrieval) -> kvpress.DuoConfig:
    """``retrieval``: True (all retrieval), False (all streaming) or "half" (alternate KV heads)."""
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    if retrieval == "half":
        mask = (torch.arange(heads)[None] + torch.arange(layers)[:, None]) % 2 == 0
    else:
        mask = torch.full((layers, heads), retrieval)
    return kvpress.DuoConfig.from_retrieval_mask(mask, sink=SINK, recent=RECENT)


def duo_bytes(model, length: int) -> int:
    config = model.config
    heads = config.num_key_value_heads
    window = SINK + RECENT + kvpress.cache.window_slack(SINK, RECENT)  # compacted after the prefill, + slack
    per_head_token = 2 * FP32 * config.head_dim
    kv = config.num_hidden_layers * per_head_token * (heads // 2 * length + heads // 2 * window)
    return kv + 4 * length + 4 + 4 * window  # ranks of every token, real-token count, window ranks


CASE = ConformanceCase(
    lossless=lambda model: dict(method="duo", config=gates(model, True)),
    lossy=lambda model: dict(method="duo", config=gates(model, "half")),
    flat=lambda model: dict(method="duo", config=gates(model, False)),
    expected_bytes=duo_bytes,
    bad_input=[
        (dict(method="duo", config=kvpress.DuoConfig(gates=torch.ones(3, 4))), ValueError, "3 layers x 4 KV heads"),
        (dict(method="duo", config=kvpress.DuoConfig(gates=torch.ones(2, 4)), sink=2.5), TypeError, "sink=2.5"),
        (dict(method="duo", config=kvpress.DuoConfig(gates=torch.ones(2, 4)), recent="256"), TypeError, "recent='256'"),
        (dict(method="duo", config=kvpress.DuoConfig(gates=torch.ones(2, 4)), sparsity=1.5), ValueError, "sparsity must be in"),
        (dict(method="duo", config=kvpress.DuoConfig(gates=torch.ones(2, 4)), window=3), TypeError, "unknown option"),
    ],
)
