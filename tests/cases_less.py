"""Conformance case of LESS: per-(row, KV head) kept sets under a policy plus a learned fp32 state."""

from kvpress.adapters import describe
from kvpress.methods import METHODS
from kvpress.methods.less import Less, LessConfig
from conformance import ConformanceCase

METHODS.setdefault("less", Less)  # until kvpress.methods registers it
RANK, HIDDEN = 4, 16


def config(model, **budget) -> LessConfig:
    """Untrained maps with the state's scales raised, so that the state changes the output."""
    cfg = LessConfig.random(describe(model).shape, rank=RANK, hidden=HIDDEN, **budget)
    for w in cfg.layers:
        w.k_scale.fill_(0.5)
        w.k_mix_scale.fill_(0.1)
    return cfg


LOSSLESS = dict(policy="lambda", sink=0, recent=4096)  # a budget larger than any test sequence
LOSSY = dict(policy="h2o", sink=2, heavy=3, recent=4)


def less_bytes(model, length: int) -> int:
    c = model.config
    kv, d = c.num_key_value_heads, c.head_dim
    slots = LOSSY["sink"] + LOSSY["heavy"] + LOSSY["recent"] + 1
    per_layer = (2 * 4 * kv * slots * d  # K and V of the slots (fp32)
                 + 2 * 4 * kv * slots  # slot ranks and heavy-hitter scores
                 + 2 * 4 * kv  # spare slot and pending flag
                 + 4 * kv * RANK * (d + 1))  # H and z (fp32)
    return c.num_hidden_layers * per_layer + 4  # + the ledger's real-token count


CASE = ConformanceCase(
    lossless=lambda model: dict(method="less", config=config(model, **LOSSLESS)),
    lossy=lambda model: dict(method="less", config=config(model, **LOSSY)),
    chunk_invariant=False,  # chunked prefill evicts between chunks
    flat=lambda model: dict(method="less", config=config(model, **LOSSY)),
    expected_bytes=less_bytes,
    bad_input=[
        (dict(method="less", config=None), ValueError, "kvpress-calibrate less"),
        (dict(method="less", config=LessConfig(policy="h2o", heavy=4)), ValueError, "no feature maps"),
        (dict(method="less", config=LessConfig(), heavy=2), ValueError, "Lambda policy keeps no heavy"),
        (dict(method="less", config=LessConfig(), recent=2.5), TypeError, "recent=2.5"),
    ],
    families=("llama", "mistral", "qwen2", "qwen3"),
)
