"""Palu (Chang et al., 2024, arXiv 2407.21118): a low-rank latent KV cache.

Each layer's ``k_proj`` and ``v_proj`` are factored per group of ``group_size`` KV heads into
``down`` (hidden -> rank) and ``up`` (rank -> the group's heads); the cache stores only the latents
``x @ down.T`` of every token, *before* RoPE (optionally quantised to 2-4 bits), plus the rope rows of
their positions (``cos``/``sin``, one pair of buffers per device shared by the layers). See
``kvpress.kernels.palu_reference`` for the layout and the math,
``kvpress.calibration.palu`` for how the factors are made.

transformers applies RoPE before ``cache.update``, so Palu cannot work through the attention
function alone: ``prepare`` replaces each attention module's forward (instance level, undone exactly
by ``unpatch``) with :func:`palu_forward`: project queries (q_norm, RoPE as the model does) and
latents, append the latents to the cache, attend, ``o_proj``. Prefill (several new tokens) rebuilds
keys (bias, k_norm, RoPE at each token's position) and values for every cached token and runs the
dense path of ``kvpress.kernels``; decode (one new token) runs the fused Triton kernel
``kvpress.kernels.palu`` on CUDA, which rebuilds and rotates keys block by block and attends the
value latents directly (values are up-projected once per query head after the softmax: no value is
rebuilt per token, and o_proj keeps its size). With ``decode="graph"`` the decode steps run in CUDA
graphs (the cache layers run static decode steps: :class:`PaluLayer`); prefill stays eager.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import kernels
from ..adapters import ModelShape
from ..cache import AppendBuffer, HeadGroup, KVPressLayer, LedgerSpec, TokenLedger
from ..configfile import load_config_folder, save_config_folder
from ..graph import concatenate, intact_join
from ..kernels import fused as ops
from ..kernels import palu_reference as ref
from .base import Method

try:
    from ..kernels import palu as palu_kernels
except ImportError:  # no usable triton: the reference serves every step
    palu_kernels = None

log = logging.getLogger("kvpress")

CONFIG_DIR_NAME = "kvpress-palu"  # looked up in the model's own folder


@dataclass
class PaluConfig:
    """Palu's factors and runtime settings.

    Args:
        factors: per layer ``i``, ``"{i}.k.down" [G * rk, hidden]``, ``"{i}.k.up" [G, gs * D, rk]`` and
            the same for ``v`` (``G`` head groups of ``gs = group_size`` KV heads; ``rk``/``rv`` latent
            ranks per group). Empty: made from the model's weights at patch time (exact at
            ``rank_ratio=1.0``, plain truncated SVD with uniform ranks below; calibrate instead).
        group_size: KV heads per head group (G-LRD; the paper's default 4; all heads when fewer).
        bits: quantise cached latents to 2, 3 or 4 bits (per-token asymmetric, Hadamard-rotated), or
            None to keep them in the model's dtype.
        quant_group: latent channels sharing one scale and minimum when quantised (divides the ranks).
        hadamard: fold a Hadamard rotation into the factors when quantising (spreads the outliers
            SVD puts in the leading channels).
        rank_ratio: kept fraction of the full rank when ``factors`` is empty (1.0 = lossless).
        rank_multiple: rank granularity of factors made at patch time.
        model_shape: the model the factors were made for (checked at patch time).
        calibration: what made the factors (options, ranks, scores); informative only.
    """

    factors: dict = field(default_factory=dict)
    group_size: int = 4
    bits: int | None = None
    quant_group: int = 32
    hadamard: bool = True
    rank_ratio: float = 1.0
    rank_multiple: int = 8
    model_shape: ModelShape | None = None
    calibration: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"PaluConfig.group_size must be >= 1 KV heads, got {self.group_size}")
        if self.bits is not None and self.bits not in (2, 3, 4):
            raise ValueError(f"PaluConfig.bits must be None, 2, 3 or 4, got {self.bits}")
        if self.quant_group < 1:
            raise ValueError(f"PaluConfig.quant_group must be >= 1 latent channels, got {self.quant_group}")
        if not 0.0 < self.rank_ratio <= 1.0:
            raise ValueError(f"PaluConfig.rank_ratio must be in (0, 1], got {self.rank_ratio}")
        if self.rank_multiple < 1:
            raise ValueError(f"PaluConfig.rank_multiple must be >= 1, got {self.rank_multiple}")
        for name, t in self.factors.items():
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                raise ValueError(f"PaluConfig.factors[{name!r}] must be a 2D (down) or 3D (up) tensor")

    def select_heads(self, kv_heads: list[int], query_heads: list[int]) -> PaluConfig:
        """The factors of a tensor-parallel rank's KV heads (``kvpress.methods.base.select_heads``): its
        whole head groups, ``*.up [G, gs * D, r]`` along the groups, ``*.down [G * r, hidden]`` along
        their rows."""
        if not self.factors:
            raise ValueError("Palu under tensor parallelism needs its factors made on one device: run "
                             "`kvpress-calibrate palu --model MODEL --out DIR` there and pass config=DIR")
        first, count = kv_heads[0], len(kv_heads)
        groups = self.factors["0.k.up"].shape[0]
        gs = self.model_shape.num_kv_heads // groups if self.model_shape else self.group_size  # KV heads per group
        if first % gs or count % gs:
            raise ValueError(f"Palu head groups of {gs} KV heads straddle this rank's KV heads {first}-{first + count - 1}; "
                             "make factors with a group_size that divides the KV heads of a rank")
        g0, g1 = first // gs, (first + count) // gs
        factors = {}
        for name, t in self.factors.items():
            rank = self.factors[name.rsplit(".", 1)[0] + ".up"].shape[-1]
            factors[name] = t[g0:g1] if name.endswith(".up") else t[g0 * rank:g1 * rank]
        return dataclasses.replace(self, factors=factors)

    @property
    def num_layers(self) -> int:
        return len({name.split(".")[0] for name in self.factors})

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """``{"k.down", "k.up", "v.down", "v.up"}`` of layer ``i``."""
        try:
            return {part: self.factors[f"{i}.{part}"] for part in ("k.down", "k.up", "v.down", "v.up")}
        except KeyError as missing:
            raise ValueError(f"this PaluConfig has no factor {missing} for layer {i}; re-run the calibration") from None

    def ranks(self) -> dict[str, list[int]]:
        """Latent rank per head group, per layer, for keys and values."""
        return {side: [self.factors[f"{i}.{side}.up"].shape[-1] for i in range(self.num_layers)] for side in "kv"}

    def kept_ratio(self) -> float:
        """Cached latent values / the dense cache's K/V values (before quantisation)."""
        if not self.factors:
            return self.rank_ratio
        kept = full = 0
        for i in range(self.num_layers):
            for side in "kv":
                up = self.factors[f"{i}.{side}.up"]
                kept += up.shape[0] * up.shape[2]
                full += up.shape[0] * up.shape[1]
        return kept / full

    # -- files ----------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the config folder (``palu.json`` + ``palu.safetensors``; see
        :func:`kvpress.configfile.save_config_folder`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("factors", "model_shape", "calibration")}
        return save_config_folder(path, "palu", self.factors, fields, self.model_shape,
                                  ranks=self.ranks() if self.factors else None, kept_ratio=self.kept_ratio(),
                                  calibration=self.calibration)

    @classmethod
    def load(cls, path, **options) -> PaluConfig:
        """Read a folder written by :meth:`save` (``kvpress-calibrate palu --out DIR``)."""
        factors, fields, shape, meta = load_config_folder(path, "palu")
        return cls(factors=factors, model_shape=shape, calibration=meta.get("calibration", {}), **{**fields, **options})


