"""The distillation task: the student's forward on every crop, paired with the teacher's targets, as named losses.

As in timm's distillation tasks and DINOv2's SSLMetaArch, the loop only calls `task(batch, targets)` and gets a
dict of losses back; one-view and multi-crop batches, autocast, DDP and torch.compile are decided here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dali_kd.config import LossConfig
from dali_kd.data import Batch
from dali_kd.data.outputs import ModelOutput, view_major
from dali_kd.distributed import DistInfo
from dali_kd.models import Student, StudentOutput
from dali_kd.runtime import autocast
from dali_kd.training.losses import distillation_losses, multi_crop_losses


def logits_match(student_out: ModelOutput, teacher_out: ModelOutput) -> bool:
    """The KL logit loss needs classifier heads of the same size."""
    s, t = student_out.logits, teacher_out.logits
    return s is not None and t is not None and s.shape[-1] == t.shape[-1]


class StudentLosses(nn.Module):
    """The student's forward on a batch's crops and its distillation losses against the teacher's targets, as one
    module: what DDP wraps and torch.compile compiles, so that the loss is fused into the student's graph (and its
    backward) instead of running as dozens of small eager kernels after it. Tensors in, a dict of losses out."""

    def __init__(
        self, student: Student, loss: LossConfig, device: torch.device, amp_dtype: torch.dtype | None
    ):
        super().__init__()
        self.student = student
        self.loss = loss
        self.device_type = device.type
        self.amp_dtype = amp_dtype

    def forward(
        self,
        images: torch.Tensor,
        local_images: torch.Tensor | None,
        teacher_pooled: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        teacher_patches: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """images: [B, 3, S, S], or multi-crop's globals [B, G, 3, S, S] with local_images [B, N, 3, s, s] (or
        None); the teacher's outputs view-major ([G*B, ...]), as TeacherTargets gives them."""
        targets = ModelOutput(teacher_pooled, teacher_logits, teacher_patches)
        multi_crop = images.ndim == 5
        with autocast(self.device_type, self.amp_dtype):
            if multi_crop:
                local = None if local_images is None else view_major(local_images)
                student_out, local_out = self.student(view_major(images), local)
            else:
                student_out, local_out = self.student(images)
        if multi_crop:
            return self._multi_crop_losses(images, labels, targets, student_out, local_out)
        return distillation_losses(
            self.loss,
            student_pooled=student_out.projected,
            teacher_pooled=targets.pooled,
            student_logits=student_out.raw.logits,
            teacher_logits=targets.logits if logits_match(student_out.raw, targets) else None,
            student_patches=student_out.patches,
            teacher_patches=targets.patch_tokens,
            labels=labels,
        )

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
        return multi_crop_losses(
            self.loss,
            images.shape[1],
            student_pooled=student_pooled,
            teacher_pooled=by_view(targets.pooled),
            student_logits=all_views(student_out.raw.logits, None if local_raw is None else local_raw.logits),
            teacher_logits=by_view(targets.logits) if logits_match(student_out.raw, targets) else None,
            student_patches=by_view(student_out.patches),
            teacher_patches=by_view(targets.patch_tokens),
            labels=labels,
        )


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
            find_unused_parameters=not uses_logits,
        )
    wrapped: nn.Module = module if ddp is None else ddp
    return (torch.compile(wrapped) if compile else wrapped), ddp


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
        self.forward_with_loss = StudentLosses(student, loss, device, amp_dtype)
        # What a step runs: forward_with_loss, DDP-wrapped and compiled as configured.
        self.student_step, self.ddp = wrap_student(
            self.forward_with_loss, loss, device, dist or DistInfo(), compile
        )

    def no_sync(self) -> AbstractContextManager:
        """Within it, backward adds to the gradients without DDP's all-reduce: the micro-batches before a step's
        last one (gradient accumulation, as timm and Lightning do), whose gradients the last one's all-reduce
        carries along. Nothing to skip in a single process."""
        return self.ddp.no_sync() if self.ddp is not None else nullcontext()

    def __call__(self, batch: Batch, targets: ModelOutput) -> dict[str, torch.Tensor]:
        return self.student_step(
            batch.images,
            batch.local_images,
            targets.pooled,
            targets.logits,
            targets.patch_tokens,
            batch.labels,
        )
