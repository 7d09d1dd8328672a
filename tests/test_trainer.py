"""The distillation loop on tiny models: loss falls, the teacher stays frozen, step caps, artifacts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dali_kd.models import FrozenTeacher, build_model, strip_wrapper_prefixes
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_teacher_never_changes(tiny_config, tmp_path):
    cfg = tiny_config(
        "train.epochs=4",
        "train.max_steps_per_epoch=6",
        "train.optimizer.lr=0.003",
        "train.optimizer.warmup_steps=2",
    )
    trainer = Trainer(cfg, CPU, show_progress=False)
    before = {k: v.clone() for k, v in trainer.parts.teacher.state_dict().items()}
    trainer.parts.teacher.train()  # a stray train() must not unfreeze it
    assert not trainer.parts.teacher.training and not trainer.parts.teacher.model.training
    summary = trainer.fit(tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    assert len(rows) == 24
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.8 * first, f"loss should fall: first {first:.4f}, last {last:.4f}"
    after = trainer.parts.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights (incl. BN stats) changed"
    assert all(p.grad is None and not p.requires_grad for p in trainer.parts.teacher.parameters())
    assert summary["steps"] == 24


def test_step_cap_and_stream_continue_across_epochs(tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=3", "train.max_steps_per_epoch=2", "train.batch_size=8")
    trainer = Trainer(cfg, CPU, show_progress=False)
    seen: list[list[int]] = []
    original = trainer.train_step

    def record(batch):
        seen.append(batch.sample_ids.tolist())
        return original(batch)

    trainer.train_step = record
    summary = trainer.fit(tmp_path / "run")
    assert summary["steps"] == 6 and summary["steps_per_epoch"] == 2
    rows = read_rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]
    ids = [i for batch in seen for i in batch]
    # 48 images, 6 steps of 8: one whole pass with no repeats — epoch 2 did not restart at epoch 1's images.
    assert sorted(ids) == list(range(48))


def test_run_directory_artifacts(tiny_config, tmp_path):
    cfg = tiny_config()
    run_dir = tmp_path / "run"
    summary = Trainer(cfg, CPU, show_progress=False).fit(run_dir)
    for key in (
        "steps",
        "epochs",
        "final_loss",
        "images_per_sec",
        "student_knn_top1",
        "teacher_knn_top1",
        "num_classes",
        "device",
        "backend",
        "world_size",
        "wall_s",
    ):
        assert key in summary
    saved = json.loads((run_dir / "summary.json").read_text())
    assert (
        saved["steps"] == summary["steps"] == 6 and saved["student_knn_top1"] == summary["student_knn_top1"]
    )
    assert summary["num_classes"] == 4 and summary["device"] == "cpu" and summary["backend"] == "dali"
    assert 0 <= summary["student_knn_top1"] <= 100
    row = read_rows(run_dir)[0]
    assert {"step", "epoch", "loss", "loss_feature", "loss_logit", "lr", "img_per_s"} <= set(row)
    assert "train:" in (run_dir / "config.yaml").read_text()
    # The saved student loads into a bare timm model: no wrapper prefixes.
    weights = load_file(run_dir / "student.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.", "backbone.")) for k in weights)
    fresh = build_model(cfg.model.student, "student", 32, 4)
    fresh.load_state_dict(weights)


def test_student_checkpoint_round_trip_and_prefixes(tiny_config, tmp_path):
    cfg = tiny_config()
    run_dir = tmp_path / "run"
    Trainer(cfg, CPU, show_progress=False).fit(run_dir)
    resumed = tiny_config(f"model.student.checkpoint={run_dir / 'student.safetensors'}")
    trainer = Trainer(resumed, CPU, show_progress=False)
    saved = load_file(run_dir / "student.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in trainer.parts.student.backbone.state_dict().items())
    assert strip_wrapper_prefixes({"module._orig_mod.a.b": 1}) == {"a.b": 1}


def test_torch_checkpoint_loads_with_weights_only(tiny_config, tmp_path):
    cfg = tiny_config()
    teacher = build_model(cfg.model.teacher, "teacher", 32, 4)
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}}, path)
    loaded = Trainer(
        tiny_config(f"model.teacher.checkpoint={path}"), CPU, show_progress=False
    ).parts.teacher.model
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in loaded.state_dict().items())


def test_frozen_teacher_output_is_trainable_target(tiny_config):
    cfg = tiny_config()
    teacher = FrozenTeacher(build_model(cfg.model.teacher, "teacher", 32, 4), None)
    out = teacher(torch.randn(2, 3, 32, 32))
    assert not out.pooled.requires_grad and not out.pooled.is_inference()


@pytest.mark.slow
def test_compiled_student_trains(tiny_config, tmp_path):
    """The torch.compile path runs on the CPU and gives the same first-step loss as eager mode."""
    eager = Trainer(tiny_config("train.epochs=1", "train.max_steps_per_epoch=2"), CPU, show_progress=False)
    compiled = Trainer(
        tiny_config("train.epochs=1", "train.max_steps_per_epoch=2", "train.compile_student=true"),
        CPU,
        show_progress=False,
    )
    assert compiled.parts.task.student_step is not compiled.parts.student
    eager_summary = eager.fit(tmp_path / "eager")
    compiled_summary = compiled.fit(tmp_path / "compiled")
    assert compiled_summary["steps"] == 2
    assert read_rows(tmp_path / "compiled")[0]["loss"] == pytest.approx(
        read_rows(tmp_path / "eager")[0]["loss"], rel=1e-3
    )
    assert eager_summary["compiled_student"] is False and compiled_summary["compiled_student"] is True


def test_weights_of_another_architecture_are_a_user_error(tiny_config, tmp_path):
    from dali_kd.errors import UserError
    from dali_kd.io import save_safetensors_atomic

    cfg = tiny_config("model.teacher.name=resnet10t")
    path = tmp_path / "resnet10t.safetensors"
    save_safetensors_atomic(path, build_model(cfg.model.teacher, "teacher", 32, 4).state_dict())
    with pytest.raises(
        UserError, match=r"model\.teacher\.checkpoint .*weights do not fit teacher: size mismatch"
    ):
        Trainer(tiny_config(f"model.teacher.checkpoint={path}"), CPU, show_progress=False)


@pytest.mark.parametrize("student", ["mobilenetv3_small_050", "lcnet_050"])
def test_a_student_whose_pooled_embedding_is_wider_than_its_feature_map_trains(
    tiny_config, tmp_path, student
):
    """MobileNetV3 and LCNet pool, then widen through a convolution before the classifier (pre-logits 1024 or 1280
    against a 576- or 512-channel feature map): the projector must be built on what the model really pools to."""
    summary = Trainer(
        tiny_config(f"model.student.name={student}", "train.epochs=1", "train.max_steps_per_epoch=1"),
        CPU,
        show_progress=False,
    ).fit(tmp_path / "run")
    assert summary["steps"] == 1
    assert load_file(tmp_path / "run" / "student.safetensors")
