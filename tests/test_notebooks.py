"""Both notebooks execute top to bottom (small settings) and are stored without outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _outputs(nb) -> str:
    return "\n".join(
        o.get("text", "") if o.get("output_type") == "stream" else str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_analyse_results.ipynb"])
def test_notebook_is_stored_without_outputs(name: str) -> None:
    for cell in _read(name).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear outputs"


@pytest.mark.slow  # starts two Jupyter kernels
def test_notebooks_execute(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "experiment"
    monkeypatch.setenv("KD_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("KD_NOTEBOOK_OUTPUT", str(out))
    monkeypatch.setenv("KD_RESULTS_DIR", str(out))  # 02 analyses what 01 produced

    quick = _read("01_quickstart.ipynb")
    # "python3" is the kernel; jupyter_client runs it with this interpreter (the venv's)
    nbclient.NotebookClient(quick, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _outputs(quick)
    assert f"python: {sys.executable}" in text
    assert "small settings: True" in text
    assert (out / "results.md").is_file() and (out / "plots" / "results_bars.png").is_file()

    analyse = _read("02_analyse_results.ipynb")
    nbclient.NotebookClient(analyse, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _outputs(analyse)
    assert "experiment: quickstart" in text and "runs: 3" in text
    assert sum("image/png" in o.get("data", {}) for c in analyse.cells
               for o in c.get("outputs", [])) >= 3  # bars, curves, reliability
