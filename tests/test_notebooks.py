"""The example notebooks (examples/*.ipynb): committed without outputs, and each runs from a clean
kernel without a cell error.

Running them needs nbclient, nbformat, ipykernel and matplotlib (in the ``test`` extra); without
them those tests skip and say so. The outputs check needs nothing. A new notebook is picked up by
its file name; keep its CPU run short (the project's test model, small lengths, no download).
"""

from __future__ import annotations

import json

import pytest
from scripts import ROOT, load_script

NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; each notebook takes well under 2 minutes on 2 CPU cores


def _strip_tool():
    return load_script("tools/strip_notebooks.py")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebook found under examples/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    found = _strip_tool().problems(json.loads(path.read_text(encoding="utf-8")))
    assert not found, f"{path.name} is not stripped ({'; '.join(found)}): run python tools/strip_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_from_a_clean_kernel(path):
    for package in ("nbclient", "nbformat", "ipykernel", "matplotlib"):
        pytest.importorskip(package, reason=f"running the example notebooks needs {package}: pip install -e \".[test]\"")
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell raised\n{error}", pytrace=False)
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
