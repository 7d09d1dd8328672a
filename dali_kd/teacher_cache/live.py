"""What every source of teacher targets answers (the TeacherTargets protocol), and the simplest one: the live frozen
teachers, run one after another on every batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_train_stream
from dali_kd.data.outputs import ModelOutput, view_major
from dali_kd.data.stream import TrainStream
from dali_kd.models import FrozenTeacher


class TeacherTargets(Protocol):
    # The targets come from a teacher cache (the run's verdict advises on it).
    cached: bool

    def train_stream(
        self,
        settings: StreamSettings,
        index: ImageIndex,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
    ) -> TrainStream:
        """The training stream these targets are computed for; `state` (its earlier state_dict()) resumes it."""
        ...

    def targets(self, batch: Batch, step: int) -> list[ModelOutput]:
        """Each teacher's outputs for the batch's global crops, in teacher order; `step` is the step being computed
        (1-based)."""
        ...

    def time_teachers(self, mark: Callable[[str], None]) -> None:
        """With several teachers, `mark(f"teacher_ms_{key}")` after each teacher's forward (telemetry's split of
        the teacher time); never called with one."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def interval_metrics(self) -> dict[str, float]:
        """Values for the next metrics row (then forgotten)."""
        ...

    def summary(self) -> dict[str, Any]: ...


class LiveTeacher:
    """The frozen teachers run on every batch, one after another (multi-crop: on the global crops only).

    with_patches: per teacher, whether its patch tokens are distilled; keys: the teachers' names in metrics."""

    cached = False

    def __init__(
        self, teachers: Sequence[FrozenTeacher], with_patches: Sequence[bool], keys: Sequence[str] = ()
    ):
        assert len(teachers) == len(with_patches) and len(keys) in (0, len(teachers))
        self.teachers = list(teachers)
        self.patches = list(with_patches)
        self.keys = list(keys)
        self.forward_batches = 0
        self._mark: Callable[[str], None] | None = None

    def time_teachers(self, mark: Callable[[str], None]) -> None:
        if len(self.teachers) > 1 and self.keys:
            self._mark = mark

    def targets(self, batch: Batch, step: int = 0) -> list[ModelOutput]:
        self.forward_batches += 1
        images = view_major(batch.global_crops())
        outputs = []
        for i, teacher in enumerate(self.teachers):
            outputs.append(teacher(images, with_patches=self.patches[i]))
            if self._mark is not None:
                self._mark(f"teacher_ms_{self.keys[i]}")
        return outputs

    def train_stream(
        self,
        settings: StreamSettings,
        index: ImageIndex,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
    ) -> TrainStream:
        return make_train_stream(settings, index, device, rank, world_size, state=state)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_forward_batches": self.forward_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forward_batches = int(state.get("teacher_forward_batches", 0))

    def interval_metrics(self) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {"teacher_forward_batches": self.forward_batches}
