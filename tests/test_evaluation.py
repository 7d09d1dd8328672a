"""Evaluation a KD user reports: head top-1 beside k-NN for the student and the teacher, and the student's EMA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dali_kd.data.dataset import ImageIndex
from dali_kd.data.outputs import ModelOutput
from dali_kd.evaluation.evaluator import Evaluator
from dali_kd.training.trainer import Trainer

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
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["student_ema_head_top1"] == summary["student_ema_head_top1"]
    raw = load_file(tmp_path / "run" / "student.safetensors")
    ema = load_file(tmp_path / "run" / "student_ema.safetensors")
    assert raw.keys() == ema.keys()
    # The average trails the trained weights: not a copy of them.
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    torch.testing.assert_close(ema["head.weight"], trainer.ema.backbone.head.weight.detach())


def test_the_ema_follows_the_update_rule(tiny_config):
    cfg = tiny_config("train.ema_decay=0.5", "train.ema_warmup=false")
    trainer = Trainer(cfg, CPU, show_progress=False)
    stream = iter(trainer.stream)
    trainer.train_step(next(stream))  # step 1: timm starts the average from the weights after the first step
    first = {k: v.clone() for k, v in trainer.student.backbone.state_dict().items()}
    torch.testing.assert_close(trainer.ema.backbone.state_dict()["head.weight"], first["head.weight"])
    trainer.train_step(next(stream))
    second = trainer.student.backbone.state_dict()
    torch.testing.assert_close(
        trainer.ema.backbone.state_dict()["head.weight"],
        0.5 * first["head.weight"] + 0.5 * second["head.weight"],
    )


def test_no_ema_no_ema_file(tiny_config, tmp_path):
    summary = Trainer(
        tiny_config("train.epochs=1", "train.max_steps_per_epoch=1"), CPU, show_progress=False
    ).fit(tmp_path / "run")
    assert summary["student_ema_knn_top1"] is None
    assert not (tmp_path / "run" / "student_ema.safetensors").exists()
