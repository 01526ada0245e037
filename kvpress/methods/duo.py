"""DuoAttention (Xiao et al., 2024, arXiv 2410.10819): retrieval heads and streaming heads.

Retrieval KV heads keep every token; streaming KV heads keep only ``sink`` first and ``recent`` last
real tokens of each row, so their cache is constant-size. The split is real: each layer stores two
tensors, ``[B, R, T, D]`` for its R retrieval heads and ``[B, S, sink + recent, D]`` for its S
streaming heads. Streaming heads use the sink + recent (A-shape) mask from the first prefill token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import kernels
from ..adapters import ModelInfo, ModelShape
from ..cache import AppendBuffer, KVPressLayer, TokenLedger
from ..configfile import atomic_write, load_config_file, save_config_file
from .base import Method

log = logging.getLogger("kvpress")
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "data" / "duo"
CONFIG_FILE_NAME = "kvpress-duo.safetensors"  # looked up in the model's own folder
QUICK_STEPS = 30  # calibration steps run at patch time when no config is found


@dataclass
class DuoConfig:
    """Which KV heads are retrieval heads, and the streaming heads' budget.

    Args:
        gates: ``[num_layers, num_kv_heads]`` gate values in [0, 1] (the calibrated alpha of the
            paper); higher means the head needs the full context.
        sink: attention-sink tokens a streaming head keeps (the first real tokens of each row).
        recent: most recent tokens a streaming head keeps (the current token included).
        sparsity: fraction of KV heads that become streaming heads: the ``round(sparsity * heads)``
            lowest gates over the whole model (ties broken by a tiny fixed-seed noise, as in the
            reference). Used when ``threshold`` is None; defaults to 0.5.
        threshold: alternatively, heads with ``gate >= threshold`` are retrieval heads.
        model_shape: the model the gates were calibrated for; checked at patch time when set.
    """

    gates: torch.Tensor
    sink: int = 64
    recent: int = 256
    sparsity: float | None = None
    threshold: float | None = None
    model_shape: ModelShape | None = None

    def __post_init__(self):
        gates = torch.as_tensor(self.gates, dtype=torch.float32).detach().cpu()
        if gates.dim() != 2 or not torch.isfinite(gates).all():
            raise ValueError(f"DuoConfig.gates must be a finite [num_layers, num_kv_heads] array, got shape {tuple(gates.shape)}")
        self.gates = gates.clamp(0.0, 1.0)
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"DuoConfig needs sink >= 0 and recent >= 1 (tokens), got sink={self.sink}, recent={self.recent}")
        if self.sparsity is not None and self.threshold is not None:
            raise ValueError("DuoConfig takes either sparsity or threshold, not both")
        if self.sparsity is None and self.threshold is None:
            self.sparsity = 0.5
        for name in ("sparsity", "threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"DuoConfig.{name} must be in [0, 1], got {value}")

    # -- binarisation ---------------------------------------------------------------------------

    def retrieval_heads(self) -> torch.Tensor:
        """``[num_layers, num_kv_heads]`` bools: True = retrieval head (full cache)."""
        if self.threshold is not None:
            return self.gates >= self.threshold
        count = self.gates.numel()
        num_retrieval = count - round(self.sparsity * count)
        noise = torch.rand(count, generator=torch.Generator().manual_seed(0)) * 1e-6
        order = torch.argsort(self.gates.flatten() + noise, descending=True)
        mask = torch.zeros(count, dtype=torch.bool)
        mask[order[:num_retrieval]] = True
        return mask.view_as(self.gates)

    def with_options(self, **options) -> DuoConfig:
        """A copy with some fields replaced; giving ``sparsity`` clears ``threshold`` and vice versa."""
        if options.get("sparsity") is not None:
            options.setdefault("threshold", None)
        if options.get("threshold") is not None:
            options.setdefault("sparsity", None)
        return dataclasses.replace(self, **options)

    @classmethod
    def from_retrieval_mask(cls, mask: torch.Tensor, **fields) -> DuoConfig:
        """A config that makes exactly the heads where ``mask`` is True retrieval heads."""
        return cls(gates=torch.as_tensor(mask).float(), threshold=0.5, **fields)

    # -- files ----------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the project's config file (safetensors + JSON metadata), atomically."""
        fields = {"sink": self.sink, "recent": self.recent, "sparsity": self.sparsity, "threshold": self.threshold}
        return save_config_file(path, "duo", {"gates": self.gates}, fields, self.model_shape)

    @classmethod
    def load(cls, path, **options) -> DuoConfig:
        """Read a file written by :meth:`save`, or a reference pattern folder (see :meth:`from_pattern_dir`)."""
        if Path(path).is_dir():
            return cls.from_pattern_dir(path, **options)
        tensors, fields, shape = load_config_file(path, "duo")
        return cls(gates=tensors["gates"], model_shape=shape, **fields).with_options(**options)

    @classmethod
    def from_pattern_dir(cls, path, **options) -> DuoConfig:
        """Read the reference format: ``full_attention_heads.tsv`` (a row per layer, a tab-separated
        gate per KV head) and ``config.json`` (with ``sink_size`` and ``recent_size``)."""
        path = Path(path)
        tsv, meta = path / "full_attention_heads.tsv", path / "config.json"
        if not tsv.is_file():
            raise FileNotFoundError(f"{tsv} not found: a DuoAttention pattern folder holds full_attention_heads.tsv and config.json")
        rows = [line.split() for line in tsv.read_text().splitlines() if line.strip()]
        if len({len(row) for row in rows}) != 1:
            raise ValueError(f"{tsv}: every row (layer) must have the same number of gates (KV heads)")
        settings = json.loads(meta.read_text()) if meta.is_file() else {}
        fields = {"sink": settings.get("sink_size", 64), "recent": settings.get("recent_size", 256)}
        return cls(gates=torch.tensor([[float(x) for x in row] for row in rows]), **fields).with_options(**options)

    def save_pattern_dir(self, path) -> Path:
        """Write the reference format (see :meth:`from_pattern_dir`), each file atomically."""
        path = Path(path)
        rows = "\n".join("\t".join(f"{g:.6f}" for g in row) for row in self.gates.tolist()) + "\n"
        atomic_write(path / "full_attention_heads.tsv", lambda tmp: Path(tmp).write_text(rows))
        meta = json.dumps({"sink_size": self.sink, "recent_size": self.recent}, indent=2)
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(meta))
        return path


