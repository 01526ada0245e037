"""Per-model method config files, written atomically, each with the method name, its format version,
the config's fields and the model's shape fingerprint:

* a file: one safetensors file, the rest as its JSON metadata (:func:`save_config_file`; DuoAttention,
  MInference);
* a folder: ``<method>.safetensors`` and ``<method>.json``, which names the tensors' digest
  (:func:`save_config_folder`; Palu's factors, LESS's feature maps: many tensors, readable metadata).
"""

from __future__ import annotations

import hashlib
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


def save_config_folder(folder: str | os.PathLike, method: str, tensors: dict[str, torch.Tensor], fields: dict,
                       shape: ModelShape | None, **extra) -> Path:
    """Write ``folder/<method>.safetensors``, then ``folder/<method>.json`` (method, format version,
    ``fields``, the model's shape, the tensors' sha256 and ``extra``), each atomically: the JSON names
    the digest of its tensors, so a reader sees the old config or the new one, never a mix."""
    folder = Path(folder)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(folder / f"{method}.safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {
        "kvpress_format": FORMAT_VERSION,
        "kvpress_method": method,
        "fields": fields,
        "model_shape": shape.to_dict() if shape is not None else None,
        "tensors_sha256": _digest(folder / f"{method}.safetensors"),
        **extra,
    }
    atomic_write(folder / f"{method}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    return folder


def load_config_folder(folder: str | os.PathLike, method: str) -> tuple[dict[str, torch.Tensor], dict, ModelShape | None, dict]:
    """Read a folder written by :func:`save_config_folder`: ``(tensors, fields, shape, metadata)``."""
    folder = Path(folder)
    meta_path, tensors_path = folder / f"{method}.json", folder / f"{method}.safetensors"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no kvpress {method} config in {folder} (a folder with {meta_path.name} and {tensors_path.name}); "
            f"make one with `kvpress-calibrate {method} --model MODEL --out {folder}`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("kvpress_method") != method:
        raise ValueError(f"{folder} is not a {method} config (method {meta.get('kvpress_method')!r})")
    if meta.get("kvpress_format") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} is a kvpress config folder of format version {meta.get('kvpress_format')}, but this kvpress "
            f"reads version {FORMAT_VERSION}; re-create it with this version's `kvpress-calibrate {method}`"
        )
    if not tensors_path.is_file() or _digest(tensors_path) != meta.get("tensors_sha256"):
        raise ValueError(f"{tensors_path} is missing or does not match {meta_path}; re-run `kvpress-calibrate {method}`")
    shape = meta.get("model_shape")
    return load_file(str(tensors_path)), meta.get("fields", {}), ModelShape(**shape) if shape else None, meta


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
