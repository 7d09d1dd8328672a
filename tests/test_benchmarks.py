"""The benchmark scripts run (in --quick mode, on tiny data) and write results with the expected fields.

No timing is asserted: speed is measured by the scripts themselves and recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from make_dataset import make_dataset  # noqa: E402


def test_make_dataset_is_imagenet_like_and_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", num_images=40, num_classes=4, seed=3, jobs=1)
    b = make_dataset(tmp_path / "b", num_images=40, num_classes=4, seed=3, jobs=2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files_a) == 40 and len({p.parts[0] for p in files_a}) == 4
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.JPEG"))
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files_a), "same seed, same bytes"
    sizes = np.array([Image.open(a / p).size for p in files_a])
    assert 300 <= sizes.max(axis=1).mean() <= 800 and (sizes[:, 0] != sizes[:, 1]).mean() > 0.5
    with Image.open(a / files_a[0]) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    # Natural-image-like: neighbouring pixels are strongly correlated (noise would not be).
    assert np.corrcoef(pixels[:, :-1].ravel(), pixels[:, 1:].ravel())[0, 1] > 0.8
    mtime = (a / files_a[0]).stat().st_mtime_ns
    make_dataset(a, num_images=40, num_classes=4, seed=3)
    assert (a / files_a[0]).stat().st_mtime_ns == mtime, "a complete tree is not rebuilt"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_result(tmp_path):
    """benchmarks/gpu_check.sh at toy sizes on the CPU: the quick augmentation and step benchmarks inside it."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out)}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    augment = json.loads((out / "augment.json").read_text())
    assert {r["backend"] for r in augment["results"]} == {"torchvision", "dali_raw", "dali_cpu"}
    assert 4 in {r["workers"] for r in augment["results"] if r["backend"] == "torchvision"}, (
        "the original's 4"
    )
    for row in augment["results"]:
        assert row["img_per_s"] > 0 and row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"]
        assert row["cpu_s_per_img"] > 0 and row["ratio_vs_torchvision_4_workers"] > 0
    assert {"cpu_cores", "torch", "dali", "date"} <= set(augment["machine"])
    crops = {(r["backend"], r["crops"]): r for r in augment["multi_crop"]}
    assert set(crops) == {
        (backend, setting)
        for backend in ("torchvision", "dali_cpu")
        for setting in ("one view", "2 global", "2 global + 4 local")
    }
    for (_, setting), row in crops.items():
        assert row["img_per_s"] > 0
        assert row["cost_vs_global_only"] == 1.0 if setting == "2 global" else row["cost_vs_global_only"] > 0
    assert (out / "augment.md").read_text().startswith("| backend |")
    assert (out / "augment.png").read_bytes()[:4] == b"\x89PNG"
    step = json.loads((out / "train_step.json").read_text())
    assert [r["backend"] for r in step["results"]] == ["dali", "torchvision"]
    for row in step["results"]:
        for key in (
            "steps_per_s",
            "img_per_s",
            "data_ms",
            "teacher_ms",
            "student_ms",
            "data_stall_pct",
            "peak_rss_mb",
        ):
            assert row[key] is not None and row[key] >= 0, key
    multi_crop = json.loads((out / "multi_crop_step.json").read_text())
    assert [r["backend"] for r in multi_crop["results"]] == ["dali+globals", "dali+multicrop"]
    assert multi_crop["ratios"]["dali_multicrop_vs_globals_step"] > 0
    summary = (out / "summary.md").read_text()
    assert "### augmentation" in summary and "### distillation step" in summary
    assert "### multi-crop distillation step" in summary and "2 global + 4 local" in summary
    costs = (out / "dali_op_costs.md").read_text().splitlines()
    assert len(costs) == 7 and costs[-1].startswith("| + colour jitter (full) |")


def test_telemetry_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "telemetry_overhead.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["step_ms_telemetry_on"] > 0 and report["step_ms_telemetry_off"] > 0
    assert report["direct_cost"]["per_step_ms"] > 0 and report["direct_overhead_pct"] >= 0
    assert "telemetry calls timed directly" in result.stdout
