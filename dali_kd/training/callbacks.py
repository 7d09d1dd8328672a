"""Hooks into a run, for tools and tests that watch or perturb it without reaching into the trainer.

Subclass `Callback` and override what you need; `Trainer(..., callbacks=[...])` and
`dali_kd.train.main(argv, callbacks=[...])` call them in order on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dali_kd.config import Config
from dali_kd.training.run_state import RunState

if TYPE_CHECKING:
    from dali_kd.data import Batch


class PartsView(Protocol):
    """The run's parts a callback reads (dali_kd.training.build.RunParts is one)."""

    @property
    def state(self) -> RunState: ...
    @property
    def student(self) -> torch.nn.Module: ...
    @property
    def teacher(self) -> torch.nn.Module: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...


class TrainerView(Protocol):
    """What a callback reads of the run (dali_kd.training.trainer.Trainer is one): a Protocol, so that the hooks need not
    import the loop that calls them. Read-only here, as a callback reads them; the run's parts under `parts`."""

    @property
    def cfg(self) -> Config: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def step(self) -> int: ...
    @property
    def micro_batch(self) -> int: ...
    @property
    def parts(self) -> PartsView: ...


class Callback:
    def on_step(self, trainer: TrainerView, batch: Batch) -> None:
        """Before step `trainer.step + 1` trains on `batch` (which may be changed in place): once per batch, so
        train.grad_accum_steps times per step, `trainer.micro_batch` saying which of them (0-based)."""

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        """After a metrics row was made (rank 0 writes it); `row["step"]` is its last step."""

    def on_evaluate(self, trainer: TrainerView) -> None:
        """Before the student's k-NN evaluation at an epoch end."""

    def on_checkpoint(self, trainer: TrainerView, path: Path | None) -> None:
        """After a checkpoint was written (`path` on rank 0; the newest checkpoint on the others)."""

    def on_finish(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        """After the last step, before the final weights and summary are written."""
