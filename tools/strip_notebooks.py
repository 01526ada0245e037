"""Strip outputs, execution counts and editor metadata from notebooks, so that git holds only source.

    python tools/strip_notebooks.py                 # strip examples/*.ipynb in place
    python tools/strip_notebooks.py --check         # exit 1, naming them, if any notebook is not stripped
    python tools/strip_notebooks.py path/to/a.ipynb ...

tests/test_notebooks.py fails on a committed notebook that is not stripped; run this before committing.
Plain json, no Jupyter package needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEPT_NOTEBOOK_METADATA = ("kernelspec", "language_info")
KEPT_CELL_METADATA = ("tags",)


def stripped(notebook: dict) -> dict:
    """A copy of ``notebook`` (nbformat 4 JSON) with no outputs, no execution counts, and only the
    metadata that describes the source (kernel, language, cell tags)."""
    notebook = json.loads(json.dumps(notebook))
    metadata = notebook.get("metadata", {})
    notebook["metadata"] = {key: metadata[key] for key in KEPT_NOTEBOOK_METADATA if key in metadata}
    if "language_info" in notebook["metadata"]:
        notebook["metadata"]["language_info"] = {"name": notebook["metadata"]["language_info"].get("name", "python")}
    for cell in notebook.get("cells", []):
        cell["metadata"] = {key: cell["metadata"][key] for key in KEPT_CELL_METADATA if key in cell.get("metadata", {})}
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return notebook


def problems(notebook: dict) -> list[str]:
    """What is not stripped in ``notebook``: one line per cell with outputs or an execution count,
    plus one line if only metadata differs."""
    found = []
    for index, cell in enumerate(notebook.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            found.append(f"cell {index} has {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            found.append(f"cell {index} has execution count {cell['execution_count']}")
    if not found and stripped(notebook) != notebook:
        found.append("editor metadata (notebook or cell) beyond kernelspec, language_info and tags")
    return found


def dumps(notebook: dict) -> str:
    """nbformat's own layout (indent 1, sorted keys, trailing newline), so stripping is a no-op on a clean file."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: examples/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not stripped")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "examples").glob("*.ipynb"))
    dirty = 0
    for path in paths:
        text = path.read_text(encoding="utf-8")
        notebook = json.loads(text)
        found = problems(notebook)
        if args.check:
            if found:
                dirty += 1
                print(f"{path}: not stripped ({'; '.join(found)})")
        elif found or dumps(notebook) != text:
            path.write_text(dumps(stripped(notebook)), encoding="utf-8")
            print(f"stripped {path}")
    if dirty:
        print(f"run: python tools/strip_notebooks.py  ({dirty} notebook(s) to strip)")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
