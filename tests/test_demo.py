"""The embedded demo end to end, as a user runs it: `python -m dali_kd.train` with no config flags."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_demo(cache, work, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The demo exactly as shipped, except that its first-use cache goes to a temporary folder."""
    return subprocess.run(
        [
            sys.executable, "-m", "dali_kd.train", "--no-progress", *overrides,
            f"data.root={cache / 'data' / 'train'}",
            f"data.val_root={cache / 'data' / 'val'}",
            f"model.teacher.checkpoint={cache / 'teacher.safetensors'}",
        ],
        capture_output=True, text=True, cwd=work, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_distils_a_student_near_its_teacher(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-cache")
    work = tmp_path_factory.mktemp("demo-work")
    result = run_demo(cache, work)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((work / "runs").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    # The run directory is printed at the start and at the end.
    assert result.stdout.count(f"run directory: runs/{run_dir.name}") == 2, result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["backend"] == "dali" and summary["compiled_student"]
    assert summary["steps"] == summary["epochs"] * summary["steps_per_epoch"] > 0
    chance = summary["chance_top1"]
    assert summary["teacher_knn_top1"] > 80, "the demo teacher must really know the task"
    assert summary["student_knn_top1"] > 5 * chance, "the student must end far above chance"
    assert summary["student_knn_top1"] >= summary["teacher_knn_top1"] - 10, (
        "and within 10 points of its teacher"
    )
    for name in ("config.yaml", "metrics.jsonl", "student.safetensors"):
        assert (run_dir / name).is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    # Second use: the dataset and the teacher come from the cache, no preparation again. It also trains the demo
    # with DINO multi-crop (2 global + 8 local crops per image), as `python -m dali_kd.train train.use_local_crops=true`.
    again = run_demo(
        cache,
        work,
        "train.use_local_crops=true",
        "train.epochs=1",
        "train.compile_student=false",
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "first use" not in again.stdout
    assert "batch 64, crops 2×64 px + 8×32 px" in again.stdout
    (multi_crop_dir,) = set((work / "runs").iterdir()) - {run_dir}
    rows = [json.loads(line) for line in (multi_crop_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_global", "loss_local"} <= set(rows[0]) and rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((multi_crop_dir / "summary.json").read_text())
    assert summary["steps"] == summary["steps_per_epoch"] and summary["student_knn_top1"] > 3 * chance
