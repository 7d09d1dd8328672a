"""The distillation task: the student's forward on every crop, paired with the teacher's targets, as named losses.

As in timm's distillation tasks and DINOv2's SSLMetaArch, the loop only calls `task(batch, targets)` and gets a
dict of losses back; one-view and multi-crop batches, autocast, DDP and torch.compile are decided here.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from dali_kd.config import LossConfig
from dali_kd.data.batch import Batch
from dali_kd.distributed import DistInfo
from dali_kd.losses import distillation_losses, multi_crop_losses
from dali_kd.models import ModelOutput, Student, StudentOutput
from dali_kd.runtime import autocast
from dali_kd.targets import view_major


def wrap_student(student: Student, loss: LossConfig, device: torch.device, dist: DistInfo, compile: bool):
    """DDP wraps the student only (the teacher is frozen), then torch.compile compiles the wrapped student."""
    module: torch.nn.Module = student
    if dist.is_distributed:
        # Logits feed the loss only through the logit or label terms; otherwise DDP must expect unused params.
        uses_logits = loss.logit_weight > 0 or loss.label_weight > 0
        module = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not uses_logits,
        )
    return torch.compile(module) if compile else module


def logits_match(student_out: ModelOutput, teacher_out: ModelOutput) -> bool:
    """The KL logit loss needs classifier heads of the same size."""
    s, t = student_out.logits, teacher_out.logits
    return s is not None and t is not None and s.shape[-1] == t.shape[-1]


class DistillTask:
    """`task(batch, targets)` → {"loss": total, "loss_feature": ..., ...}, every value a device tensor."""

    def __init__(
        self,
        student: Student,
        loss: LossConfig,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        dist: DistInfo | None = None,
        compile: bool = False,
    ):
        self.student = student
        self.loss = loss
        self.device = device
        self.amp_dtype = amp_dtype
        self.student_step = wrap_student(student, loss, device, dist or DistInfo(), compile)

    def __call__(self, batch: Batch, targets: ModelOutput) -> dict[str, torch.Tensor]:
        return self.forward(batch, targets)

    def forward(self, batch: Batch, targets: ModelOutput) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.amp_dtype):
            if batch.multi_crop:
                local_images = None if batch.local_images is None else view_major(batch.local_images)
                student_out, local_out = self.student_step(view_major(batch.images), local_images)
            else:
                student_out, local_out = self.student_step(batch.images)
        if batch.multi_crop:
            return self._multi_crop_losses(batch, targets, student_out, local_out)
        return distillation_losses(
            self.loss,
            student_pooled=student_out.projected,
            teacher_pooled=targets.pooled,
            student_logits=student_out.raw.logits,
            teacher_logits=targets.logits if logits_match(student_out.raw, targets) else None,
            student_patches=student_out.patches,
            teacher_patches=targets.patch_tokens,
            labels=batch.labels,
        )

    def _multi_crop_losses(
        self, batch: Batch, targets: ModelOutput, student_out: StudentOutput, local_out: StudentOutput | None
    ) -> dict[str, torch.Tensor]:
        """Per-pair distillation of every student crop toward the teacher's global crops (losses.multi_crop_losses)."""
        size = len(batch)

        def by_view(t: torch.Tensor | None) -> torch.Tensor | None:  # [V*B, ...] → [V, B, ...]
            return None if t is None else t.unflatten(0, (-1, size))

        def all_views(  # globals then locals: [V, B, ...]
            global_part: torch.Tensor | None, local_part: torch.Tensor | None
        ) -> torch.Tensor | None:
            if global_part is None or local_part is None:
                return by_view(global_part)
            return torch.cat([by_view(global_part), by_view(local_part)])

        local_raw = None if local_out is None else local_out.raw
        return multi_crop_losses(
            self.loss,
            batch.images.shape[1],
            student_pooled=all_views(
                student_out.projected, None if local_out is None else local_out.projected
            ),
            teacher_pooled=by_view(targets.pooled),
            student_logits=all_views(student_out.raw.logits, None if local_raw is None else local_raw.logits),
            teacher_logits=by_view(targets.logits) if logits_match(student_out.raw, targets) else None,
            student_patches=by_view(student_out.patches),
            teacher_patches=by_view(targets.patch_tokens),
            labels=batch.labels,
        )
