"""Evaluation across ranks: k-NN top-1 and top-5 of the pooled embedding, and the same through the classifier head.

Each rank embeds its share of the k-NN bank and of the held-out split; the embeddings (and the head's predictions)
are gathered, so every rank gets the same numbers. One pass over the held-out images gives both results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dali_kd import distributed
from dali_kd.config import Config
from dali_kd.data import ImageIndex, make_eval_batches
from dali_kd.data.eval_quarantine import EvalQuarantine
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.evaluation.knn import TOP_K, knn_accuracy
from dali_kd.models import FrozenTeacher, Student
from dali_kd.runtime import autocast

# A model's pooled embedding and logits for a batch of pipeline images (the eval transform's).
Outputs = Callable[[torch.Tensor], ModelOutput]


@dataclass
class EvalResult:
    """Accuracies in percent; the head's are None when the head does not have the data's classes, the top-5 ones
    None with fewer than 5 classes."""

    knn_top1: float
    head_top1: float | None
    knn_top5: float | None = None
    head_top5: float | None = None

    def as_dict(self, prefix: str) -> dict[str, float | None]:
        return {
            f"{prefix}_knn_top1": self.knn_top1,
            f"{prefix}_knn_top5": self.knn_top5,
            f"{prefix}_head_top1": self.head_top1,
            f"{prefix}_head_top5": self.head_top5,
        }


class Evaluator:
    """k-NN top-1 (and top-5) of val images against an (optionally subsampled) bank of training images, and the
    same through the model's classifier head where it has one output per class (train.eval_head), with the eval
    transform; top-5 where the data has at least 5 classes.

    Files set aside (by the training stream, see skip_files, or by a failed decode here) are left out of
    both; take_entries() gives the ones set aside here, as quarantine entries.
    """

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
                f"evaluation: {val_index.num_samples} val / {bank.num_samples} bank images are fewer than the "
                f"{world_size} processes (set data.val_root=null to skip it)"
            )
        self.bank = bank.share(rank, world_size)
        self.val = val_index.share(rank, world_size) if val_index is not None else None
        limit, backend = cfg.data.max_runtime_quarantine, cfg.data.backend
        self.quarantines = [EvalQuarantine("train", self.bank, backend, limit)]
        if self.val is not None:
            self.quarantines.append(EvalQuarantine("val", self.val, backend, limit))

    def skip_files(self, files: Callable[[str], Iterable[str]]) -> None:
        """files(split): the files of a split ("train" for the bank, "val") set aside elsewhere so far (ImageIndex.files
        entries), asked before each pass; evaluation skips them."""
        for quarantine in self.quarantines:
            quarantine.skip_files = functools.partial(files, quarantine.split)

    def take_entries(self) -> list[dict[str, str]]:
        """Files set aside in evaluation since the last call, as quarantine entries (with their split)."""
        return [entry for quarantine in self.quarantines for entry in quarantine.take_entries()]

    @property
    def enabled(self) -> bool:
        return self.val is not None

    def _head_scores(self, logits: torch.Tensor | None) -> bool:
        return self.cfg.train.eval_head and logits is not None and logits.shape[-1] == self.num_classes

    def _pass(self, outputs: Outputs, quarantine: EvalQuarantine, with_head: bool):
        """L2-normalised embeddings, labels and (with_head) the head's predicted classes of the split's usable
        images, gathered over ranks: per image its top class, then (5 classes or more) its 5 top-scored ones."""
        features, labels, predictions = [], [], []
        settings = self.cfg.stream_settings()
        for batch in quarantine.batches(
            lambda index: make_eval_batches(settings, index, self.device), settings.batch_size
        ):
            out = outputs(batch.images)
            assert out.pooled is not None  # a model's own outputs always have it
            features.append(F.normalize(out.pooled.float(), dim=-1))
            labels.append(batch.labels)
            if with_head and out.logits is not None and self._head_scores(out.logits):
                ranked = [out.logits.argmax(dim=-1, keepdim=True)]
                if self.num_classes >= TOP_K:
                    ranked.append(out.logits.topk(TOP_K, dim=-1).indices)
                predictions.append(torch.cat(ranked, dim=1))
        gather = distributed.gather_rows
        predicted = gather(torch.cat(predictions)) if predictions else None
        return gather(torch.cat(features)), gather(torch.cat(labels)), predicted

    @torch.no_grad()
    def evaluate(self, outputs: Outputs) -> EvalResult | None:
        """The same numbers on every rank; None without held-out images."""
        if self.val is None:
            return None
        bank, bank_labels, _ = self._pass(outputs, self.quarantines[0], with_head=False)
        queries, query_labels, predicted = self._pass(outputs, self.quarantines[1], with_head=True)
        knn, knn_top5 = knn_accuracy(
            bank, bank_labels, queries, query_labels, self.num_classes, k=self.cfg.train.knn_k
        )
        head = head_top5 = None
        if predicted is not None:
            hits = predicted == query_labels[:, None]
            head = 100.0 * float(hits[:, 0].float().mean())
            if predicted.shape[1] > 1:  # the top class counts too: a tie at the top keeps top-5 >= top-1
                head_top5 = 100.0 * float(hits.any(dim=1).float().mean())
        return EvalResult(knn, head, knn_top5, head_top5)


def evaluate_student(
    evaluator: Evaluator,
    student: Student,
    amp_dtype: torch.dtype | None,
    backbone: torch.nn.Module | None = None,
) -> EvalResult | None:
    """The student's results in eval mode (its previous mode restored after); backbone: evaluate these weights
    (the student's EMA) with the student's input instead."""

    def outputs(images: torch.Tensor) -> ModelOutput:
        with autocast(evaluator.device, amp_dtype):
            return student.evaluate(images, backbone)

    was_training = student.training
    student.eval()
    try:
        return evaluator.evaluate(outputs)
    finally:
        student.train(was_training)


def evaluate_teacher(evaluator: Evaluator, teacher: FrozenTeacher) -> EvalResult | None:
    return evaluator.evaluate(teacher)
