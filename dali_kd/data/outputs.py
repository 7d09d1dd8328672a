"""What a model returns for a batch of images, shared by the models, the teacher's targets, the teacher cache and
the batch that carries cached outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """pooled: [B, D] embedding before the classifier (None only from a teacher cache that stores none);
    logits: [B, C] or None; patch_tokens: [B, N, D] or None."""

    pooled: torch.Tensor | None
    logits: torch.Tensor | None
    patch_tokens: torch.Tensor | None


def view_major(crops: torch.Tensor) -> torch.Tensor:
    """[B, V, ...] crops → [V*B, ...], crop 0 of every sample first (how DINO batches its crops)."""
    return crops.transpose(0, 1).flatten(0, 1)
