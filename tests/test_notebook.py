"""The diagnostics notebook runs top to bottom on a freshly trained tiny model."""

from __future__ import annotations

import pytest

from conftest import REPO, SHARED_DATA

NOTEBOOK = REPO / "notebooks" / "diagnostics.ipynb"


def test_diagnostics_notebook_executes(monkeypatch, tmp_path):
    """Guards the notebook against rot: every cell runs and the final report is written."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        pytest.skip(f"{SHARED_DATA / 'tinyshakespeare.txt'} is not present")
    monkeypatch.delenv("GROUNDTHINK_CHECKPOINT", raising=False)
    monkeypatch.setenv("GROUNDTHINK_PROBE_TEXT", str(SHARED_DATA / "tinyshakespeare.txt"))
    monkeypatch.setenv("GROUNDTHINK_PROBE_TOKENS", "1500")
    monkeypatch.setenv("GROUNDTHINK_TINY_STEPS", "20")
    monkeypatch.setenv("GROUNDTHINK_WORK_DIR", str(tmp_path))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    stdout = "".join(output.get("text", "") for output in outputs if output.get("name") == "stdout")
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert "trained the tiny preset for 20 steps" in stdout
    assert "report.html" in stdout
    assert len(images) == 8, f"expected 8 figures (two for write strength, one per other probe), got {len(images)}"
    assert (tmp_path / "report" / "report.html").exists()
