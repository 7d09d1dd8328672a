"""Distillation losses: pure functions of student and teacher outputs, one per idea, and their weighted sum."""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F

from dali_kd.config import LossConfig
from dali_kd.data.outputs import ModelOutput


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
    if kind == "cosine+smooth_l1":
        return cosine_loss(student, teacher) + F.smooth_l1_loss(student, teacher)
    return cosine_loss(student, teacher) + mse_loss(student, teacher)


def label_loss(
    cfg: LossConfig, student_logits: torch.Tensor | None, labels: torch.Tensor | None
) -> torch.Tensor | None:
    """Cross-entropy of the student's own classifier with the labels (None: no label loss asked, or no logits)."""
    if cfg.label_weight > 0 and student_logits is not None and labels is not None:
        return F.cross_entropy(student_logits.float(), labels)
    return None


def distillation_losses(
    cfg: LossConfig,
    student_pooled: torch.Tensor,
    teacher_pooled: torch.Tensor | None,
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
        # The config refuses a feature loss without the teacher's pooled output (a cache storing none).
        assert teacher_pooled is not None
        parts["loss_feature"] = feature_loss(cfg.feature, student_pooled.float(), teacher_pooled.float())
        total = total + cfg.feature_weight * parts["loss_feature"]
    if cfg.patch_weight > 0 and student_patches is not None and teacher_patches is not None:
        parts["loss_patch"] = feature_loss(cfg.feature, student_patches.float(), teacher_patches.float())
        total = total + cfg.patch_weight * parts["loss_patch"]
    if cfg.logit_weight > 0 and student_logits is not None and teacher_logits is not None:
        parts["loss_logit"] = kl_logit_loss(student_logits.float(), teacher_logits.float(), cfg.temperature)
        total = total + cfg.logit_weight * parts["loss_logit"]
    label = label_loss(cfg, student_logits, labels)
    if label is not None:
        parts["loss_label"] = label
        total = total + cfg.label_weight * label
    parts["loss"] = total
    return parts


def view_pairs(
    num_global: int, num_local: int, global_pairing: str
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Multi-crop pairing, as (student view, teacher global crop) pairs: (global pairs, local pairs).

    Views are numbered globals first. A student global crop learns the teacher's output on the same crop (same),
    on the other global crops (cross, as DINO does) or on all of them (all); every local crop learns the teacher's
    output on every global crop (the teacher never sees a local crop).
    """
    globals_ = range(num_global)
    if global_pairing == "same":
        global_pairs = [(g, g) for g in globals_]
    elif global_pairing == "cross":
        if num_global < 2:
            raise ValueError("cross pairing needs at least 2 global crops")
        global_pairs = [(g, t) for g in globals_ for t in globals_ if t != g]
    elif global_pairing == "all":
        global_pairs = [(g, t) for g in globals_ for t in globals_]
    else:
        raise ValueError(f"unknown global pairing {global_pairing!r}")
    local_pairs = [(num_global + v, t) for v in range(num_local) for t in globals_]
    return global_pairs, local_pairs


@overload
def _pick(outputs: torch.Tensor, index: list[int]) -> torch.Tensor: ...
@overload
def _pick(outputs: torch.Tensor | None, index: list[int]) -> torch.Tensor | None: ...
def _pick(outputs: torch.Tensor | None, index: list[int]) -> torch.Tensor | None:
    """[V, B, ...] outputs → the chosen views concatenated along the batch: [len(index) * B, ...].

    Python-int indexing gives views; indexing with the list itself would upload an index tensor to the GPU,
    a host sync on every step.
    """
    return None if outputs is None else torch.cat([outputs[i] for i in index])


def multi_crop_losses(
    cfg: LossConfig,
    num_global: int,
    student: ModelOutput,
    teacher: ModelOutput,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Distillation over multi-crop pairs (see view_pairs): per view kind and their pair-weighted total `loss`.

    Student outputs are view-major, [V, B, ...] with the globals first (its pooled embedding always there);
    teacher outputs [G, B, ...] for the G global crops. Each pair contributes distillation_losses(student view,
    teacher crop); the total is the mean over pairs, a local pair counting cfg.local_weight. Patch tokens are
    distilled on same-crop global pairs only (only there do the token grids line up). Returned: `loss`,
    `loss_global`, `loss_local` and every part suffixed with its kind (`loss_feature_global`, ...).
    """
    student_pooled = student.pooled
    assert student_pooled is not None  # the student's own outputs always have it
    num_views = student_pooled.shape[0]
    global_pairs, local_pairs = view_pairs(num_global, num_views - num_global, cfg.global_pairing)
    out: dict[str, torch.Tensor] = {}
    weighted = []
    for kind, pairs, weight in (("global", global_pairs, 1.0), ("local", local_pairs, cfg.local_weight)):
        if not pairs:
            continue
        s_idx, t_idx = [s for s, _ in pairs], [t for _, t in pairs]
        same = [g for g in range(num_global) if (g, g) in pairs]
        parts = distillation_losses(
            cfg,
            _pick(student_pooled, s_idx),
            _pick(teacher.pooled, t_idx),
            _pick(student.logits, s_idx),
            _pick(teacher.logits, t_idx),
            _pick(student.patch_tokens, same) if same else None,
            _pick(teacher.patch_tokens, same) if same else None,
            None if labels is None else labels.repeat(len(pairs)),
        )
        for name, value in parts.items():
            out[f"{name}_{kind}"] = value
        weighted.append((parts["loss"], weight * len(pairs)))
    # Global pairs always exist (at least one global crop, weight 1), so the total weight is positive.
    total = weighted[0][0] * weighted[0][1]
    for loss, w in weighted[1:]:
        total = total + loss * w
    out["loss"] = total / sum(w for _, w in weighted)
    return out
