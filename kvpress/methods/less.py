"""LESS (Dong et al., 2024, arXiv 2402.09398): a sparse eviction policy plus a learned low-rank state.

Each (batch row, KV head) keeps ``sink + heavy + recent`` tokens chosen by the policy (Lambda: sinks
plus a recent window; H2O: heavy hitters by accumulated attention probability plus a recent window);
every token it evicts is folded, once, into a constant-size fp32 state ``H = sum psi(k)^T v``
(``R x D``) and ``z = sum psi(k)`` (``R``) through learned feature maps, and attention reads the
kept tokens and the state through one log-space normaliser (``kvpress.kernels.less_reference``).
The cache really holds only the budget's tokens: memory is constant over generation.

Config files are folders (``kvpress-calibrate less --model PATH --out DIR``): ``less.json`` (fields,
model fingerprint, digest of the weights) and ``less.safetensors`` (per-layer feature-map weights).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelShape
from ..cache import KVPressLayer, LedgerSpec, TokenLedger
from ..configfile import load_config_folder, save_config_folder
from ..kernels import less as less_kernels
from ..kernels import less_reference as reference
from ..kernels.less_reference import FeatureWeights, Policy
from .base import HeadAxis, Method

SIMULATED = "kvpress_less_simulation"
WEIGHT_NAMES = ("q_w1", "q_w2", "k_w1", "k_w2", "k_scale", "k_mix", "k_mix_scale")


@dataclass
class LessConfig:
    """LESS settings and feature maps for one model.

    Args:
        policy: ``"h2o"`` (heavy hitters + recent window; ``heavy >= 1``) or ``"lambda"`` (sinks +
            recent window; ``heavy = 0``).
        sink, heavy, recent: tokens each (row, KV head) keeps: the ``sink`` first real tokens, the
            ``heavy`` tokens of highest accumulated attention probability, the ``recent`` last
            tokens (the current one included). The reference gives budgets as fractions of the
            model's maximum length: "5% H2O" on a 4096-token model is ``heavy=102, recent=102``
            (:meth:`from_fraction`); Lambda's reference is ``sink=4, recent=200``.
        rank: R, the size of the state (``R x D`` plus ``R`` per state head); 8 in the paper.
        hidden: hidden width of the feature maps (512 in the paper).
        state_heads: ``"kv"`` (one state per KV head; psi per KV head) or ``"query"`` (one state
            per query head, G times the state memory under GQA).
        state: False turns the state off: the plain policy ("Lambda only" / "H2O only").
        layers: per-layer :class:`FeatureWeights` (None: untrained maps made by :meth:`random`).
        model_shape: the model the maps were trained for; checked at patch time.
    """

    policy: str = "lambda"
    sink: int = 4
    heavy: int = 0
    recent: int = 200
    rank: int = 8
    hidden: int = 512
    state_heads: str = "kv"
    state: bool = True
    layers: list[FeatureWeights] | None = field(default=None, repr=False)
    model_shape: ModelShape | None = None

    def __post_init__(self):
        if self.policy not in ("h2o", "lambda"):
            raise ValueError(f"LessConfig.policy must be 'h2o' or 'lambda', got {self.policy!r}")
        for name in ("sink", "heavy", "recent", "rank", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LessConfig.{name} must be a non-negative int (tokens / sizes), got {value!r}")
        if self.recent < 1 or self.rank < 1 or self.hidden < 1:
            raise ValueError("LessConfig needs recent >= 1 token, rank >= 1 and hidden >= 1")
        if self.policy == "lambda" and self.heavy:
            raise ValueError("the Lambda policy keeps no heavy hitters: set heavy=0 or policy='h2o'")
        if self.policy == "h2o" and not self.heavy:
            raise ValueError("the H2O policy needs heavy >= 1 heavy-hitter tokens (or use policy='lambda')")
        if self.state_heads not in ("kv", "query"):
            raise ValueError(f"LessConfig.state_heads must be 'kv' or 'query', got {self.state_heads!r}")

    @property
    def budget(self) -> Policy:
        return Policy(sink=self.sink, heavy=self.heavy, recent=self.recent)

    @classmethod
    def from_fraction(cls, fraction: float, max_length: int, policy: str = "h2o", **kwargs) -> "LessConfig":
        """The reference's budgets: ``fraction`` of ``max_length`` tokens, split evenly between
        heavy hitters and the recent window (H2O), or 4 sinks + the rest recent (Lambda)."""
        total = max(2, round(fraction * max_length))
        if policy == "h2o":
            return cls(policy="h2o", sink=0, heavy=total // 2, recent=total - total // 2, **kwargs)
        return cls(policy="lambda", sink=min(4, total - 1), heavy=0, recent=total - min(4, total - 1), **kwargs)

    def num_state_heads(self, shape: ModelShape) -> int:
        return shape.num_kv_heads if self.state_heads == "kv" else shape.num_heads

    @classmethod
    def random(cls, shape: ModelShape, seed: int = 0, **kwargs) -> "LessConfig":
        """Untrained maps, initialised as for training (the state's scales start at 1e-4)."""
        config = cls(model_shape=shape, **kwargs)
        torch.manual_seed(seed)
        config.layers = [
            FeatureMaps(shape.head_dim, shape.num_heads, config.num_state_heads(shape), config.rank, config.hidden).weights()
            for _ in range(shape.num_layers)
        ]
        return config

    # -- files ------------------------------------------------------------------------------------

    def fields_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("layers", "model_shape")}

    def save(self, folder: str | Path) -> Path:
        """Write the config folder (``less.json`` + ``less.safetensors``; see
        :func:`kvpress.configfile.save_config_folder`)."""
        if self.layers is None:
            raise ValueError("this LessConfig has no feature maps to save (train them: kvpress-calibrate less)")
        tensors = {f"layers.{i}.{name}": getattr(w, name).float()
                   for i, w in enumerate(self.layers) for name in WEIGHT_NAMES}
        return save_config_folder(folder, "less", tensors, self.fields_dict(), self.model_shape)

    @classmethod
    def load(cls, folder: str | Path, **overrides) -> "LessConfig":
        """Read a folder written by :meth:`save` (``kvpress-calibrate less``); ``overrides`` replace fields."""
        tensors, fields, shape, _ = load_config_folder(folder, "less")
        count = len({name.split(".")[1] for name in tensors})
        layers = [FeatureWeights(**{n: tensors[f"layers.{i}.{n}"] for n in WEIGHT_NAMES}) for i in range(count)]
        return cls(**{**fields, **overrides}, layers=layers, model_shape=shape)

    @property
    def head_axes(self) -> dict:
        """What a tensor-parallel rank keeps (``kvpress.methods.base.select_heads``): phi of its query
        heads, psi of its state heads (its KV heads, or query heads with ``state_heads="query"``)."""
        q, k = HeadAxis("query"), HeadAxis("kv" if self.state_heads == "kv" else "query")
        return {"layers": {"q_w1": q, "q_w2": q, "k_w1": k, "k_w2": k, "k_scale": k, "k_mix": k, "k_mix_scale": k}}

    def check(self, shape: ModelShape, fingerprint: bool = True) -> None:
        """Raise a clear error unless the maps fit a model of ``shape`` (``fingerprint``: and
        ``model_shape`` is that model's)."""
        if fingerprint and self.model_shape is not None:
            self.model_shape.check_matches(shape, "this LESS config")
        if self.layers is None:
            raise ValueError("this LessConfig has no feature maps: load one (LessConfig.load) or use LessConfig.random(shape)")
        if len(self.layers) != shape.num_layers:
            raise ValueError(f"this LESS config has maps for {len(self.layers)} layers, the model has {shape.num_layers}")
        hs = self.num_state_heads(shape)
        w = self.layers[0]
        expected = {"q_w1": (shape.num_heads, shape.head_dim, self.hidden), "k_w1": (hs, shape.head_dim, self.hidden),
                    "q_w2": (shape.num_heads, self.hidden, self.rank), "k_mix": (hs, self.rank, self.rank)}
        for name, size in expected.items():
            if tuple(getattr(w, name).shape) != size:
                raise ValueError(f"LESS map {name} has shape {tuple(getattr(w, name).shape)}, expected {size} "
                                 f"(rank {self.rank}, hidden {self.hidden}, state_heads {self.state_heads!r})")