# -- runtime ----------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """One layer's factors on the model's device and dtype, and what rebuilding needs."""

    down: torch.Tensor  # [G * rk + G * rv, hidden]: the key then the value latents' projection (one GEMM)
    k_up: torch.Tensor  # [G, gs * D, rk]
    v_up: torch.Tensor  # [G, gs * D, rv]
    k_quant: ref.QuantSpec | None
    v_quant: ref.QuantSpec | None
    k_bias: torch.Tensor | None  # [Hkv * D]
    v_bias: torch.Tensor | None
    k_norm: tuple[torch.Tensor, float] | None  # Qwen3 per-head RMSNorm (weight [D], eps)
    window: int | None  # the model's sliding window of this layer

    @property
    def groups(self) -> int:
        return self.k_up.shape[0]

    @property
    def ranks(self) -> list[int]:
        return [self.k_up.shape[-1], self.v_up.shape[-1]]

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value latents ``[B, G, n, r]`` of hidden states ``x [B, n, hidden]``: one GEMM over both
        down projections."""
        return ref.project(x, self.down, self.groups, self.ranks)


@dataclass
class PaluView:
    """What a Palu cache layer holds after appending a forward's latents."""

    k: ref.Latents  # [B, G, T, .] every cached token, the new ones included
    v: ref.Latents
    cos: torch.Tensor  # [B, T, D / 2] the rope rows at each token's position (palu_reference.rope_rows)
    sin: torch.Tensor
    rank: torch.Tensor  # [B, T] int32 token ranks
    query_rank: torch.Tensor  # [B, n]
    length: torch.Tensor | None = None  # [1] int32 on the device: slots in use (static decode steps); None: all T


