"""Distillation losses: pure functions of student and teacher outputs, one per idea, and their weighted sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dali_kd.config import LossConfig


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher) over all vectors (last dim is the feature)."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher)


def kl_logit_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's KD: KL(teacher ‖ student) of temperature-softened distributions, times T² (timm's convention)."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def feature_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "cosine":
        return cosine_loss(student, teacher)
    if kind == "mse":
        return mse_loss(student, teacher)
    return cosine_loss(student, teacher) + mse_loss(student, teacher)


def distillation_losses(
    cfg: LossConfig,
    student_pooled: torch.Tensor,
    teacher_pooled: torch.Tensor,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_patches: torch.Tensor | None = None,
    teacher_patches: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Named loss parts (only those with a weight > 0 and the outputs they need) and their weighted sum `loss`.

    Computed in fp32 whatever the autocast dtype, so that bf16 logits do not round the KL away.
    """
    parts: dict[str, torch.Tensor] = {}
    total = student_pooled.new_zeros((), dtype=torch.float32)
    if cfg.feature_weight > 0:
        parts["loss_feature"] = feature_loss(cfg.feature, student_pooled.float(), teacher_pooled.float())
        total = total + cfg.feature_weight * parts["loss_feature"]
    if cfg.patch_weight > 0 and student_patches is not None and teacher_patches is not None:
        parts["loss_patch"] = feature_loss(cfg.feature, student_patches.float(), teacher_patches.float())
        total = total + cfg.patch_weight * parts["loss_patch"]
    if cfg.logit_weight > 0 and student_logits is not None and teacher_logits is not None:
        parts["loss_logit"] = kl_logit_loss(student_logits.float(), teacher_logits.float(), cfg.temperature)
        total = total + cfg.logit_weight * parts["loss_logit"]
    if cfg.label_weight > 0 and student_logits is not None and labels is not None:
        parts["loss_label"] = F.cross_entropy(student_logits.float(), labels)
        total = total + cfg.label_weight * parts["loss_label"]
    parts["loss"] = total
    return parts
