"""NaN/Inf losses: skip the step (reading the loss every step) or flag it on the device and stop at the next check."""

from __future__ import annotations

from typing import Any

import torch

from dali_kd import console, distributed
from dali_kd.errors import TrainingStopped


class NonFiniteGuard:
    """`train.on_nonfinite_loss`: stop (asynchronous: a device flag read at log steps and before checkpoints)
    or skip (one host read per step: the update must not happen at all), up to `max_skipped` skips."""

    def __init__(self, mode: str, max_skipped: int, device: torch.device):
        self.mode = mode
        self.max_skipped = max_skipped
        self.device = device
        self.skipped_steps = 0
        self._flag = torch.zeros((), dtype=torch.bool, device=device)

    def should_skip(self, loss: torch.Tensor, step: int, last_checkpoint: object) -> bool:
        """Called once per step after backward; True: drop this step's gradients and do not update."""
        finite = torch.isfinite(loss)
        if self.mode == "skip":
            if not distributed.any_rank(not bool(finite), self.device):
                return False
            self.skipped_steps += 1
            console.warning(
                f"warning: non-finite loss at step {step}: step skipped ({self.skipped_steps} so far)"
            )
            if self.skipped_steps > self.max_skipped:
                raise TrainingStopped(
                    f"loss was non-finite in {self.skipped_steps} steps (train.max_skipped_steps="
                    f"{self.max_skipped}); last good checkpoint: {last_checkpoint or 'none yet'}"
                )
            return True
        self._flag |= ~finite
        return False

    def counts(self, loss: torch.Tensor) -> bool:
        """Whether this step's loss enters the logged means (a skipped step's does not)."""
        return not (self.mode == "skip" and not torch.isfinite(loss))

    def check(self, step: int, last_checkpoint: object) -> None:
        """All ranks agree: if any saw a NaN/Inf loss since the last check, every rank stops."""
        if distributed.any_rank(bool(self._flag), self.device):
            raise TrainingStopped(
                f"loss became NaN/Inf before step {step} (train.on_nonfinite_loss=stop); "
                f"last good checkpoint: {last_checkpoint or 'none yet'} — resume from it with a lower "
                "train.optimizer.lr, or set train.on_nonfinite_loss=skip"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