RopeAt = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (positions [B, n], slots) -> rows


class PaluLayer(KVPressLayer):
    """Latent cache of one layer: key and value latents ``[B, G, T, r]`` (or packed codes and
    scales/minima) in append buffers. The rope rows of the tokens' positions, ``cos``/``sin [B, T, D / 2]``,
    are one pair of buffers shared by every layer of the cache on one device, written by the first
    layer there (``rope_at`` set: the runtime's tables at the new tokens' positions): the decode kernel
    loads them by slot, as it loads the latents, a block ahead (gathering table rows at positions loaded
    in the same step kept it waiting on memory: docs/palu.md).

    Static decode steps (``decode="graph"``, ``kvpress.graph``): the new token's latents (and
    rope rows) are written at the slot the device count gives, the attention gets the whole storages
    with that count (the kernel stops there; the reference masks the ranks beyond it), and the host
    lengths advance after the step. Slots past the filled part are zeroed whenever the buffers are
    prepared, so that no uninitialised value is ever read."""

    static_decode = True

    def __init__(self, ledger: TokenLedger, owns_ledger: bool, plan: LayerPlan,
                 rope: tuple[AppendBuffer, AppendBuffer], rope_at: RopeAt | None):
        super().__init__(ledger, owns_ledger)
        self.plan = plan
        self.buffers = {name: AppendBuffer(dim=2) for name in ("k", "k_sm", "v", "v_sm")}
        self.rope = rope
        self.rope_at = rope_at  # None: another layer on this device writes the shared rope rows

    def update(self, key_latents: torch.Tensor, value_latents: torch.Tensor, *args, **kwargs) -> PaluView:
        """Append the latents ``[B, G, n, r]`` of a forward's new tokens (quantised here when set)."""
        if not self.is_initialized:
            self.lazy_initialization(key_latents, value_latents)
        step = self.ledger.current(key_latents.device)
        if step.lengths is not None:
            return self._static_update(step, key_latents, value_latents)
        if self.ledger.recovering:  # drop what a forward that failed half-way appended
            full, _ = self.ledger.committed()
            for buffer in self._written_buffers():
                buffer.truncate(full)
        if self.rope_at is not None:
            for buffer, rows in zip(self.rope, self.rope_at(step.positions, self.ledger.seen + step.new_rank.shape[1])):
                buffer.append(rows)
        sides = []
        for side, h, spec in (("k", key_latents, self.plan.k_quant), ("v", value_latents, self.plan.v_quant)):
            if spec is None:
                sides.append(ref.Latents(self.buffers[side].append(h), h.shape[-1]))
            else:
                words, scale_min = _quantize(h, spec)
                sides.append(ref.Latents(self.buffers[side].append(words), h.shape[-1], spec,
                                         self.buffers[side + "_sm"].append(scale_min)))
        return PaluView(sides[0], sides[1], self.rope[0].tensor, self.rope[1].tensor, step.all_rank, step.new_rank)

    def _written_buffers(self) -> list[AppendBuffer]:
        """The buffers this layer appends to: its latents, and the shared rope rows when it writes them."""
        return [*self.buffers.values(), *(self.rope if self.rope_at is not None else ())]

    def held_tensors(self) -> list[torch.Tensor]:
        return [b.storage for b in (*self.buffers.values(), *self.rope) if b.storage is not None]

    # -- static decode steps (kvpress.graph) ----------------------------------------------------

    def _static_buffers(self) -> list[AppendBuffer]:
        return [b for b in self._written_buffers() if b.storage is not None]

    def _static_update(self, step, key_latents: torch.Tensor, value_latents: torch.Tensor) -> PaluView:
        """A static decode step: write the new latents at slot ``length - 1`` (device count), view the
        whole storages."""
        length, slot = step.lengths[None], step.slot
        if self.rope_at is not None:  # the tables cover every slot of the buffers (a captured step reads them)
            for buffer, rows in zip(self.rope, self.rope_at(step.positions, self.rope[0].capacity)):
                buffer.storage.index_copy_(1, slot, rows)
        sides = []
        for side, h, spec in (("k", key_latents, self.plan.k_quant), ("v", value_latents, self.plan.v_quant)):
            buffer = self.buffers[side]
            if spec is None:
                buffer.storage.index_copy_(2, slot, h.to(buffer.storage.dtype))
                sides.append(ref.Latents(buffer.storage, h.shape[-1]))
            else:
                scales = self.buffers[side + "_sm"]
                _quantize_at(h, spec, buffer.storage, scales.storage, slot)
                sides.append(ref.Latents(buffer.storage, h.shape[-1], spec, scales.storage))
        return PaluView(sides[0], sides[1], self.rope[0].storage, self.rope[1].storage, step.all_rank, step.new_rank,
                        length)

    def prepare_static(self) -> int:
        needed, capacity = self.ledger.static_room(None)
        steps = 1 << 30
        for buffer in self._static_buffers():
            if buffer.capacity < needed:
                buffer.ensure_capacity(capacity)
                self.ledger.epoch += 1
            if buffer.capacity > buffer.length:  # never read uninitialised slots (a NaN times a zero weight)
                buffer.storage.narrow(buffer.dim, buffer.length, buffer.capacity - buffer.length).zero_()
            steps = min(steps, buffer.capacity - self.ledger.seen)
        return steps

    def static_tensors(self) -> list[torch.Tensor]:
        return [b.storage for b in self._static_buffers()]

    def advance_static(self, kept: dict) -> None:
        for buffer in self._static_buffers():
            buffer.length += 1

    def select_batch(self, index: torch.Tensor) -> None:
        for buffer in self._written_buffers():
            buffer.select_batch(index)


