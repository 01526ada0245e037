"""Model-family adapters: one table of facts per supported transformers family.

Everything kvpress needs to know about a model's architecture is read here, once, into a
:class:`ModelInfo`. Methods never look at model classes; they read these facts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class FamilyFacts:
    """Where a family keeps its attention and what its attention does besides Llama's."""

    layers_attr: str = "layers"  # base_model.<layers_attr>[i]
    attention_attr: str = "self_attn"  # decoder_layer.<attention_attr>
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    may_have_bias: bool = False  # q/k/v projections may carry a bias (Qwen2; Llama's attention_bias)
    may_slide: bool = False  # some layers may use a sliding window (passed to attention as `sliding_window`)


FAMILIES: dict[str, FamilyFacts] = {
    "llama": FamilyFacts(may_have_bias=True),
    "mistral": FamilyFacts(may_slide=True),
    "qwen2": FamilyFacts(may_have_bias=True, may_slide=True),
    "qwen3": FamilyFacts(qk_norm=True, may_have_bias=True, may_slide=True),
}


@dataclass(frozen=True)
class ModelShape:
    """The shape fingerprint that per-model config files record and check."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return asdict(self)

    def check_matches(self, other: ModelShape, what: str = "this config") -> None:
        """Raise ``ValueError`` naming every field where ``other`` (the model) differs from ``self``."""
        diffs = [
            f"{name}: {what} has {mine}, the model has {theirs}"
            for name, mine in self.to_dict().items()
            if mine != (theirs := getattr(other, name))
        ]
        if diffs:
            raise ValueError(
                f"{what} was made for a different model ({'; '.join(diffs)}). "
                "Calibrate a config for this model (`kvpress-calibrate ...`) or load the one made for it."
            )


@dataclass
class ModelInfo:
    """A supported model, resolved: its shape, family facts and attention modules in layer order."""

    shape: ModelShape
    facts: FamilyFacts
    base_model: nn.Module
    attention_modules: list[nn.Module]
    layer_windows: list[int | None]  # each layer's own sliding window (tokens), None = full attention

    @property
    def source(self) -> str:
        """The folder (or hub name) the model was loaded from, '' if unknown."""
        return str(getattr(self.base_model.config, "_name_or_path", "") or "")


def describe(model: nn.Module) -> ModelInfo:
    """Resolve a transformers model (``*ForCausalLM`` or the bare ``*Model``) into :class:`ModelInfo`."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(
            f"kvpress does not support model family {family!r} ({type(model).__name__}); "
            f"supported families: {', '.join(sorted(FAMILIES))}."
        )
    facts = FAMILIES[family]
    base_model = model.base_model
    layers = getattr(base_model, facts.layers_attr)
    attention_modules = [getattr(layer, facts.attention_attr) for layer in layers]
    for index, module in enumerate(attention_modules):
        if getattr(module, "layer_idx", index) != index:
            raise ValueError(f"attention module {index} reports layer_idx={module.layer_idx}; expected {index}")
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    shape = ModelShape(
        family=family,
        num_layers=len(attention_modules),
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
    )
    windows = [_sliding_window(module, config, facts) for module in attention_modules]
    return ModelInfo(shape=shape, facts=facts, base_model=base_model, attention_modules=attention_modules,
                     layer_windows=windows)


def _sliding_window(module: nn.Module, config, facts: FamilyFacts) -> int | None:
    """The layer's sliding window: the module's own (Qwen2/Qwen3 per layer), else the config's (Mistral)."""
    if not facts.may_slide:
        return None
    window = module.sliding_window if hasattr(module, "sliding_window") else getattr(config, "sliding_window", None)
    return int(window) if window else None
