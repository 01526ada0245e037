"""Per-model method config files: one safetensors file holding the tensors, with the method name,
the scalar fields and the model's shape fingerprint as JSON metadata. Written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .adapters import ModelShape

FORMAT_VERSION = "1"


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then move the file into place, so ``path`` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a config file gets the user's default
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_config_file(
    path: str | os.PathLike,
    method: str,
    tensors: dict[str, torch.Tensor],
    fields: dict,
    shape: ModelShape | None,
) -> Path:
    metadata = {
        "kvpress_format": FORMAT_VERSION,
        "kvpress_method": method,
        "fields": json.dumps(fields),
        "model_shape": json.dumps(shape.to_dict() if shape is not None else None),
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_config_file(path: str | os.PathLike, method: str) -> tuple[dict[str, torch.Tensor], dict, ModelShape | None]:
    """Read a file written by :func:`save_config_file`; checks it belongs to ``method``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no kvpress config file at {path}; make one with `kvpress-calibrate {method} --model MODEL --out {path}`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a kvpress config file (safetensors): {error}") from None
    version = metadata.get("kvpress_format")
    if version is not None and version != FORMAT_VERSION:
        raise ValueError(
            f"{path} is a kvpress config file of format version {version}, but this kvpress reads version "
            f"{FORMAT_VERSION}; re-create it with this version's `kvpress-calibrate {method}` or use the kvpress that wrote it"
        )
    found = metadata.get("kvpress_method")
    if found != method:
        what = f"a config for method {found!r}" if found else "not a kvpress config file"
        raise ValueError(f"{path} is {what}, not for {method!r}")
    shape = json.loads(metadata.get("model_shape", "null"))
    return tensors, json.loads(metadata.get("fields", "{}")), ModelShape(**shape) if shape else None
