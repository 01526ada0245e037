"""The repository's scripts (benchmarks/, tools/, models/) imported as modules, for the tests."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """The script at ``path`` (relative to the repository root), imported as a module named after it."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