@dataclass
class DuoKV:
    """What a Duo cache layer hands to the attention function for one forward.

    The buffers already have room for the forward's new tokens (their last ``n`` positions) but do
    not hold them yet: the attention writes ``new_k``/``new_v`` there (the decode kernel does it in
    its own launch; see ``kvpress.kernels.split_cache_attention``), or :meth:`write_new` does."""

    full_k: torch.Tensor  # [B, R, T, D] retrieval heads, every token (the last n: room for the new ones)
    full_v: torch.Tensor
    full_rank: torch.Tensor  # [B, T]
    stream_k: torch.Tensor  # [B, S, C + n, D] streaming heads: the window buffer, room for the new tokens
    stream_v: torch.Tensor
    stream_rank: torch.Tensor  # [B, C + n]
    query_rank: torch.Tensor  # [B, n]
    retrieval_heads: torch.Tensor  # [R] KV-head indices
    streaming_heads: torch.Tensor  # [S]
    new_k: torch.Tensor  # [B, num_kv_heads, n, D] the new tokens' keys and values, every KV head
    new_v: torch.Tensor

    def write_new(self) -> None:
        """Write the new tokens into the buffers (what the attention does otherwise)."""
        kernels.write_new_tokens((self.new_k, self.new_v), self.full_k, self.full_v, self.stream_k, self.stream_v,
                                 self.retrieval_heads, self.streaming_heads)


