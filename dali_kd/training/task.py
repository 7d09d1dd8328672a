"""The distillation task: the student's forward on every crop, paired with each teacher's targets, as named losses.

As in timm's distillation tasks and DINOv2's SSLMetaArch, the loop only calls `task(batch, targets)` and gets a
dict of losses back; one-view and multi-crop batches, autocast, DDP and torch.compile are decided here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dali_kd.config import LossConfig, ModelConfig
from dali_kd.data import Batch
from dali_kd.data.outputs import ModelOutput, view_major
from dali_kd.distributed import DistInfo
from dali_kd.models import Student, StudentOutput
from dali_kd.runtime import autocast
from dali_kd.training.losses import distillation_losses, label_loss, multi_crop_losses
from dali_kd.training.standardise import TeacherStandardiser

# One teacher's target tensor, or several teachers' (one each, in teacher order).
Targets = torch.Tensor | None | tuple[torch.Tensor | None, ...]


class TeacherLoss(NamedTuple):
    """How one teacher is distilled: its name in metrics, train.loss with the weights of the outputs it is not
    matched on (model.teachers[i].outputs) at 0, and its share of the total (loss_weight)."""

    key: str
    loss: LossConfig
    weight: float = 1.0


def teacher_losses(
    model: ModelConfig, loss: LossConfig, first: LossConfig | None = None
) -> list[TeacherLoss]:
    """Each teacher's TeacherLoss. first: the first teacher's loss where it is not train.loss (its logits off,
    build.teacher_head_loss). With several teachers the label loss is counted once, apart from theirs."""
    out = []
    several = len(model.teacher_specs) > 1
    for i, (key, spec) in enumerate(zip(model.teacher_keys, model.teacher_specs, strict=True)):
        base = first if i == 0 and first is not None else loss
        off = {
            name: 0.0
            for name, output in (
                ("feature_weight", "pooled"),
                ("patch_weight", "tokens"),
                ("logit_weight", "logits"),
            )
            if output not in spec.outputs
        }
        if several:
            off["label_weight"] = 0.0
        out.append(TeacherLoss(key, base.model_copy(update=off) if off else base, spec.loss_weight))
    return out


def as_targets(values: Targets) -> list[torch.Tensor | None]:
    return list(values) if isinstance(values, tuple) else [values]


def logits_match(student_out: ModelOutput, teacher_out: ModelOutput) -> bool:
    """The KL logit loss needs classifier heads of the same size."""
    s, t = student_out.logits, teacher_out.logits
    return s is not None and t is not None and s.shape[-1] == t.shape[-1]


class StudentLosses(nn.Module):
    """The student's forward on a batch's crops and its distillation losses against the teacher's targets, as one
    module: what DDP wraps and torch.compile compiles, so that the loss is fused into the student's graph (and its
    backward) instead of running as dozens of small eager kernels after it. Tensors in, a dict of losses out."""

    def __init__(
        self,
        student: Student,
        loss: LossConfig,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        teachers: Sequence[TeacherLoss] = (),
    ):
        """teachers: how each teacher is distilled (default: one teacher, by `loss`)."""
        super().__init__()
        self.student = student
        self.teachers = list(teachers) or [TeacherLoss("teacher", loss)]
        # One teacher is distilled by its own loss, label loss included.
        self.loss = self.teachers[0].loss if len(self.teachers) == 1 else loss
        self.device_type = device.type
        self.amp_dtype = amp_dtype

    def forward(
        self,
        images: torch.Tensor,
        local_images: torch.Tensor | None,
        teacher_pooled: Targets,
        teacher_logits: Targets,
        teacher_patches: Targets,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """images: [B, 3, S, S], or multi-crop's globals [B, G, 3, S, S] with local_images [B, N, 3, s, s] (or
        None); the teacher's outputs view-major ([G*B, ...]), as TeacherTargets gives them; with several
        teachers a tuple of each (one per teacher)."""
        targets = [
            ModelOutput(*parts)
            for parts in zip(
                as_targets(teacher_pooled),
                as_targets(teacher_logits),
                as_targets(teacher_patches),
                strict=True,
            )
        ]
        multi_crop = images.ndim == 5
        with autocast(self.device_type, self.amp_dtype):
            if multi_crop:
                local = None if local_images is None else view_major(local_images)
                student_out, local_out = self.student(view_major(images), local)
            else:
                student_out, local_out = self.student(images)
        if multi_crop:
            # The config allows multi-crop with one teacher only.
            return self._multi_crop_losses(images, labels, targets[0], student_out, local_out)
        if len(self.teachers) > 1:
            return self._several_teachers(student_out, targets, labels)
        target = targets[0]
        return distillation_losses(
            self.loss,
            student_pooled=student_out.projected,
            teacher_pooled=target.pooled,
            student_logits=student_out.raw.logits,
            teacher_logits=target.logits if logits_match(student_out.raw, target) else None,
            student_patches=student_out.patches,
            teacher_patches=target.patch_tokens,
            labels=labels,
        )

    def every_adaptor_learns(self) -> bool:
        """Every adaptor part gets a gradient each step: a pooled adaptor from its feature loss, a logits head from
        its logit loss (DDP must otherwise expect unused parameters)."""
        if len(self.teachers) == 1:
            return True
        # The student's own classifier learns the first teacher's logits and the labels.
        if self.teachers[0].loss.logit_weight == 0 and self.loss.label_weight == 0:
            return False
        for i, teacher in enumerate(self.teachers):
            adaptor = self.student.adaptor(i)
            if teacher.loss.feature_weight == 0 or teacher.weight == 0:
                return False
            if adaptor.logits is not None and teacher.loss.logit_weight == 0:
                return False
        return True

    def _several_teachers(
        self, student_out: StudentOutput, targets: list[ModelOutput], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each teacher's losses against its adaptor's outputs, times its loss_weight (`loss_<key>`, and each part
        as `loss_feature_<key>`, ...), plus the label loss once; their sum is `loss`."""
        out: dict[str, torch.Tensor] = {}
        total = student_out.projected.new_zeros((), dtype=torch.float32)
        for teacher, adapted, target in zip(self.teachers, student_out.adapted, targets, strict=True):
            assert adapted.pooled is not None  # every adaptor maps the pooled embedding
            parts = distillation_losses(
                teacher.loss,
                student_pooled=adapted.pooled,
                teacher_pooled=target.pooled,
                student_logits=adapted.logits,
                teacher_logits=target.logits if logits_match(adapted, target) else None,
                student_patches=adapted.patch_tokens,
                teacher_patches=target.patch_tokens,
            )
            weighted = teacher.weight * parts.pop("loss")
            out.update({f"{name}_{teacher.key}": value for name, value in parts.items()})
            out[f"loss_{teacher.key}"] = weighted
            total = total + weighted
        label = label_loss(self.loss, student_out.raw.logits, labels)
        if label is not None:
            out["loss_label"] = label
            total = total + self.loss.label_weight * label
        out["loss"] = total
        return out

    def _multi_crop_losses(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        targets: ModelOutput,
        student_out: StudentOutput,
        local_out: StudentOutput | None,
    ) -> dict[str, torch.Tensor]:
        """Per-pair distillation of every student crop toward the teacher's global crops (losses.multi_crop_losses)."""
        size = images.shape[0]

        def by_view(t: torch.Tensor | None) -> torch.Tensor | None:  # [V*B, ...] → [V, B, ...]
            return None if t is None else t.unflatten(0, (-1, size))

        def all_views(  # globals then locals: [V, B, ...]
            global_part: torch.Tensor | None, local_part: torch.Tensor | None
        ) -> torch.Tensor | None:
            if global_part is None or local_part is None:
                return by_view(global_part)
            return torch.cat([global_part.unflatten(0, (-1, size)), local_part.unflatten(0, (-1, size))])

        local_raw = None if local_out is None else local_out.raw
        student_pooled = all_views(student_out.projected, None if local_out is None else local_out.projected)
        assert student_pooled is not None  # the globals' projection is always there
        student = ModelOutput(
            student_pooled,
            all_views(student_out.raw.logits, None if local_raw is None else local_raw.logits),
            by_view(student_out.patches),
        )
        teacher = ModelOutput(
            by_view(targets.pooled),
            by_view(targets.logits) if logits_match(student_out.raw, targets) else None,
            by_view(targets.patch_tokens),
        )
        return multi_crop_losses(self.loss, images.shape[1], student, teacher, labels)


