"""Evaluation across ranks: k-NN top-1 and top-5 of the pooled embedding, the same through the classifier head, and
the student's agreement with each teacher (dali_kd.evaluation.agreement).

Each rank embeds its share of the k-NN bank and of the held-out split; the embeddings (and the head's predictions,
and the per-image agreement) are gathered, so every rank gets the same numbers. One pass over the held-out images
gives all of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dali_kd import distributed
from dali_kd.config import Config
from dali_kd.data import ImageIndex, make_eval_batches
from dali_kd.data.eval_quarantine import EvalQuarantine
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.evaluation.agreement import Agreement, Unstandardise, student_agreement, teacher_metric
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
    # The student's mean cosine agreement with each teacher, by its name (agreement, or agreement_<key> with
    # several teachers); None where it has no pooled output to compare.
    agreement: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self, prefix: str, suffix: str = "") -> dict[str, float | None]:
        """The accuracies named `<prefix>_knn_top1<suffix>` and so on, then the agreement by its own names."""
        return {
            f"{prefix}_knn_top1{suffix}": self.knn_top1,
            f"{prefix}_knn_top5{suffix}": self.knn_top5,
            f"{prefix}_head_top1{suffix}": self.head_top1,
            f"{prefix}_head_top5{suffix}": self.head_top5,
            **self.agreement,
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

    def _pass(
        self,
        outputs: Outputs,
        quarantine: EvalQuarantine,
        with_head: bool,
        agreement: Agreement | None = None,
    ):
        """L2-normalised embeddings, labels, (with_head) the head's predicted classes and (agreement) the
        per-image agreement of the split's usable images, gathered over ranks: per image its top class, then
        (5 classes or more) its 5 top-scored ones."""
        features, labels, predictions, scores = [], [], [], []
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
            if agreement is not None:
                scores.append(agreement.scores(batch.images))
        gather = distributed.gather_rows
        predicted = gather(torch.cat(predictions)) if predictions else None
        scored = gather(torch.cat(scores)) if scores else None
        return gather(torch.cat(features)), gather(torch.cat(labels)), predicted, scored

    @torch.no_grad()
    def evaluate(self, outputs: Outputs, agreement: Agreement | None = None) -> EvalResult | None:
        """The same numbers on every rank; None without held-out images. agreement: also score it over the
        held-out images (the mean of its per-image cosines)."""
        if self.val is None:
            return None
        bank, bank_labels, _, _ = self._pass(outputs, self.quarantines[0], with_head=False)
        queries, query_labels, predicted, scored = self._pass(
            outputs, self.quarantines[1], with_head=True, agreement=agreement
        )
        knn, knn_top5 = knn_accuracy(
            bank, bank_labels, queries, query_labels, self.num_classes, k=self.cfg.train.knn_k
        )
        head = head_top5 = None
        if predicted is not None:
            hits = predicted == query_labels[:, None]
            head = 100.0 * float(hits[:, 0].float().mean())
            if predicted.shape[1] > 1:  # the top class counts too: a tie at the top keeps top-5 >= top-1
                head_top5 = 100.0 * float(hits.any(dim=1).float().mean())
        said: dict[str, float | None] = {}
        if agreement is not None and scored is not None:
            means = scored.float().mean(dim=0).tolist()
            said = {
                name: m if math.isfinite(m) else None for name, m in zip(agreement.names, means, strict=True)
            }
        return EvalResult(knn, head, knn_top5, head_top5, said)


def evaluate_student(
    evaluator: Evaluator,
    student: Student,
    amp_dtype: torch.dtype | None,
    backbone: torch.nn.Module | None = None,
    teachers: dict[str, FrozenTeacher] | None = None,
    unstandardise: Unstandardise | None = None,
) -> EvalResult | None:
    """The student's results in eval mode (its previous mode restored after); backbone: evaluate these weights
    (the student's EMA) with the student's input instead; teachers (by key, in config order): also its
    agreement with each of them, through its adaptors (their outputs unstandardised where training standardised
    a teacher's targets)."""

    def outputs(images: torch.Tensor) -> ModelOutput:
        with autocast(evaluator.device, amp_dtype):
            return student.evaluate(images, backbone)

    agreement = None
    if teachers:
        agreement = student_agreement(student, teachers, evaluator.device, amp_dtype, unstandardise)
    was_training = student.training
    student.eval()
    try:
        return evaluator.evaluate(outputs, agreement)
    finally:
        student.train(was_training)


def evaluate_teachers(
    evaluator: Evaluator, teachers: dict[str, FrozenTeacher]
) -> dict[str, float | None] | None:
    """Each teacher's own k-NN and head results, named as the student's with `teacher` for `student` (and
    `_<key>` after them with several teachers); None without held-out images."""
    said: dict[str, float | None] = {}
    for key, teacher in teachers.items():
        result = evaluator.evaluate(teacher)
        if result is None:
            return None
        suffix = teacher_metric("", key, len(teachers))
        said.update(result.as_dict("teacher", suffix))
    return said
