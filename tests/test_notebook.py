"""The notebook train_kd.ipynb runs top to bottom (its quick settings) as a user would run it, headless."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "train_kd.ipynb"


def _stdout(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stdout"
    )


@pytest.mark.slow
def test_notebook_runs_from_data_to_trained_student(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "save the notebook with its outputs cleared"
    )
    # The kernel inherits this environment: quick settings, and every output (demo cache too) under tmp_path.
    monkeypatch.setenv("DALI_KD_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DALI_KD_NOTEBOOK_DIR", str(tmp_path))
    # One OpenMP thread: on a CI machine whose cores are busy with other tests, OpenMP's spin-waiting made the
    # quick run's tiny steps up to 8x slower (2 min instead of 15 s, measured on 2 shared cores).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 1, summaries
    run_dir = summaries[0].parent
    assert (run_dir / "report.png").stat().st_size > 0
    assert (run_dir / "student.safetensors").is_file()
    assert (tmp_path / "cache" / "teacher_quick.safetensors").is_file()
    summary = json.loads(summaries[0].read_text())
    stdout = _stdout(nb)
    found = re.search(r"saved student k-NN top-1: ([0-9.]+)%", stdout)
    assert found, stdout[-3000:]
    assert abs(float(found.group(1)) - summary["student_knn_top1"]) <= 0.5
    assert "max |replay 1 - replay 2|: 0\n" in stdout
    assert "global crops (16, 2, 3, 32, 32), local crops (16, 8, 3, 16, 16)" in stdout
    # The batch grid, the replay figure, the multi-crop grid and the report are displayed as images.
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) == 4


def test_the_notebook_trains_through_the_python_api_only():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    assert re.findall(r"dali_kd\.(?:training|commands)\b", code) == [], (
        "the loop and the commands are not the API"
    )
    assert "dali_kd.distill(" in code and "dali_kd.load_config(" in code
