"""The student's agreement with each teacher: per held-out image, the cosine of its adaptor's pooled output for that
teacher with the teacher's own pooled embedding (1: the same direction, 0: unrelated); the evaluator averages it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dali_kd.data.outputs import ModelOutput
from dali_kd.models import FrozenTeacher, Student
from dali_kd.runtime import autocast


def teacher_metric(name: str, key: str, num_teachers: int) -> str:
    """A per-teacher result's name: `name` with one teacher (the names a single-teacher run has always had),
    `name_<key>` with several."""
    return name if num_teachers == 1 else f"{name}_{key}"


@dataclass
class Agreement:
    """names: one per teacher (agreement, or agreement_<key>); scores(images): [B, len(names)] cosines for a
    batch of pipeline images, NaN in a column whose adaptor has no pooled output."""

    names: list[str]
    scores: Callable[[torch.Tensor], torch.Tensor]


def cosines(adapted: torch.Tensor | None, target: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Per row, the cosine of the two embeddings in fp32 (NaN where either is missing)."""
    if adapted is None or target is None:
        return torch.full((batch,), float("nan"))
    return F.cosine_similarity(adapted.float(), target.float(), dim=-1)


# The adaptors' outputs back in each teacher's own scale, where training standardised its targets
# (dali_kd.training.standardise.TeacherStandardiser.unstandardise).
Unstandardise = Callable[[list[ModelOutput]], list[ModelOutput]]


def student_agreement(
    student: Student,
    teachers: dict[str, FrozenTeacher],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    unstandardise: Unstandardise | None = None,
) -> Agreement:
    """The student's adaptor outputs (Student.teacher_outputs, in the student's precision; unstandardised where
    training standardised a teacher's targets) against each teacher's pooled embedding, teachers by key in config
    order; eval mode is the caller's."""
    frozen = list(teachers.values())

    def scores(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            adapted = student.teacher_outputs(images)
        if unstandardise is not None:
            adapted = unstandardise(adapted)
        columns = [
            cosines(out.pooled, teacher(images).pooled, len(images)).to(images.device)
            for out, teacher in zip(adapted, frozen, strict=True)
        ]
        return torch.stack(columns, dim=1)

    return Agreement([teacher_metric("agreement", key, len(teachers)) for key in teachers], scores)