class DuoLayer(KVPressLayer):
    """Split cache of one layer: full K/V for retrieval heads, a sink + recent window for the rest.

    All four are append buffers; a forward reserves room for its tokens and the attention writes
    them (at decode, inside the decode kernel: no torch op per layer). The window buffers are
    compacted to the window when the ledger says so (see :class:`~kvpress.cache.TokenLedger`).
    """

    def __init__(self, ledger: TokenLedger, owns_ledger: bool, retrieval_heads: torch.Tensor):
        super().__init__(ledger, owns_ledger)
        self.retrieval_cpu = retrieval_heads.nonzero().flatten()
        self.streaming_cpu = (~retrieval_heads).nonzero().flatten()
        self.full_k, self.full_v = AppendBuffer(dim=2), AppendBuffer(dim=2)  # [B, R, T, D]
        self.stream_k, self.stream_v = AppendBuffer(dim=2), AppendBuffer(dim=2)  # [B, S, C, D]

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.retrieval_heads = self.retrieval_cpu.to(self.device)
        self.streaming_heads = self.streaming_cpu.to(self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[DuoKV, None]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.ledger.current()
        if self.ledger.recovering:  # drop what this layer appended in a forward that failed half-way
            full, window = self.ledger.committed()
            for buffer, length in ((self.full_k, full), (self.full_v, full), (self.stream_k, window), (self.stream_v, window)):
                buffer.truncate(length)
        rh, sh = self.retrieval_heads, self.streaming_heads
        kv = DuoKV(
            self.full_k.reserve(key_states, rh), self.full_v.reserve(value_states, rh), step.all_rank,
            self.stream_k.reserve(key_states, sh), self.stream_v.reserve(value_states, sh), step.window_rank,
            step.new_rank, rh, sh, key_states, value_states,
        )
        return kv, None

    def after_forward(self) -> None:
        if self.ledger.compaction is not None:
            self.stream_k.keep(self.ledger.compaction, room=self.ledger.slack)
            self.stream_v.keep(self.ledger.compaction, room=self.ledger.slack)

    def held_tensors(self) -> list[torch.Tensor]:
        buffers = (self.full_k, self.full_v, self.stream_k, self.stream_v)
        return [b.storage for b in buffers if b.storage is not None]

    def select_batch(self, index: torch.Tensor) -> None:
        for buffer in (self.full_k, self.full_v, self.stream_k, self.stream_v):
            buffer.select_batch(index)


class DuoAttention(Method):
    """DuoAttention runtime: split caches and the split-cache attention of ``kvpress.kernels``."""

    name = "duo"

    def __init__(self, info: ModelInfo, config: DuoConfig | str | Path | None = None, **options):
        super().__init__(info)
        if config is None:
            config = default_config(info)
        if isinstance(config, (str, Path)):
            config = DuoConfig.load(config)
        if not isinstance(config, DuoConfig):
            raise TypeError(f"method 'duo' takes a DuoConfig (or a path to one), got {type(config).__name__}")
        known = {"sink", "recent", "sparsity", "threshold"}
        if unknown := set(options) - known:
            raise TypeError(f"unknown option(s) for method 'duo': {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}")
        config = config.with_options(**options)
        if config.model_shape is not None:
            config.model_shape.check_matches(info.shape, "this DuoConfig")
        expected = (info.shape.num_layers, info.shape.num_kv_heads)
        if tuple(config.gates.shape) != expected:
            raise ValueError(
                f"this DuoConfig has gates for {config.gates.shape[0]} layers x {config.gates.shape[1]} KV heads, "
                f"but the model has {expected[0]} layers x {expected[1]} KV heads; use the config made for this model"
            )
        self.config = config
        self.retrieval = config.retrieval_heads()

    def make_ledger(self) -> TokenLedger:
        return TokenLedger(window=(self.config.sink, self.config.recent))

    def make_layer(self, layer_idx: int, ledger: TokenLedger) -> DuoLayer:
        return DuoLayer(ledger, owns_ledger=layer_idx == 0, retrieval_heads=self.retrieval[layer_idx])

    def attention(self, module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        if not isinstance(key, DuoKV):
            raise RuntimeError("DuoAttention expects its own cache; call the patched model itself, not its layers")
        out = kernels.split_cache_attention(
            query, key.full_k, key.full_v, key.full_rank, key.stream_k, key.stream_v, key.stream_rank,
            key.query_rank, key.retrieval_heads, key.streaming_heads,
            scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
            sink=self.config.sink, recent=self.config.recent, window=sliding_window, new_kv=(key.new_k, key.new_v),
        )
        return out.transpose(1, 2), None


def default_config(info: ModelInfo) -> DuoConfig:
    """The config used when ``patch`` gets none: one shipped for this model (``kvpress-duo.safetensors``
    in the model's folder, or one bundled with kvpress under the folder's name), else gates from a
    short calibration run on bundled text (a quick first guess; calibrate for real use)."""
    source = Path(getattr(info.base_model.config, "_name_or_path", "") or "")
    if source.name:
        for candidate in (source / CONFIG_FILE_NAME, SHIPPED_CONFIGS / f"{source.name}.safetensors"):
            if candidate.is_file():
                config = DuoConfig.load(candidate)
                if config.model_shape in (None, info.shape):
                    log.info("kvpress: using the DuoAttention config %s", candidate)
                    return config
    return quick_config(info, source)


def quick_config(info: ModelInfo, source: Path) -> DuoConfig:
    """Gates from a short run of the calibration optimisation (``QUICK_STEPS`` steps on bundled text,
    at most 1024 tokens). On the project's test model this picks 12 of the 16 retrieval heads that a
    full calibration picks, where attention-mass scoring picks 8 (no better than chance)."""
    from transformers import AutoTokenizer

    from ..calibration.data import PasskeyData, PasskeyRecipe, read_haystack
    from ..calibration.duo import DuoTraining, train_gates

    how = f"kvpress-calibrate duo --model {source or 'MODEL'} --out {CONFIG_FILE_NAME}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise ValueError(
            "DuoAttention needs gates for this model and none is shipped for it; pass config=DuoConfig.load(path), "
            f"made with `{how}` (kvpress could not score heads itself: no tokenizer at {str(source)!r})"
        ) from None
    length = min(1024, getattr(info.base_model.config, "max_position_embeddings", 1024))
    recipe = PasskeyRecipe(min_length=length // 2, max_length=length, num_lengths=4, num_passkeys=3, passkey_words=6)
    log.warning(
        "kvpress: no DuoAttention config for this model; running %d quick calibration steps on bundled text "
        "(up to %d tokens). For calibrated gates run: %s", QUICK_STEPS, length, how,
    )
    training = DuoTraining(steps=QUICK_STEPS, sink=min(64, length // 8), recent=min(128, length // 4))
    gates = train_gates(info.base_model, PasskeyData(tokenizer, recipe, read_haystack()), training, progress=False)
    return DuoConfig(gates=gates, model_shape=info.shape)
