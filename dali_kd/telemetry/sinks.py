"""Where metric rows go: metrics.jsonl always (flushed per row, so a live run can be read), TensorBoard optionally."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dali_kd.errors import UserError


class MetricsSink:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed by close()
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.tensorboard: true needs the tensorboard package (pip install tensorboard)"
                ) from None
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for name, value in row.items():
                if name not in ("step", "epoch") and isinstance(value, int | float) and math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, global_step=row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