def wrap_student(
    module: StudentLosses, loss: LossConfig, device: torch.device, dist: DistInfo, compile: bool
) -> tuple[Callable[..., dict[str, torch.Tensor]], DistributedDataParallel | None]:
    """DDP wraps the student with its losses (the teacher is frozen), then torch.compile compiles the wrapped
    module: the student's forward and the losses in one graph. Returns what a step runs, and the DDP wrapper
    (None in a single process)."""
    ddp = None
    if dist.is_distributed:
        # Logits feed the loss only through the logit or label terms; otherwise DDP must expect unused params.
        uses_logits = loss.logit_weight > 0 or loss.label_weight > 0
        ddp = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not uses_logits or not module.every_adaptor_learns(),
        )
    wrapped: nn.Module = module if ddp is None else ddp
    return (torch.compile(wrapped) if compile else wrapped), ddp


class DistillTask:
    """`task(batch, targets)` → {"loss": total, "loss_feature": ..., ...}, every value a device tensor; targets: one
    ModelOutput per teacher (TeacherTargets.targets)."""

    def __init__(
        self,
        student: Student,
        loss: LossConfig,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        dist: DistInfo | None = None,
        compile: bool = False,
        teachers: Sequence[TeacherLoss] = (),
        standardiser: TeacherStandardiser | None = None,
    ):
        """teachers: how each teacher is distilled (default: one, by `loss`); standardiser: standardises the
        targets of the teachers that ask for it, before the loss (outside the compiled step: it keeps state)."""
        self.student = student
        self.loss = loss
        self.device = device
        self.amp_dtype = amp_dtype
        self.standardiser = standardiser
        self.forward_with_loss = StudentLosses(student, loss, device, amp_dtype, teachers)
        # What a step runs: forward_with_loss, DDP-wrapped and compiled as configured.
        self.student_step, self.ddp = wrap_student(
            self.forward_with_loss, loss, device, dist or DistInfo(), compile
        )

    def no_sync(self) -> AbstractContextManager:
        """Within it, backward adds to the gradients without DDP's all-reduce: the micro-batches before a step's
        last one (gradient accumulation, as timm and Lightning do), whose gradients the last one's all-reduce
        carries along. Nothing to skip in a single process."""
        return self.ddp.no_sync() if self.ddp is not None else nullcontext()

    def __call__(self, batch: Batch, targets: Sequence[ModelOutput]) -> dict[str, torch.Tensor]:
        if self.standardiser is not None:
            targets = self.standardiser(targets)
        if len(targets) == 1:
            pooled, logits, patches = targets[0].pooled, targets[0].logits, targets[0].patch_tokens
            return self.student_step(batch.images, batch.local_images, pooled, logits, patches, batch.labels)
        return self.student_step(
            batch.images,
            batch.local_images,
            tuple(t.pooled for t in targets),
            tuple(t.logits for t in targets),
            tuple(t.patch_tokens for t in targets),
            batch.labels,
        )
