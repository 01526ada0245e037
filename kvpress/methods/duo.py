"""DuoAttention (Xiao et al., 2024, arXiv 2410.10819): retrieval heads and streaming heads.

Retrieval KV heads keep every token; streaming KV heads keep only ``sink`` first and ``recent`` last
real tokens of each row, so their cache is constant-size. The split is real: each layer stores two
tensors, ``[B, R, T, D]`` for its R retrieval heads and ``[B, S, sink + recent, D]`` for its S
streaming heads. Streaming heads use the sink + recent (A-shape) mask from the first prefill token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..adapters import ModelInfo, ModelShape
from ..cache import Window
from ..configfile import atomic_write, load_config_file, save_config_file
from .base import GroupedMethod, HeadAxis, check_field_types

log = logging.getLogger("kvpress")
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

    head_axes: ClassVar[dict] = {"gates": HeadAxis("kv", dim=1)}  # cut to a tensor-parallel rank's KV heads

    def __post_init__(self):
        check_field_types(DuoConfig, {name: getattr(self, name) for name in ("sink", "recent", "sparsity", "threshold")}, "duo")
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

    def per_head_form(self) -> DuoConfig:
        """The same retrieval heads decided head by head (``threshold``), so that a tensor-parallel rank
        that keeps only its heads' gates picks what the whole model picks (``sparsity`` ranks every head
        of the model)."""
        if self.threshold is not None:
            return self
        return DuoConfig.from_retrieval_mask(self.retrieval_heads(), sink=self.sink, recent=self.recent,
                                             model_shape=self.model_shape)

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


class DuoAttention(GroupedMethod):
    """DuoAttention runtime: per layer a group of retrieval heads that keeps every token and a group
    of streaming heads that keeps ``sink`` + ``recent`` (:class:`~kvpress.cache.GroupedLayer`)."""

    name = "duo"
    config_class = DuoConfig
    config_file_name = CONFIG_FILE_NAME

    @classmethod
    def fallback_config(cls, info: ModelInfo) -> DuoConfig:
        if info.heads.partial:
            raise ValueError(
                "DuoAttention needs gates for this model and none is shipped for it; under tensor parallelism kvpress "
                "cannot calibrate quick ones (each rank holds only its heads). Calibrate on one device "
                f"(`kvpress-calibrate duo --model {info.source or 'MODEL'} --out FILE`) and pass config=FILE to kvpress.patch"
            )
        return quick_config(info)

    def check_config(self, config: DuoConfig) -> None:
        expected = (self.info.shape.num_layers, self.info.num_kv_heads)
        if tuple(config.gates.shape) != expected:
            raise ValueError(
                f"this DuoConfig has gates for {config.gates.shape[0]} layers x {config.gates.shape[1]} KV heads, "
                f"but the model has {expected[0]} layers x {expected[1]} KV heads; use the config made for this model"
            )
        self.retrieval = config.retrieval_heads()

    def windowed_heads(self, layer_idx: int) -> tuple[torch.Tensor, Window]:
        return ~self.retrieval[layer_idx], Window(self.config.sink, self.config.recent)


def quick_config(info: ModelInfo) -> DuoConfig:
    """Gates from a short run of the calibration optimisation (``QUICK_STEPS`` steps on bundled text,
    at most 1024 tokens), cached per model (:func:`quick_cache_file`). On the project's test model
    this picks 12 of the 16 retrieval heads that a full calibration picks, where attention-mass
    scoring picks 8 (no better than chance)."""
    from transformers import AutoTokenizer

    from ..calibration.data import PasskeyData, PasskeyRecipe, read_haystack
    from ..calibration.duo import DuoTraining, train_gates

    source = info.source
    out = str(Path(source) / CONFIG_FILE_NAME) if source else CONFIG_FILE_NAME
    how = f"kvpress-calibrate duo --model {source or 'MODEL'} --out {out}"
    cached = quick_cache_file(info)
    if cached is not None and cached.is_file():
        log.info("using the quick DuoAttention gates cached at %s (for calibrated gates run: %s)", cached, how)
        return DuoConfig.load(cached)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise ValueError(
            "DuoAttention needs gates for this model and none is shipped for it; pass config=DuoConfig.load(path), "
            f"made with `{how}` (kvpress could not score heads itself: no tokenizer at {source!r})"
        ) from None
    length = min(1024, getattr(info.base_model.config, "max_position_embeddings", 1024))
    recipe = PasskeyRecipe(min_length=length // 2, max_length=length, num_lengths=4, num_passkeys=3, passkey_words=6)
    log.warning(
        "no DuoAttention config for this model; running %d quick calibration steps on bundled text (up to %d "
        "tokens). For calibrated gates run: %s", QUICK_STEPS, length, how,
    )
    training = DuoTraining(steps=QUICK_STEPS, sink=min(64, length // 8), recent=min(128, length // 4))
    gates = train_gates(info.base_model, PasskeyData(tokenizer, recipe, read_haystack()), training, progress=True)
    config = DuoConfig(gates=gates, model_shape=info.shape)
    if cached is not None:
        config.save(cached)
        log.warning("saved the quick gates to %s; they are reused for this model (KVPRESS_QUICK_CACHE=off disables)", cached)
    return config


def quick_cache_file(info: ModelInfo) -> Path | None:
    """Where quick gates of this model are cached: kvpress's cache folder (``$KVPRESS_CACHE``, default
    ``~/.cache/kvpress``) ``/duo-quick/<folder name>-<hash of folder and shape>.safetensors``;
    None when ``KVPRESS_QUICK_CACHE=off`` or the model's folder is unknown."""
    from ..testbed import cache_dir

    if os.environ.get("KVPRESS_QUICK_CACHE", "on").lower() in ("off", "0", "no") or not info.source:
        return None
    root = cache_dir()
    key = hashlib.sha256(json.dumps([str(Path(info.source).resolve()), info.shape.to_dict()]).encode()).hexdigest()[:12]
    return root / "duo-quick" / f"{Path(info.source).name}-{key}.safetensors"
