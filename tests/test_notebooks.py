"""The notebooks in notebooks/: the committed files carry their outputs (what the repository page shows), and each
one still runs top to bottom (nbclient, a kernel on this interpreter) so they cannot rot.

Execution works on an in-memory copy with its outputs cleared, in a scratch directory: the committed .ipynb files
are never rewritten (checked). A cell error fails the test with the cell's traceback, and each notebook must
print what shows it did its job (EXPECT below). Nothing here asserts how long a notebook takes: a generous pytest
timeout only stops a hung kernel.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

# text that must appear in a notebook's outputs (stream or text/plain), by notebook file name
EXPECT: dict[str, list[str]] = {
    "01_quickstart.ipynb": ["indexed", "rank", "same ranking as pipeline.search: True", "same ranking after reopening: True"],
    # nodes without first-stage maps: scored unpruned, with a warning, not refused
    "02_llamaindex_query_engine.ipynb": ["source pages", "MiniRerank", "UnprunedWarning", "same scores as keep_ratio=1.0: True"],
    "03_langchain_compression.ipynb": ["relevance_score", "UnprunedWarning", "same scores as keep_ratio=1.0: True"],
    # the cached default setting reproduces the student's dense ranking exactly (the first row of the sweep)
    "04_speed_quality_tradeoff.ipynb": ["time/dense", "dense reference:", "reproduces the student's dense ranking: True"],
    # the top pages reach the (recording stand-in) answering model as images, in rank order
    "05_pages_to_the_answering_model.ipynb": ["received 3 page images", "images in rank order: True"],
}
# rich outputs the committed notebooks must show on the repository page: the report (score table + image), the plot
MEDIA: dict[str, list[str]] = {
    "01_quickstart.ipynb": ["text/html", "image/png"],
    "04_speed_quality_tradeoff.ipynb": ["image/png"],
    "05_pages_to_the_answering_model.ipynb": ["image/png"],
}
CELL_TIMEOUT_S = 1800  # per cell, only against a hung kernel
TEST_TIMEOUT_S = 3600  # per notebook, likewise (pytest-timeout)


def _outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
            elif out.get("output_type") == "error":
                parts.append("Traceback: " + out.get("ename", ""))
    return "\n".join(parts)


def _media(nb) -> set[str]:
    return {mime for cell in nb.cells for out in cell.get("outputs", []) for mime in out.get("data", {})}


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert set(EXPECT) <= names, f"missing notebooks: {sorted(set(EXPECT) - names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_its_outputs(path: Path):
    """Every code cell was executed, in order, without errors, and the outputs show what the notebook is about."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: execute it top to bottom and save the outputs ({counts})"
    text = _outputs(nb)
    assert "Traceback" not in text
    for needle in EXPECT.get(path.name, []):
        assert needle in text, f"{path.name}: expected {needle!r} in the saved outputs"
    missing = set(MEDIA.get(path.name, [])) - _media(nb)
    assert not missing, f"{path.name}: no {sorted(missing)} output saved"
    assert not any("execution" in c.metadata for c in code), f"{path.name}: strip execution timing metadata"


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    committed = hashlib.sha256(path.read_bytes()).hexdigest()
    nb = copy.deepcopy(nbformat.read(path, as_version=4))
    for cell in nb.cells:  # the needles below must come from this run, not from the saved outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
        allow_errors=False, record_timing=False,
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    text = _outputs(nb)
    for needle in EXPECT.get(path.name, []):
        assert needle in text, f"{path.name}: expected {needle!r} in the outputs"
    assert "Traceback" not in text
    missing = set(MEDIA.get(path.name, [])) - _media(nb)
    assert not missing, f"{path.name}: no {sorted(missing)} output"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == committed, f"executing {path.name} rewrote the committed file"
    assert not any(p.suffix == ".ipynb" for p in tmp_path.rglob("*")), "the run wrote a notebook file"
