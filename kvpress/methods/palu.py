"""Palu (Chang et al., 2024, arXiv 2407.21118): a low-rank latent KV cache.

Each layer's ``k_proj`` and ``v_proj`` are factored per group of ``group_size`` KV heads into
``down`` (hidden -> rank) and ``up`` (rank -> the group's heads); the cache stores only the latents
``x @ down.T`` of every token, *before* RoPE. See ``kvpress.kernels.palu_reference`` for the layout
and the math, ``kvpress.calibration.palu`` for how the factors are made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters import ModelShape

FORMAT_VERSION = 1
CONFIG_JSON = "palu.json"
FACTORS_FILE = "palu.safetensors"
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
        """Write the config folder (``palu.json`` + ``palu.safetensors``), atomically: a half-written
        folder never stands at ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "kvpress_format": FORMAT_VERSION,
            "kvpress_method": "palu",
            "model_shape": self.model_shape.to_dict() if self.model_shape is not None else None,
            "fields": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                       if f.name not in ("factors", "model_shape", "calibration")},
            "ranks": self.ranks() if self.factors else None,
            "kept_ratio": self.kept_ratio(),
            "calibration": self.calibration,
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.factors.items()}, str(tmp / FACTORS_FILE))
            (tmp / CONFIG_JSON).write_text(json.dumps(meta, indent=2) + "\n")
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path, **options) -> PaluConfig:
        """Read a folder written by :meth:`save` (``kvpress-calibrate palu --out DIR``)."""
        path = Path(path)
        meta_file = path / CONFIG_JSON
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"no Palu config at {path} (expected a folder with {CONFIG_JSON} and {FACTORS_FILE}); make one with "
                f"`kvpress-calibrate palu --model MODEL --out {path}`"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("kvpress_method") != "palu":
            raise ValueError(f"{path} is not a Palu config (method {meta.get('kvpress_method')!r})")
        if meta.get("kvpress_format") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has Palu config format {meta.get('kvpress_format')!r}; this kvpress reads format "
                f"{FORMAT_VERSION}: re-run `kvpress-calibrate palu`"
            )
        shape = meta.get("model_shape")
        fields = {**meta.get("fields", {}), **options}
        return cls(factors=load_file(str(path / FACTORS_FILE)), model_shape=ModelShape(**shape) if shape else None,
                   calibration=meta.get("calibration", {}), **fields)