class Palu(Method):
    """Palu runtime: latent cache layers, the replaced attention forward, rebuild + dense prefill and
    the fused decode kernel."""

    name = "palu"
    config_class = PaluConfig
    config_file_name = CONFIG_DIR_NAME

    def check_config(self, config: PaluConfig) -> None:
        info, shape = self.info, self.info.local_shape  # this process's heads (a tensor-parallel rank's share)
        gs = min(config.group_size, shape.num_kv_heads)
        if shape.num_kv_heads % gs:
            raise ValueError(f"Palu group_size {gs} does not divide the model's {shape.num_kv_heads} KV heads; choose a divisor")
        if not config.factors:
            from ..calibration.palu import factors_from_weights

            if config.rank_ratio < 1.0:
                log.warning(
                    "Palu without calibrated factors: plain SVD at %.0f%% rank with uniform ranks. For whitened "
                    "factors and Fisher rank allocation run: kvpress-calibrate palu --model MODEL --out DIR",
                    100 * config.rank_ratio,
                )
            factors = factors_from_weights(info.base_model, gs, config.rank_ratio, config.rank_multiple)
            config = self.config = dataclasses.replace(config, factors=factors, group_size=gs, model_shape=info.shape)
        elif config.num_layers != shape.num_layers:
            raise ValueError(f"this PaluConfig has factors for {config.num_layers} layers, the model has {shape.num_layers}")
        self.plans = [self._plan(i, module, config) for i, module in enumerate(info.attention_modules)]
        self._rope = weakref.WeakKeyDictionary()  # ledger -> {device: the rope rows its layers there share}
        self._tables: dict = {}  # (device, dtype) -> (cos, sin) [P, D / 2]

    def _plan(self, i: int, module, config: PaluConfig) -> LayerPlan:
        shape = self.info.local_shape
        weight = module.k_proj.weight
        factors = config.layer(i)
        groups = factors["k.up"].shape[0]
        for side in "kv":
            up, down = factors[f"{side}.up"], factors[f"{side}.down"]
            expected_up = (groups, shape.num_kv_heads * shape.head_dim // groups, up.shape[-1])
            if tuple(up.shape) != expected_up or tuple(down.shape) != (groups * up.shape[-1], weight.shape[1]) \
                    or shape.num_kv_heads % groups:
                raise ValueError(
                    f"Palu factors of layer {i} ({side}: up {tuple(up.shape)}, down {tuple(down.shape)}) do not fit the "
                    f"model ({shape.num_kv_heads} KV heads of {shape.head_dim}, hidden {weight.shape[1]}); use the config "
                    "made for this model"
                )
        on = dict(device=weight.device, dtype=weight.dtype)
        parts, quants = {}, {}
        for side in "kv":
            up, down = factors[f"{side}.up"].double(), factors[f"{side}.down"].double()
            rank = up.shape[-1]
            quants[side] = None
            if config.bits is not None:
                quants[side] = ref.QuantSpec(config.bits, math.gcd(rank, config.quant_group))
                if config.hadamard:  # latent h R: down <- R^T down per group, up <- up R
                    rot = ref.hadamard(rank, dtype=torch.float64)
                    up = up @ rot
                    down = torch.cat([rot.T @ block for block in down.split(rank)])
            parts[side] = (up.to(**on).contiguous(), down.to(**on).contiguous())
        norm = getattr(module, "k_norm", None) if self.info.facts.qk_norm else None
        return LayerPlan(
            down=torch.cat([parts["k"][1], parts["v"][1]]), k_up=parts["k"][0], v_up=parts["v"][0],
            k_quant=quants["k"], v_quant=quants["v"],
            k_bias=_bias(module.k_proj), v_bias=_bias(module.v_proj),
            k_norm=(norm.weight.detach(), float(norm.variance_epsilon)) if norm is not None else None,
            window=self.info.layer_windows[i],
        )

    # -- the cache ------------------------------------------------------------------------------

    def ledger_spec(self) -> LedgerSpec:
        return LedgerSpec(all_ranks=True, positions=True)

    def make_layer(self, layer_idx: int, ledger: TokenLedger) -> PaluLayer:
        # one pair of rope-row buffers per device the layers run on (device_map), written by the first layer there
        shared = self._rope.setdefault(ledger, {})
        plan = self.plans[layer_idx]
        device = plan.k_up.device
        rope_at = None if device in shared else functools.partial(self.rope_rows, dtype=plan.k_up.dtype)
        rope = shared.setdefault(device, (AppendBuffer(dim=1), AppendBuffer(dim=1)))
        return PaluLayer(ledger, owns_ledger=layer_idx == self.info.shape.num_layers - 1, plan=plan, rope=rope,
                         rope_at=rope_at)

    # -- the model ------------------------------------------------------------------------------

    def prepare(self, patcher) -> None:
        for module, plan in zip(self.info.attention_modules, self.plans):
            patcher.swap_forward(module, palu_forward)
            # the query projection and the latents' down projections as one GEMM (q_proj's weight a view of it);
            # not under tensor parallelism, where the projections are sharded and hooked
            if not self.info.heads.partial and concatenate(patcher, module, "_kvpress_q_latents", [module.q_proj], [plan.down]):
                plan.down = vars(module)["_kvpress_q_latents"].extra[0]

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        raise RuntimeError(
            "Palu replaces the attention modules' forward; its attention function is not called by a patched model. "
            "Call the patched model itself (model(...) or model.generate(...))"
        )

    def rope_rows(self, positions: torch.Tensor, slots: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rope rows ``cos``/``sin [B, n, D / 2]`` at the new tokens' ``positions [B, n]``, from half
        tables (``[P, D / 2]`` per device and dtype, grown by doubling) that cover positions up to ``slots``
        (the tokens cached, or at a static decode step every slot of the buffers: a captured step keeps
        reading the same tables until the buffers grow, which captures it again) and, at a prefill, the
        largest new position (one host sync per forward, not per step)."""
        key = (positions.device, dtype)
        needed = slots + 1
        if positions.shape[-1] > 1:
            needed = max(needed, int(positions.max()) + 2)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < needed:
            length = max(1024, 1 << (needed - 1).bit_length())
            rotary = self.info.base_model.rotary_emb
            table = ref.rope_half_tables(rotary, length, self.info.shape.head_dim, positions.device, dtype)
            self._tables[key] = table
        return ref.rope_rows(positions, *table)

    def attend(self, module, q: torch.Tensor, view: PaluView, plan: LayerPlan) -> torch.Tensor:
        """Attention ``[B, Hq, n, D]`` of post-RoPE queries over the layer's latent cache."""
        scale = getattr(module, "scaling", q.shape[-1] ** -0.5)
        args = dict(q=q, k=view.k, v=view.v, k_up=plan.k_up, v_up=plan.v_up, positions=None, cos=view.cos,
                    sin=view.sin, q_rank=view.query_rank, k_rank=view.rank, scale=scale, k_bias=plan.k_bias,
                    v_bias=plan.v_bias, k_norm=plan.k_norm, window=plan.window)
        if q.shape[2] == 1:
            if _use_kernel(q):
                if palu_kernels.supported(q, view.k, view.v, plan.k_up.shape[1] // q.shape[-1]):
                    return palu_kernels.palu_decode(**args, length=view.length)
                _warn_torch_decode(q, view.k.rank, plan.k_up.shape[1] // q.shape[-1])
            if view.length is not None:  # a static step over whole buffers: slots past the count are not tokens
                slots = torch.arange(view.rank.shape[-1], device=view.rank.device)
                args["k_rank"] = torch.where(slots < view.length, view.rank, -1)
            return ref.latent_attention(**args)
        keys = ref.rebuild_keys(view.k, plan.k_up, None, view.cos, view.sin, plan.k_bias, plan.k_norm).to(q.dtype)
        values = ref.rebuild(view.v.values(), plan.v_up, plan.v_bias, q.shape[-1]).to(q.dtype)
        heads = torch.arange(keys.shape[1], device=q.device)
        full_prefill = self.prefill_method.full_prefill
        if full_prefill is not None:
            full_prefill = functools.partial(full_prefill, module.layer_idx)
        return kernels.grouped_attention(q, [HeadGroup(heads, keys, values, view.rank)], view.query_rank, scale,
                                         plan.window, full_prefill=full_prefill)


def palu_forward(module, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """The attention forward of a module patched with Palu (replaces ``LlamaAttention.forward`` and its
    Mistral / Qwen2 / Qwen3 twins at instance level): the model's query path, latents into the cache,
    attention over the latent cache, ``o_proj``."""
    runtime = getattr(module, "_kvpress_method", None)
    if not isinstance(runtime, Palu):
        raise RuntimeError("this attention module's Palu forward has lost its runtime; kvpress.unpatch(model) and patch again")
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is None or not runtime.owns(cache):
        raise RuntimeError(
            "a Palu-patched attention ran without its model's Palu cache; call the patched model itself "
            "(model(...) or model.generate(...)) with no cache or kvpress.make_cache(model)"
        )
    plan = runtime.plans[module.layer_idx]
    batch, n, _ = hidden_states.shape
    head_dim = runtime.info.shape.head_dim
    joined = intact_join(module, "_kvpress_q_latents")
    if joined is not None:  # one GEMM: the queries, then the key and value latents
        y, width = F.linear(hidden_states, joined.weight, joined.bias), module.q_proj.out_features
        q, latents = y[..., :width], ref.latent_parts(y[..., width:], plan.groups, plan.ranks)
    else:
        q, latents = module.q_proj(hidden_states), plan.latents(hidden_states)
    q = q.view(batch, n, -1, head_dim)
    if getattr(module, "q_norm", None) is not None and runtime.info.facts.qk_norm:
        q = module.q_norm(q)
    q, _ = ops.rotary(q, None, *position_embeddings)  # transformers' apply_rotary_pos_emb, one launch on Triton
    layer = cache.layers[module.layer_idx]
    view = layer.update(*latents)
    out = runtime.attend(module, q.transpose(1, 2), view, plan)
    out = out.transpose(1, 2).reshape(batch, n, -1)
    return module.o_proj(out), None


def _bias(linear) -> torch.Tensor | None:
    if linear.bias is None:
        return None
    bias = linear.bias.detach()
    return bias.to_local() if hasattr(bias, "to_local") else bias  # a tensor-parallel rank's share


_WARNED: set[tuple] = set()


def _warn_torch_decode(q: torch.Tensor, key_rank: int, group_size: int) -> None:
    """Say once per shape that the decode runs the (slower) torch path on the GPU, and why."""
    key = (q.shape[-1], key_rank, group_size, q.dtype)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("Palu: the decode kernel does not serve head dim %d, key rank %d (per group of %d KV heads), "
                    "%s: decoding with the torch path, which is slower. The kernel needs a power-of-two head dim and "
                    "group size and a key rank with a power-of-two factor of at least 16: make the factors with "
                    "rank_multiple=16 or recalibrate with `kvpress-calibrate palu --multiple 16`.",
                    key[0], key_rank, group_size, q.dtype)


def _quantize(h: torch.Tensor, spec: ref.QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens' latents quantised (``ref.quantize``): one Triton launch where the decode kernel runs, the
    same bits (the reference's ~20 small torch operations per call cost ~3 ms per token of graph decode on
    the 8B model)."""
    return palu_kernels.quantize(h, spec) if _use_kernel(h) else ref.quantize(h, spec)


def _quantize_at(h: torch.Tensor, spec: ref.QuantSpec, words: torch.Tensor, scale_min: torch.Tensor,
                 slot: torch.Tensor) -> None:
    """A static decode step's new token quantised into the storages at ``slot``: by the quantisation launch
    itself where the kernels run (two copies and their launches fewer per side and layer), else copied there."""
    if _use_kernel(h) and words.is_contiguous() and scale_min.is_contiguous():
        palu_kernels.quantize_at(h, spec, words, scale_min, slot)
    else:
        codes, scales = _quantize(h, spec)
        words.index_copy_(2, slot, codes)
        scale_min.index_copy_(2, slot, scales)


def _use_kernel(q: torch.Tensor) -> bool:
    """The Triton decode kernel on CUDA (``KVPRESS_KERNELS``: ``reference`` never, ``triton`` also on CPU
    under the interpreter)."""
    if palu_kernels is None or kernels.BACKEND == "reference":
        return False
    return kernels.BACKEND == "triton" or q.is_cuda
