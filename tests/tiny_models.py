"""Tiny random models of every supported family (they build in milliseconds on CPU)."""

import inspect

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvpress.api import cache_argument

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]

SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random ``*ForCausalLM`` of ``family``: 2 layers, 8 query heads, 4 KV heads, head_dim 16."""
    settings = {**SHAPE, **overrides}
    if family == "llama":
        config = LlamaConfig(**settings)
        model_class = LlamaForCausalLM
    elif family == "mistral":
        config = MistralConfig(**{"sliding_window": None, **settings})
        model_class = MistralForCausalLM
    elif family == "qwen2":
        config = Qwen2Config(**settings)  # q/k/v projections with bias
        model_class = Qwen2ForCausalLM
    elif family == "qwen3":
        config = Qwen3Config(**settings)  # per-head q_norm / k_norm
        model_class = Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    # Random norms make the families differ more than their default all-ones init would.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.generation_config.pad_token_id = 0
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, SHAPE["vocab_size"], (batch, length), generator=generator)


def cache_kw(model) -> str:
    """The keyword under which ``model``'s forward takes a cache: ``cache`` from transformers 5.24
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return cache_argument(list(inspect.signature(model.forward).parameters))
