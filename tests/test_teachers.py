"""Several teachers, one student: a list of one is the single teacher bit for bit; each teacher is built, fed and
named on its own; each adaptor learns from its own teacher only; per-teacher losses, timing, standardisation and
heads reach the metrics and the checkpoint, and a resume is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dali_kd.config import LossConfig, ModelConfig
from dali_kd.data.batch import Batch
from dali_kd.errors import UserError
from dali_kd.models import build_distill_models
from dali_kd.models.inputs import InputSpec
from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD
from dali_kd.runs import checkpoint as ckpt
from dali_kd.teacher_cache.live import LiveTeacher
from dali_kd.training.standardise import TeacherStandardiser
from dali_kd.training.task import DistillTask, teacher_losses
from dali_kd.training.trainer import Trainer
from tests.conftest import tiny_overrides

CPU = torch.device("cpu")
VIEWS = InputSpec(48, IMAGENET_MEAN, IMAGENET_STD)  # the views a stream hands out: the largest model's size
HALF = [0.5, 0.5, 0.5]
# A CNN teacher at the student's 32 px with the pipeline's normalisation, and a ViT teacher at 48 px with its own.
TWO = (
    "model.teachers=[{name: test_resnet, num_classes: 4},"
    " {name: test_vit, num_classes: 3, image_size: 48, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}]"
)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def loss_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k.startswith("loss")} for row in read_rows(run_dir)]


def fit(cfg, run_dir: Path, resume_from: Path | None = None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions add up in one order: runs compare bit for bit
    try:
        return Trainer(cfg, CPU, show_progress=False, resume_from=resume_from).fit(run_dir)
    finally:
        torch.set_num_threads(threads)


def two_teachers(tiny_config, *overrides: str):
    return tiny_config("model.teacher=null", TWO, "train.loss.patch_weight=0.5", *overrides)


def model_config(*teachers: dict) -> ModelConfig:
    return ModelConfig(teachers=list(teachers), student={"name": "test_vit"})


def build(cfg: ModelConfig, patch_weight: float = 0.5):
    torch.manual_seed(0)
    return build_distill_models(cfg, 32, patch_weight, False, CPU, None, pipeline=VIEWS)


def test_a_list_of_one_teacher_is_the_single_teacher_bit_for_bit(tiny_config, tmp_path):
    single = tiny_config("train.telemetry=false")
    listed = tiny_config(
        "train.telemetry=false", "model.teacher=null", "model.teachers=[{name: test_resnet, num_classes: 4}]"
    )
    assert listed.model.teacher is None and listed.model.teacher_keys == ["test_resnet"]
    fit(single, tmp_path / "single")
    fit(listed, tmp_path / "listed")
    assert loss_rows(tmp_path / "listed") == loss_rows(tmp_path / "single")
    assert "loss_feature" in loss_rows(tmp_path / "single")[0]  # one teacher: the names carry no key


def test_each_adaptor_learns_from_its_own_teacher_only():
    cfg = model_config(
        {"name": "test_resnet", "num_classes": 4, "key": "cnn"},
        {"name": "test_vit", "num_classes": 3, "key": "vit", "image_size": 48},
    )
    models = build(cfg)
    loss = LossConfig(patch_weight=0.5)
    task = DistillTask(models.student, loss, CPU, None, teachers=teacher_losses(cfg, loss))
    images = torch.randn(4, 3, 48, 48)
    batch = Batch(images=images, labels=torch.tensor([0, 1, 2, 3]), sample_ids=torch.arange(4))
    targets = LiveTeacher(models.teachers, models.teacher_patches).targets(batch)
    losses = task(batch, targets)
    first, second = models.student.adaptor(0), models.student.adaptor(1)
    assert second.patches is not None and second.logits is not None  # the 48 px ViT's tokens and classes
    assert {"loss_cnn", "loss_vit", "loss_feature_cnn", "loss_patch_vit", "loss_logit_vit"} <= set(losses)
    for own, other, key in ((first, second, "cnn"), (second, first, "vit")):
        grads = torch.autograd.grad(
            losses[f"loss_{key}"], [*own.parameters(), *other.parameters()], allow_unused=True
        )
        own_grads, other_grads = grads[: len(list(own.parameters()))], grads[len(list(own.parameters())) :]
        assert all(g is not None and g.abs().sum() > 0 for g in own_grads), key
        assert all(g is None or g.abs().sum() == 0 for g in other_grads), key
    # The total is each teacher's weighted loss summed (no label loss here).
    assert torch.equal(losses["loss"], losses["loss_cnn"] + losses["loss_vit"])


def test_each_teacher_sees_its_own_size_and_normalisation():
    cfg = model_config(
        {"name": "test_resnet", "num_classes": 4, "image_size": 32},
        {"name": "test_vit", "num_classes": 3, "image_size": 48, "mean": HALF, "std": HALF},
    )
    models = build(cfg)
    seen: list[torch.Tensor] = []
    cnn_stem, vit_stem = models.teachers[0].model.conv1, models.teachers[1].model.patch_embed
    for stem in (cnn_stem, vit_stem):  # the first layer each teacher's input meets
        stem.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    # A uniform grey of 0.8 as the pipeline hands it out (normalised with ImageNet's statistics).
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = ((0.8 - mean) / std).expand(2, 3, 48, 48).contiguous()
    batch = Batch(images=images, labels=torch.tensor([0, 1]), sample_ids=torch.arange(2))
    LiveTeacher(models.teachers, models.teacher_patches).targets(batch)
    cnn, vit = seen
    assert cnn.shape[-2:] == (32, 32) and vit.shape[-2:] == (48, 48)
    assert torch.allclose(cnn, ((0.8 - mean) / std).expand_as(cnn), atol=1e-5)
    assert torch.allclose(vit, torch.full_like(vit, (0.8 - 0.5) / 0.5), atol=1e-5)
    assert [spec.size for spec in models.teacher_inputs] == [32, 48]


@pytest.mark.parametrize(
    ("second", "says"),
    [
        ({"name": "test_vitt"}, r"^model\.teachers\[1\] \(test_vitt\): name: unknown timm model 'test_vitt'"),
        (
            {"name": "test_vit", "checkpoint": "/nowhere/vit.safetensors"},
            r"^model\.teachers\[1\] \(test_vit\): checkpoint not found: /nowhere/vit\.safetensors$",
        ),
    ],
)
def test_a_teacher_that_cannot_be_built_is_one_line_naming_it(second, says):
    cfg = model_config({"name": "test_resnet", "num_classes": 4}, {**second, "num_classes": 3})
    with pytest.raises(UserError, match=says) as raised:
        build(cfg)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ((TWO,), "give the teacher as model.teacher, or several as model.teachers"),
        (
            ("model.teacher=null", "model.teachers=[{name: test_resnet, key: a}, {name: test_vit, key: a}]"),
            "key 'a' names more than one teacher",
        ),
        (("model.teacher=null", TWO, "train.use_local_crops=true"), "multi-crop distils one teacher"),
        (
            ("model.teacher=null", "model.teachers=[{name: test_resnet}, {name: test_vitt}]"),
            "model.teachers[1] (test_vitt): name: unknown timm model 'test_vitt' (did you mean",
        ),
    ],
)
def test_config_errors_about_teachers_are_one_line(image_tree, tmp_path, overrides, says):
    """From the command line: exit 2 and one line, no traceback."""
    args = [*tiny_overrides(image_tree, tmp_path), *overrides]
    done = subprocess.run(
        [sys.executable, "-m", "dali_kd.train", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], done.stderr


def test_per_teacher_losses_timing_and_heads_reach_the_run(tiny_config, tmp_path):
    cfg = two_teachers(tiny_config, "train.epochs=1")
    fit(cfg, tmp_path / "run")
    row = read_rows(tmp_path / "run")[-1]
    for key in ("test_resnet", "test_vit"):
        assert f"loss_{key}" in row and f"loss_feature_{key}" in row and f"teacher_ms_{key}" in row
    assert "loss_patch_test_vit" in row and "loss_feature" not in row
    assert row["teacher_ms"] >= row["teacher_ms_test_resnet"] + row["teacher_ms_test_vit"] - 1e-6
    assert row["loss"] == pytest.approx(row["loss_test_resnet"] + row["loss_test_vit"], rel=1e-5)
    saved = ckpt.load(max((tmp_path / "run" / "checkpoints").glob("step_*.pt")))
    # The first teacher's adaptor under the projector's names; the second's as adaptors.1.
    assert {"adaptors.1.pooled.weight", "adaptors.1.patches.weight"} <= set(saved["student"])
    assert not any(name.startswith("adaptors.0.") for name in saved["student"])
    assert "adaptors.1.logits.weight" in saved["student"]
    assert [t["name"] for t in saved["teacher"]] == ["test_resnet", "test_vit"]
    assert "teacher_standardiser" not in saved  # no teacher asks for it


def test_standardisation_is_checkpointed_and_a_resume_is_exact(tiny_config, tmp_path):
    cfg = tiny_config(
        "model.teacher=null",
        TWO.replace("std: [0.5, 0.5, 0.5]}", "std: [0.5, 0.5, 0.5], standardise: true}"),
        "train.loss.patch_weight=0.5",
        "train.save_every_n_steps=2",
        "train.keep_last_checkpoints=10",
        "train.telemetry=false",
    )
    fit(cfg, tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_000000002.pt"
    saved = ckpt.load(checkpoint)["teacher_standardiser"]
    assert set(saved) == {
        f"test_vit.{part}.{stat}" for part in ("pooled", "tokens") for stat in ("mean", "var")
    }
    assert all(torch.isfinite(v).all() and v.ndim == 1 for v in saved.values())
    fit(cfg, tmp_path / "resumed", resume_from=checkpoint)
    whole, resumed = loss_rows(tmp_path / "whole"), loss_rows(tmp_path / "resumed")
    assert len(resumed) == len(whole) - 2 and resumed == whole[2:]


def test_resume_with_another_teacher_set_is_refused_naming_the_teacher(tiny_config, tmp_path):
    cfg = two_teachers(tiny_config, "train.epochs=1", "train.telemetry=false")
    fit(cfg, tmp_path / "run")
    checkpoint = max((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    state = ckpt.load(checkpoint)
    assert ckpt.check_compatible(state, cfg, state["teacher"], 1, checkpoint) == []
    other = [dict(t) for t in state["teacher"]]
    other[1]["weights_hash"] = "0" * 16  # the second teacher's weights changed
    with pytest.raises(
        UserError, match=r"model\.teachers\[1\] \(test_vit\) differs from the checkpoint's teacher"
    ):
        ckpt.check_compatible(state, cfg, other, 1, checkpoint)
    with pytest.raises(
        UserError, match=r"trained with 2 teacher\(s\) \(test_resnet, test_vit\), this run has 1"
    ):
        ckpt.check_compatible(state, tiny_config(), state["teacher"][0], 1, checkpoint)


def test_two_teachers_forward_with_losses_compile_whole_and_once():
    """fullgraph=True refuses any graph break; three steps with the same shapes make one graph: the per-teacher
    targets go in as tuples, the standardiser runs before the compiled step."""
    from tests.test_lean_step import GraphCounter

    cfg = model_config(
        {"name": "test_resnet", "num_classes": 4},
        {"name": "test_vit", "num_classes": 3, "image_size": 48, "standardise": True},
    )
    models = build(cfg)
    loss = LossConfig(patch_weight=0.5, label_weight=0.5)
    standardiser = TeacherStandardiser(cfg.teacher_keys, [False, True], CPU)
    task = DistillTask(
        models.student,
        loss,
        CPU,
        torch.bfloat16,
        teachers=teacher_losses(cfg, loss),
        standardiser=standardiser,
    )
    graphs = GraphCounter()
    task.student_step = torch.compile(task.forward_with_loss, backend=graphs, fullgraph=True)
    live = LiveTeacher(models.teachers, models.teacher_patches)
    optimizer = torch.optim.AdamW(models.student.parameters())
    for _ in range(3):
        batch = Batch(
            images=torch.randn(4, 3, 48, 48), labels=torch.tensor([0, 1, 2, 3]), sample_ids=torch.arange(4)
        )
        losses = task(batch, live.targets(batch))
        assert {"loss_test_resnet", "loss_test_vit", "loss_label", "loss_patch_test_vit"} <= set(losses)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert graphs.graphs == 1


def test_two_teachers_from_the_command_line(image_tree, tmp_path):
    """python -m dali_kd.train with model.teachers: exit 0, each teacher's loss in the metrics, its results in
    the summary and its name in the run's last lines."""
    args = [
        *tiny_overrides(image_tree, tmp_path),
        f"data.val_root={image_tree / 'val'}",
        "model.teacher=null",
        TWO,
    ]
    args += ["train.epochs=1", "train.max_steps_per_epoch=2", "train.run_name=cli", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "dali_kd.train", *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "cli"
    assert {"loss_test_resnet", "loss_test_vit"} <= read_rows(run_dir)[-1].keys()
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("test_resnet", "test_vit"):
        assert -1 <= summary[f"agreement_{key}"] <= 1
        assert 0 <= summary[f"teacher_knn_top1_{key}"] <= 100
    assert "test_vit" in done.stdout + done.stderr


def test_two_teachers_through_the_python_api(tiny_config, tmp_path):
    import dali_kd

    result = dali_kd.distill(two_teachers(tiny_config, "train.epochs=1"), progress="quiet")
    assert result.summary["steps"] == 3
    assert {"agreement_test_resnet", "agreement_test_vit"} <= result.summary.keys()
    assert {"loss_test_resnet", "loss_test_vit"} <= read_rows(result.run_dir)[-1].keys()
    assert result.student_weights.is_file()
