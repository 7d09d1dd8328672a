"""Evaluation a KD user reports: head top-1 beside k-NN for the student and the teacher, top-5 beside top-1 with 5
classes or more, and the student's EMA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dali_kd.data.dataset import ImageIndex
from dali_kd.data.outputs import ModelOutput
from dali_kd.evaluation.evaluator import Evaluator
from dali_kd.evaluation.knn import knn_accuracy
from dali_kd.training.trainer import Trainer
from tests.conftest import write_tree
from tests.faults import tiny_args

CPU = torch.device("cpu")


@pytest.fixture
def evaluator(tiny_config, image_tree):
    cfg = tiny_config()
    train, val = ImageIndex.from_folder(image_tree / "train"), ImageIndex.from_folder(image_tree / "val")
    return Evaluator(cfg, train, val, CPU)


def always(cls: int, num_outputs: int):
    """A model that embeds by mean colour and whose head always says `cls`."""

    def outputs(images: torch.Tensor) -> ModelOutput:
        logits = torch.zeros(len(images), num_outputs)
        logits[:, cls] = 1.0
        return ModelOutput(pooled=images.mean(dim=(2, 3)), logits=logits, patch_tokens=None)

    return outputs


def test_head_top1_scores_the_heads_predictions_against_the_labels(evaluator):
    # The val split has 4 images in each of 4 classes: a head that always says class 2 is right on a quarter.
    result = evaluator.evaluate(always(2, 4))
    assert result.head_top1 == pytest.approx(25.0)
    assert 0 <= result.knn_top1 <= 100


def test_a_head_without_the_datas_classes_is_not_scored(evaluator, tiny_config, image_tree):
    assert evaluator.evaluate(always(2, 1000)).head_top1 is None
    cfg = tiny_config("train.eval_head=false")
    train, val = ImageIndex.from_folder(image_tree / "train"), ImageIndex.from_folder(image_tree / "val")
    assert Evaluator(cfg, train, val, CPU).evaluate(always(2, 4)).head_top1 is None


def test_a_run_reports_head_knn_and_ema_results_and_saves_the_ema(tiny_config, tmp_path):
    cfg = tiny_config("train.ema_decay=0.5", "train.epochs=2", "train.max_steps_per_epoch=3")
    trainer = Trainer(cfg, CPU, show_progress=False)
    summary = trainer.fit(tmp_path / "run")
    for key in ("student_knn_top1", "student_head_top1", "teacher_knn_top1", "teacher_head_top1",
                "student_ema_knn_top1", "student_ema_head_top1"):  # fmt: skip
        assert 0 <= summary[key] <= 100, key
    last = summary["knn_history"][-1]
    assert last["student_head_top1"] == summary["student_head_top1"]
    assert last["student_ema_knn_top1"] == summary["student_ema_knn_top1"]
    # One teacher: its results keep their names, and the student's agreement with it is `agreement`.
    assert -1 <= summary["agreement"] <= 1 and last["agreement"] == summary["agreement"]
    assert not [k for k in summary if k.startswith(("teacher_knn_top1_", "agreement_"))]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["student_ema_head_top1"] == summary["student_ema_head_top1"]
    raw = load_file(tmp_path / "run" / "student.safetensors")
    ema = load_file(tmp_path / "run" / "student_ema.safetensors")
    assert raw.keys() == ema.keys()
    # The average trails the trained weights: not a copy of them.
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    torch.testing.assert_close(ema["head.weight"], trainer.parts.ema.backbone.head.weight.detach())


def test_the_ema_follows_the_update_rule(tiny_config):
    cfg = tiny_config("train.ema_decay=0.5", "train.ema_warmup=false")
    trainer = Trainer(cfg, CPU, show_progress=False)
    stream = iter(trainer.parts.stream)
    trainer.train_step(next(stream))  # step 1: timm starts the average from the weights after the first step
    first = {k: v.clone() for k, v in trainer.parts.student.backbone.state_dict().items()}
    torch.testing.assert_close(trainer.parts.ema.backbone.state_dict()["head.weight"], first["head.weight"])
    trainer.train_step(next(stream))
    second = trainer.parts.student.backbone.state_dict()
    torch.testing.assert_close(
        trainer.parts.ema.backbone.state_dict()["head.weight"],
        0.5 * first["head.weight"] + 0.5 * second["head.weight"],
    )


def test_no_ema_no_ema_file(tiny_config, tmp_path):
    summary = Trainer(
        tiny_config("train.epochs=1", "train.max_steps_per_epoch=1"), CPU, show_progress=False
    ).fit(tmp_path / "run")
    assert summary["student_ema_knn_top1"] is None
    assert not (tmp_path / "run" / "student_ema.safetensors").exists()


def ranked(num_outputs: int):
    """A model whose head ranks the classes 0, 1, 2, ... for every image (and embeds by mean colour)."""

    def outputs(images: torch.Tensor) -> ModelOutput:
        logits = -torch.arange(num_outputs, dtype=torch.float32).expand(len(images), -1)
        return ModelOutput(pooled=images.mean(dim=(2, 3)), logits=logits, patch_tokens=None)

    return outputs


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory):
    base = tmp_path_factory.mktemp("six")
    write_tree(base / "train", num_classes=6, per_class=4, seed=0)
    write_tree(base / "val", num_classes=6, per_class=2, seed=1)
    return base


def test_knn_top5_counts_the_right_class_third_nearest_and_top1_does_not():
    # One bank image per class, at cosine 1, 0.99, 0.97, 0, -1, 0 from the query direction [1, 0].
    bank = F.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [-1, 0], [0, -1]]), dim=1)
    bank_labels = torch.arange(6)
    queries = torch.tensor([[1.0, 0], [1.0, 0]])
    labels = torch.tensor([2, 0])  # the first query's class is the 3rd nearest; the second's the nearest
    assert knn_accuracy(bank, bank_labels, queries, labels, 6, k=3) == (50.0, 100.0)
    # With 2 neighbours the 3rd class gets no vote: not in the top 5, though only two classes rank above it.
    assert knn_accuracy(bank, bank_labels, queries, labels, 6, k=2) == (50.0, 50.0)
    # Fewer than 5 classes: no top-5.
    four = bank_labels.clamp(max=3)
    assert knn_accuracy(bank, four, queries, labels, 4, k=3)[1] is None


def test_head_top5_counts_the_5_top_scored_classes(tiny_config, six_classes):
    cfg = tiny_config()
    train, val = ImageIndex.from_folder(six_classes / "train"), ImageIndex.from_folder(six_classes / "val")
    result = Evaluator(cfg, train, val, CPU).evaluate(ranked(6))
    # 2 val images per class; the head's top class is 0, its top 5 are 0-4: class 5 alone is missed.
    assert result.head_top1 == pytest.approx(100 / 6) and result.head_top5 == pytest.approx(500 / 6)
    assert result.knn_top5 is not None and result.knn_top5 >= result.knn_top1


def test_fewer_than_5_classes_have_no_top5(evaluator):
    result = evaluator.evaluate(ranked(4))  # 4 classes
    assert result.knn_top5 is None and result.head_top5 is None and result.head_top1 == pytest.approx(25.0)


@pytest.mark.parametrize("num_classes", [6, 4])
def test_a_run_reports_top5_beside_top1_with_5_classes_or_more(
    image_tree, six_classes, tmp_path, capsys, num_classes
):
    from dali_kd.commands import train

    tree = six_classes if num_classes == 6 else image_tree
    args = [
        *tiny_args(tree, tmp_path / "runs"),
        f"model.teacher.num_classes={num_classes}",
        "train.ema_decay=0.5",
    ]
    assert train.main(args) == 0
    said = "".join(capsys.readouterr())
    summary = json.loads((tmp_path / "runs" / "fault" / "summary.json").read_text())
    keys = [f"{who}_{how}" for who in ("student", "teacher", "student_ema") for how in ("knn", "head")]
    if num_classes == 4:
        # The keys are there, null, as a head's top-1 is for a head without the data's classes; nothing says them.
        assert all(summary[f"{key}_top5"] is None for key in keys)
        assert all(f"{key}_top5" in summary["knn_history"][-1] for key in keys if key.startswith("student"))
        assert "top-5" not in said
        return
    for key in keys:
        assert summary[f"{key}_top1"] <= summary[f"{key}_top5"] <= 100, key
    assert summary["knn_history"][-1]["student_knn_top5"] == summary["student_knn_top5"]
    assert f"k-NN top-5 {summary['teacher_knn_top5']:.1f}%" in said  # the teacher's line before training
    assert f"student k-NN top-5 {summary['student_knn_top5']:.1f}% (teacher" in said  # the final lines
    assert f"student head top-5 {summary['student_head_top5']:.1f}% (teacher" in said
    assert f"EMA k-NN top-5 {summary['student_ema_knn_top5']:.1f}%" in said  # the epoch's evaluation line
