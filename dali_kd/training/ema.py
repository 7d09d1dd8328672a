"""An exponential moving average of the student's weights (timm's ModelEmaV3), evaluated and shipped beside it."""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3

from dali_kd.models import Student


class StudentEma:
    """The EMA of the student's backbone (the part that is shipped; the projectors only serve training).

    Updated after every optimizer step that was taken (a skipped NaN step leaves it alone). With warmup the decay
    grows from 0 toward `decay` over the first steps (timm's warm-up), so a short run's EMA is not stuck near the
    random initialisation. Its state goes into checkpoints, so a resumed run continues the same average.
    """

    def __init__(self, student: Student, decay: float, warmup: bool):
        self.ema = ModelEmaV3(student.backbone, decay=decay, use_warmup=warmup)
        self.ema.module.requires_grad_(False)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.ema.module

    def update(self, student: Student, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        self.ema.update(student.backbone, step=step)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state)
