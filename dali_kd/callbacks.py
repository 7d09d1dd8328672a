"""Hooks into a run, for tools and tests that watch or perturb it without reaching into the trainer.

Subclass `Callback` and override what you need; `Trainer(..., callbacks=[...])` and
`dali_kd.train.main(argv, callbacks=[...])` call them in order on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dali_kd.data.batch import Batch
    from dali_kd.trainer import Trainer


class Callback:
    def on_step(self, trainer: Trainer, batch: Batch) -> None:
        """Before step `trainer.step + 1` trains on `batch` (which may be changed in place)."""

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After a metrics row was made (rank 0 writes it); `row["step"]` is its last step."""

    def on_evaluate(self, trainer: Trainer) -> None:
        """Before the student's k-NN evaluation at an epoch end."""

    def on_checkpoint(self, trainer: Trainer, path: Path | None) -> None:
        """After a checkpoint was written (`path` on rank 0; the newest checkpoint on the others)."""

    def on_finish(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """After the last step, before the final weights and summary are written."""
