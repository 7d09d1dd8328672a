"""dali_kd: knowledge distillation for vision models with the input pipeline on the GPU through NVIDIA DALI.

The Python API (docs/api.md), for notebooks and scripts:

    import dali_kd

    config = dali_kd.load_config(overrides=["train.epochs=2"])  # no files: the demo's; files < presets < overrides
    result = dali_kd.distill(config)  # what `python -m dali_kd.train` does, in this process
    print(result.summary["student_knn_top1"], result.run_dir)

`import dali_kd` stays light: each name loads its module (and torch) when it is first used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"
# The process that started this one, read when dali_kd is first imported: before a run's imports, which take seconds.
# Under torchrun it is the launcher; a rank whose launcher has ended since is not to join a rendezvous
# (dali_kd.distributed.end_with_launcher).
STARTED_BY_PID = os.getppid()

# Each public name and the module it lives in (not imported here: the import graph has the package below its parts).
_API = {
    "load_config": "dali_kd.config",
    "Config": "dali_kd.config",
    "distill": "dali_kd.commands.distill",
    "prepare_demo": "dali_kd.commands.distill",
    "Result": "dali_kd.commands.distill",
    "Callback": "dali_kd.training.callbacks",
    "UserError": "dali_kd.errors",
    "TrainingStopped": "dali_kd.errors",
    "Preempted": "dali_kd.runs.preemption",
}
__all__ = [
    "Callback", "Config", "Preempted", "Result", "TrainingStopped", "UserError", "__version__", "distill",
    "load_config", "prepare_demo",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'dali_kd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