class FeatureMaps(nn.Module):
    """The trainable feature maps of one layer (arXiv 2402.09398, section 4, and its reference code):
    per query head ``phi(q) = |GELU(GELU(q W1) W2)|`` (``D -> hidden -> R``, no biases); per state
    head the same map for keys, ``h = GELU(GELU(k W1) W2)``, then ``f = |k_scale| h`` (init 1e-4)
    and ``psi(k) = |f + (f k_mix) k_mix_scale|`` (the ``R x R`` interaction, its scale init 1e-4).
    Xavier-uniform weights; in training, dropout on the first layer's pre-activation."""

    def __init__(self, head_dim: int, num_heads: int, state_heads: int, rank: int = 8, hidden: int = 512, dropout: float = 0.3):
        super().__init__()

        def xavier(*size, fan_in, fan_out):
            bound = math.sqrt(6 / (fan_in + fan_out))
            return nn.Parameter(torch.empty(*size).uniform_(-bound, bound))

        self.q_w1 = xavier(num_heads, head_dim, hidden, fan_in=head_dim, fan_out=hidden)
        self.q_w2 = xavier(num_heads, hidden, rank, fan_in=hidden, fan_out=rank)
        self.k_w1 = xavier(state_heads, head_dim, hidden, fan_in=head_dim, fan_out=hidden)
        self.k_w2 = xavier(state_heads, hidden, rank, fan_in=hidden, fan_out=rank)
        self.k_scale = nn.Parameter(torch.full((state_heads, rank), 1e-4))
        self.k_mix = xavier(state_heads, rank, rank, fan_in=rank, fan_out=rank)
        self.k_mix_scale = nn.Parameter(torch.full((state_heads, rank), 1e-4))
        self.dropout = dropout

    def _map(self, x, w1, w2):
        hidden = F.gelu(F.dropout(torch.einsum("bhld,hdn->bhln", x.float(), w1), self.dropout, self.training))
        return F.gelu(torch.einsum("bhln,hnr->bhlr", hidden, w2))

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        """``q [B, Hq, L, D]`` -> ``[B, Hq, L, R]`` fp32."""
        return self._map(q, self.q_w1, self.q_w2).abs()

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        """``k [B, Hkv, L, D]`` -> ``[B, Hs, L, R]`` fp32 (state head j reads KV head j // G)."""
        hs = self.k_w1.shape[0]
        if k.shape[1] != hs:
            k = k.repeat_interleave(hs // k.shape[1], dim=1)
        return reference.key_features(self._map(k, self.k_w1, self.k_w2), self.k_scale, self.k_mix, self.k_mix_scale)

    def weights(self) -> FeatureWeights:
        return FeatureWeights(**{name: getattr(self, name).detach().clone() for name in WEIGHT_NAMES})

    @classmethod
    def from_weights(cls, w: FeatureWeights, dropout: float = 0.3) -> "FeatureMaps":
        maps = cls(w.q_w1.shape[1], w.q_w1.shape[0], w.k_w1.shape[0], w.rank, w.q_w1.shape[2], dropout)
        with torch.no_grad():
            for name in WEIGHT_NAMES:
                getattr(maps, name).copy_(getattr(w, name))
        return maps


# -- the runtime ----------------------------------------------------------------------------------


@dataclass
class LessStep:
    """What a LESS cache layer hands the attention function for one forward."""

    layer: "LessLayer"
    k: torch.Tensor  # [B, Hkv, n, D] the new tokens' post-RoPE keys
    v: torch.Tensor
    rank: torch.Tensor  # [B, n] their ranks (-1 = padding)


class LessLayer(KVPressLayer):
    """One layer's LESS cache: ``sink + heavy + recent + 1`` slots per (row, KV head) and the fp32
    state (:class:`~kvpress.kernels.less_reference.LessCache`). Nothing grows with the tokens seen.

    It runs static decode steps (``kvpress.patch(..., decode="graph")``): the decode kernels read
    the new token's rank on the device and update the cache in place, and nothing ever grows, so
    ``prepare_static`` has nothing to do. Such steps skip the snapshot that lets an eager forward
    failing half-way be undone."""

    static_decode = True

    def __init__(self, ledger: TokenLedger, owns_ledger: bool, method: "Less", layer_idx: int):
        super().__init__(ledger, owns_ledger)
        self.less, self.layer_idx = method, layer_idx
        self.cache: reference.LessCache | None = None
        self.applied = 0  # tokens per row this layer has attended (to detect a forward that failed half-way)
        self.undo = None  # what the forward in progress changes in place (``_snapshot``)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.ledger.current(key_states.device)
        static = self.ledger.capturing
        if not static and self.applied != self.ledger.seen:  # this layer ran a forward that failed in a later layer
            self._restore()
        if self.cache is None:
            shape, config = self.less.info.local_shape, self.less.config
            self.cache = reference.LessCache.empty(
                key_states.shape[0], shape.num_kv_heads, config.budget.slots, shape.head_dim,
                config.num_state_heads(shape), config.rank, key_states.dtype, key_states.device)
        if not static:
            self._snapshot()
        return LessStep(self, key_states, value_states, step.new_rank), None

    # -- static decode steps (kvpress.graph) --------------------------------------------------------

    def prepare_static(self) -> int:
        if self.cache is None:
            raise RuntimeError("static decode steps follow a prefill of this cache")
        return 1 << 30  # the slots and the state never grow

    def static_tensors(self) -> list[torch.Tensor]:
        return self.cache.tensors()

    def advance_static(self, kept: dict) -> None:
        self.applied = self.ledger.seen  # the step ran on the device (the ledger has counted it)

    def _snapshot(self) -> None:
        """Keep what a forward changes in place (the state, scores, slot pointers and the spare
        slot's token), so that a forward failing in a later layer can be undone."""
        c = self.cache
        index = c.spare.long()
        kv_index = index[..., None, None].expand(-1, -1, 1, c.k.shape[-1])
        saved = {name: getattr(c, name).clone() for name in ("hs", "z", "score", "spare", "pending")}
        saved.update(k=c.k.gather(2, kv_index), v=c.v.gather(2, kv_index), rank=c.rank.gather(2, index[..., None]))
        self.undo = (dataclasses.replace(c), saved, index)

    def _restore(self) -> None:
        old, saved, index = self.undo
        for name in ("hs", "z", "score", "spare", "pending"):
            getattr(old, name).copy_(saved[name])
        kv_index = index[..., None, None].expand(-1, -1, 1, old.k.shape[-1])
        old.k.scatter_(2, kv_index, saved["k"])
        old.v.scatter_(2, kv_index, saved["v"])
        old.rank.scatter_(2, index[..., None], saved["rank"])
        self.cache, self.applied = old, self.ledger.seen

    def held_tensors(self) -> list[torch.Tensor]:
        return [] if self.cache is None else self.cache.tensors()

    def select_batch(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.select_batch(index)


@contextmanager
def simulated(model, config: "LessConfig | None"):
    """Within the block ``model``'s attention is LESS simulated over whole sequences: every position
    sees what a decode step at that position would see (the policy's kept tokens, decode by decode
    from a prompt of ``budget`` tokens, plus the state of the tokens evicted before it;
    ``less_reference.simulate``). One forward of a window then gives the logits of decoding it token
    by token, which is how perplexity under LESS is measured. ``config=None``: exact attention.
    The model must not be patched; batches must be unpadded."""
    from transformers import AttentionInterface

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if config is None:
            out = reference.dense_attention(query, key, value, scale)
        else:
            evict_at = reference.eviction_times(query, key, config.budget, scale)
            w = config.layers[module.layer_idx].to(query.device) if config.state else None
            out = reference.simulate(query, key, value, evict_at, scale, w)
        return out.to(query.dtype).transpose(1, 2), None

    AttentionInterface.register(SIMULATED, attend)
    old = model.config._attn_implementation
    model.config._attn_implementation_internal = SIMULATED
    try:
        yield
    finally:
        model.config._attn_implementation_internal = old


class Less(Method):
    """LESS runtime: per-(row, KV head) kept sets under the policy, plus the learned state."""

    name = "less"
    config_class = LessConfig
    config_file_name = "kvpress-less"  # a folder in the model's own folder

    @classmethod
    def fallback_config(cls, info):
        raise ValueError(
            "LESS needs feature maps trained for this model: run `kvpress-calibrate less --model MODEL --out DIR` "
            "and patch with config=DIR (or LessConfig.random(shape) for untrained maps)"
        )

    def check_config(self, config: LessConfig) -> None:
        config.check(self.info.local_shape, fingerprint=False)  # the fingerprint: resolve_config, whole model
        if any(w is not None for w in self.info.layer_windows):
            raise ValueError("LESS does not support models with sliding-window layers (their own window already "
                             "evicts tokens); use a model with full attention or kvpress.patch(model, 'duo')")
        self._weights: dict = {}

    def ledger_spec(self) -> LedgerSpec:
        return LedgerSpec()  # no all-token ranks: the bookkeeping stays constant-size too

    def make_layer(self, layer_idx: int, ledger: TokenLedger) -> LessLayer:
        return LessLayer(ledger, layer_idx == self.info.shape.num_layers - 1, self, layer_idx)

    def weights(self, layer_idx: int, device, dtype) -> reference.FeatureWeights:
        """The layer's maps on ``device``: fp32 for the torch path, the model's dtype for the kernels."""
        key = (layer_idx, device, dtype)
        if key not in self._weights:
            self._weights[key] = self.config.layers[layer_idx].to(device=device, dtype=dtype)
        return self._weights[key]

    def attention(self, module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        if not isinstance(key, LessStep):
            raise RuntimeError("the LESS attention got plain key/value tensors instead of its cache's step: call the "
                               "patched model with no cache or with kvpress.make_cache(model)")
        layer, config = key.layer, self.config
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        cache = layer.cache
        fast = less_kernels.available(query)
        w = self.weights(layer.layer_idx, query.device, query.dtype if fast else torch.float32)
        if query.shape[2] == 1:
            step = less_kernels.decode_step if fast else reference.decode_step
            out = step(query, key.k, key.v, key.rank[:, 0], cache, w, config.budget, scale, state=config.state)
        else:
            out = less_kernels.prefill_step(query, key.k, key.v, key.rank, cache, w, config.budget, scale,
                                            state=config.state)
        if not layer.ledger.capturing:  # static steps: advance_static counts
            layer.applied = self.ledger_seen(layer) + query.shape[2]
        return out.transpose(1, 2), None

    @staticmethod
    def ledger_seen(layer: LessLayer) -> int:
        return layer.ledger.seen
