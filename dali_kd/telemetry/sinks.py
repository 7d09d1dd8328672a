"""Where metric rows go: metrics.jsonl always (written per row, so a live run can be read), TensorBoard optionally.

A row that cannot be written (full disk) is a one-line UserError; the rows before it stay as they were (a part of
the failed row is cut off again)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from dali_kd.errors import UserError
from dali_kd.io import os_reason


class MetricsSink:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        try:
            # Unbuffered: every row reaches the file in write(), where a failure can be reported and undone.
            self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {os_reason(e) or e}") from None
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
        data = memoryview((json.dumps(row) + "\n").encode())
        start = self.file.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[self.file.write(data) :]
        except OSError as e:
            with contextlib.suppress(OSError):  # else a reader skips the half row; a resumed run drops it
                self.file.truncate(start)
            raise UserError(
                f"cannot write {self.path}: {os_reason(e) or e}; the rows written before are kept"
            ) from None
        if self.tensorboard is not None:
            for name, value in row.items():
                if name not in ("step", "epoch") and isinstance(value, int | float) and math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, global_step=row["step"])

    def rows(self) -> list[dict[str, Any]]:
        """The rows in the file so far (a resumed run's earlier ones too); a half-written line is skipped."""
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
