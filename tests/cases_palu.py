"""Conformance case of Palu: a latent cache (pre-RoPE low-rank latents of every token)."""

from conformance import ConformanceCase

from kvpress.methods import METHODS
from kvpress.methods.palu import Palu

METHODS.setdefault("palu", Palu)  # until kvpress.methods registers it itself

FP32 = 4
LOSSY = dict(method="palu", rank_ratio=0.5, group_size=2)  # plain SVD factors from the weights, half rank


def palu_bytes(model, length: int) -> int:
    """Half-rank latents of keys and values (groups of 2 KV heads, rank = 2 * D / 2 per group), the
    rope rows of every token (cos and sin, D / 2 each, shared by the layers), their ranks and the
    real-token count."""
    config = model.config
    groups = config.num_key_value_heads // 2
    latents = config.num_hidden_layers * 2 * groups * config.head_dim * length * FP32
    return latents + config.head_dim * length * FP32 + 4 * length + 4


CASE = ConformanceCase(
    lossless=lambda model: dict(method="palu"),  # no config: exact factors (identity up-projection)
    lossy=lambda model: dict(LOSSY),
    expected_bytes=palu_bytes,
    bad_input=[
        (dict(method="palu", bits=5), ValueError, "bits must be"),
        (dict(method="palu", group_size=3), ValueError, "does not divide"),
        (dict(method="palu", rank_ratio="0.5"), TypeError, "rank_ratio='0.5'"),
        (dict(method="palu", rank_ratio=0.0), ValueError, "rank_ratio must be"),
        (dict(method="palu", sink=4), TypeError, "unknown option"),
    ],
)
