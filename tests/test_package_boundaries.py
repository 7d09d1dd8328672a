"""The package's boundaries hold in code, not only in prose: the DALI graphs load without torch or the rest of dali_kd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imports every module of dali_kd.pipelines in a fresh interpreter and reports what came with them.
LOAD_PIPELINES = """
import json, pkgutil, sys
import dali_kd.pipelines as pipelines
names = [m.name for m in pkgutil.iter_modules(pipelines.__path__, "dali_kd.pipelines.")]
for name in names:
    __import__(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_the_dali_graphs_import_neither_torch_nor_the_rest_of_dali_kd():
    run = subprocess.run(
        [sys.executable, "-c", LOAD_PIPELINES], cwd=ROOT, capture_output=True, text=True, check=True
    )
    report = json.loads(run.stdout)
    assert "dali_kd.pipelines.graphs" in report["modules"]
    torch = [m for m in report["loaded"] if m == "torch" or m.startswith("torch.")]
    assert not torch, f"importing dali_kd.pipelines loaded torch ({torch[:3]}...)"
    ours = [m for m in report["loaded"] if m.startswith("dali_kd") and not m.startswith("dali_kd.pipelines")]
    assert ours == ["dali_kd"], f"importing dali_kd.pipelines loaded other dali_kd modules: {ours}"
