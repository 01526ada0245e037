"""Model-family adapters: one table of facts per supported transformers family.

Everything kvpress needs to know about a model's architecture is read here, once, into a
:class:`ModelInfo`. Methods never look at model classes; they read these facts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
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


@dataclass(frozen=True)
class HeadShard:
    """The heads this process computes in every layer: all of them, or its rank's share under
    transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``),
    where each rank's attention holds a contiguous block of the KV heads and of the query heads that
    read them.

    rank, world_size: this process's block and the number of blocks (1: every head here).
    kv_heads, query_heads: the model's (global) indices of the heads here, in the order the
    attention sees them (its local head ``i`` is global head ``kv_heads[i]``).
    """

    rank: int
    world_size: int
    kv_heads: range
    query_heads: range

    @classmethod
    def whole(cls, shape: ModelShape) -> HeadShard:
        return cls(0, 1, range(shape.num_kv_heads), range(shape.num_heads))

    @property
    def partial(self) -> bool:
        return self.world_size > 1


@dataclass
class ModelInfo:
    """A supported model, resolved: its shape, family facts and attention modules in layer order.

    ``shape`` is the whole model's (the fingerprint config files are checked against); ``heads`` says
    which of its heads this process computes (all of them unless the model is tensor parallel), and
    ``num_heads`` / ``num_kv_heads`` count them: what a method's runtime sizes its cache and configs by.
    """

    shape: ModelShape
    facts: FamilyFacts
    base_model: nn.Module
    attention_modules: list[nn.Module]
    layer_windows: list[int | None]  # each layer's own sliding window (tokens), None = full attention
    heads: HeadShard | None = None  # None: every head (HeadShard.whole)

    def __post_init__(self):
        if self.heads is None:
            self.heads = HeadShard.whole(self.shape)

    @property
    def num_heads(self) -> int:
        """Query heads this process computes per layer (the model's, unless tensor parallel)."""
        return len(self.heads.query_heads)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this process holds per layer (the model's, unless tensor parallel)."""
        return len(self.heads.kv_heads)

    @property
    def local_shape(self) -> ModelShape:
        """``shape`` with the head counts of this process (``shape`` itself unless tensor parallel):
        what a method's runtime sizes its tensors by (never a fingerprint to check files against)."""
        return dataclasses.replace(self.shape, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)

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
                     layer_windows=windows, heads=_head_shard(model, attention_modules, shape))


def _head_shard(model: nn.Module, attention_modules: list[nn.Module], shape: ModelShape) -> HeadShard:
    """The heads this process computes, read from the attention's projections: under tensor
    parallelism ``k_proj``/``q_proj`` hold only the rank's rows (transformers <= 5.2x: plain local
    tensors; newer: DTensors sharded along their rows, whose local part is the rank's)."""
    counts = {(_local_rows(module.q_proj) // shape.head_dim, _local_rows(module.k_proj) // shape.head_dim)
              for module in attention_modules if hasattr(module, "q_proj") and hasattr(module, "k_proj")}
    if not counts:
        return HeadShard.whole(shape)
    if len(counts) > 1:
        raise ValueError(f"the attention modules hold different numbers of (query, KV) heads per layer: {sorted(counts)}")
    ((num_q, num_kv),) = counts
    if (num_q, num_kv) == (shape.num_heads, shape.num_kv_heads):
        return HeadShard.whole(shape)
    world = shape.num_kv_heads // num_kv if num_kv else 0
    if not num_kv or world * num_kv != shape.num_kv_heads or world * num_q != shape.num_heads:
        raise ValueError(
            f"this process's attention holds {num_q} of {shape.num_heads} query heads and {num_kv} of "
            f"{shape.num_kv_heads} KV heads per layer: kvpress supports tensor parallelism that gives every rank "
            "an equal, contiguous block of the KV heads (tp_plan='auto' with a number of ranks that divides the KV heads)"
        )
    rank = _tensor_parallel_rank(model, attention_modules[0].k_proj.weight, world)
    return HeadShard(rank, world, range(rank * num_kv, (rank + 1) * num_kv), range(rank * num_q, (rank + 1) * num_q))


def _local_rows(linear: nn.Module) -> int:
    weight = linear.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0]


def _tensor_parallel_rank(model: nn.Module, weight: torch.Tensor, world: int) -> int:
    """This process's index among the ``world`` ranks that share the heads (its tensor-parallel rank)."""
    mesh, dim = getattr(weight, "device_mesh", None), None
    if mesh is not None:  # a DTensor: the mesh dimension its rows are sharded over
        dim = next((i for i, p in enumerate(weight.placements) if getattr(p, "dim", None) == 0), None)
    else:
        mesh = getattr(model, "_device_mesh", None) or getattr(getattr(model, "base_model", None), "_device_mesh", None)
        if mesh is not None and mesh.ndim > 1:
            dim = (mesh.mesh_dim_names or ()).index("tp") if "tp" in (mesh.mesh_dim_names or ()) else None
        elif mesh is not None:
            dim = 0
    if mesh is not None and dim is not None and mesh.size(dim) == world:
        return mesh.get_local_rank(dim)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() == world:
        return torch.distributed.get_rank()
    raise ValueError(
        f"this model's attention holds 1/{world} of the heads but kvpress cannot tell which (no tensor-parallel "
        "device mesh found): load it with from_pretrained(..., tp_plan='auto') under torchrun"
    )


def _sliding_window(module: nn.Module, config, facts: FamilyFacts) -> int | None:
    """The layer's sliding window: the module's own (Qwen2/Qwen3 per layer), else the config's (Mistral)."""
    if not facts.may_slide:
        return None
    window = module.sliding_window if hasattr(module, "sliding_window") else getattr(config, "sliding_window", None)
    return int(window) if window else None
