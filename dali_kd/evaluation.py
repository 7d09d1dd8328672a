"""k-NN evaluation across ranks: each rank embeds its shard of the bank and of the held-out split, all gather."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dali_kd import distributed
from dali_kd.config import Config
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_eval_batches
from dali_kd.errors import UserError
from dali_kd.knn import extract_embeddings, knn_top1
from dali_kd.models import FrozenTeacher, Student, model_outputs
from dali_kd.runtime import autocast


class KnnEvaluator:
    """k-NN top-1 of val images against an (optionally subsampled) bank of training images, eval transform."""

    def __init__(
        self,
        cfg: Config,
        train_index: ImageIndex,
        val_index: ImageIndex | None,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg = cfg
        self.device = device
        self.num_classes = train_index.num_classes
        bank = train_index.subset(cfg.train.knn_bank_size)
        if val_index is not None and min(bank.num_samples, val_index.num_samples) < world_size:
            raise UserError(
                f"k-NN evaluation: {val_index.num_samples} val / {bank.num_samples} bank images are fewer than the "
                f"{world_size} processes (set data.val_root=null to skip it)"
            )
        self.bank = bank.shard(rank, world_size)
        self.val = val_index.shard(rank, world_size) if val_index is not None else None

    @property
    def enabled(self) -> bool:
        return self.val is not None

    def _embed_all(self, embed: Callable[[torch.Tensor], torch.Tensor], index: ImageIndex):
        batches = make_eval_batches(self.cfg, index, self.device, self.cfg.train.batch_size)
        features, labels = extract_embeddings(embed, batches)
        return distributed.gather_rows(features), distributed.gather_rows(labels)

    @torch.no_grad()
    def accuracy(self, embed: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        """The same number on every rank (every rank holds the gathered embeddings)."""
        if self.val is None:
            return None
        bank, bank_labels = self._embed_all(embed, self.bank)
        queries, query_labels = self._embed_all(embed, self.val)
        return knn_top1(bank, bank_labels, queries, query_labels, self.num_classes, k=self.cfg.train.knn_k)


def student_accuracy(
    evaluator: KnnEvaluator, student: Student, amp_dtype: torch.dtype | None
) -> float | None:
    """The student backbone's k-NN top-1 (eval mode for the evaluation, the previous mode restored after)."""
    backbone = student.backbone
    device_type = evaluator.device.type

    def embed(images: torch.Tensor) -> torch.Tensor:
        with autocast(device_type, amp_dtype):
            return model_outputs(backbone, images, with_patches=False).pooled

    was_training = student.training
    student.eval()
    try:
        return evaluator.accuracy(embed)
    finally:
        student.train(was_training)


def teacher_accuracy(evaluator: KnnEvaluator, teacher: FrozenTeacher) -> float | None:
    return evaluator.accuracy(lambda images: teacher(images).pooled)
