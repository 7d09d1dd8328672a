"""Evaluation with several teachers: the student's agreement with each teacher (mean cosine of its adaptor's pooled
output with the teacher's embedding on the held-out split) and each teacher's own k-NN, in summary.json, the
console and report.png; and the export of the student with its adaptor heads (--heads)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dali_kd.commands import export as export_command
from dali_kd.commands.report_figure import figure
from dali_kd.config import load_config
from dali_kd.console import eval_line
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.outputs import ModelOutput
from dali_kd.evaluation.agreement import Agreement
from dali_kd.evaluation.evaluator import Evaluator, evaluate_student
from dali_kd.models import AdaptorShape, FrozenTeacher, Student, create_model
from dali_kd.models.timm_models import embed_dim
from dali_kd.training.trainer import Trainer
from tests.conftest import tiny_overrides

CPU = torch.device("cpu")
TEACHERS = (
    "model.teachers=[{name: test_resnet, checkpoint: null, num_classes: 4, key: res},"
    " {name: test_vit2, checkpoint: null, num_classes: 3, key: vit, image_size: 48, standardise: true}]"
)


def two_teacher_config(image_tree: Path, tmp_path: Path, *extra: str):
    """tiny_config's run with two teachers: test_resnet (4 classes, the student's own head learns its logits)
    and test_vit2 at 48 px (3 classes, a logits head; its tokens on a 3×3 grid, the student's on 2×2; its targets
    standardised)."""
    return load_config(
        overrides=[
            *tiny_overrides(image_tree, tmp_path),
            "model.teacher=null",
            TEACHERS,
            f"data.val_root={image_tree / 'val'}",
            "train.loss.patch_weight=1.0",
            "train.epochs=2",
            "train.max_steps_per_epoch=2",
            "train.run_name=two",
            *extra,
        ]
    )


@pytest.fixture
def evaluator(tiny_config, image_tree):
    cfg = tiny_config()
    train, val = ImageIndex.from_folder(image_tree / "train"), ImageIndex.from_folder(image_tree / "val")
    return Evaluator(cfg, train, val, CPU)


def by_colour(images: torch.Tensor) -> ModelOutput:
    return ModelOutput(pooled=images.mean(dim=(2, 3)), logits=None, patch_tokens=None)


# ---- agreement in the evaluator ----------------------------------------------------------------------------------
def test_agreement_is_the_mean_cosine_over_the_held_out_images_named_per_teacher(evaluator):
    """The same embedding agrees at 1, its negation at -1, and one negated on the first 4 of the 16 held-out
    images (all in the first batch of 8) at (12 - 4) / 16 = 0.5: the mean over every image of every batch."""
    seen = []

    def scores(images: torch.Tensor) -> torch.Tensor:
        emb = by_colour(images).pooled
        assert emb is not None
        sign = torch.tensor([1.0 if len(seen) + i >= 4 else -1.0 for i in range(len(images))])
        seen.extend(range(len(images)))
        cos = torch.nn.functional.cosine_similarity
        return torch.stack([cos(emb, emb), cos(emb, -emb), cos(emb, sign[:, None] * emb)], dim=1)

    agreement = Agreement(["agreement_a", "agreement_b", "agreement_c"], scores)
    result = evaluator.evaluate(by_colour, agreement)
    assert result is not None and len(seen) == 16
    said = result.as_dict("student")
    assert said["agreement_a"] == pytest.approx(1.0) and said["agreement_b"] == pytest.approx(-1.0)
    assert said["agreement_c"] == pytest.approx(0.5)
    assert said["student_knn_top1"] == result.knn_top1


def test_a_teacher_without_an_adapted_pooled_output_has_no_agreement(evaluator):
    def scores(images: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.ones(len(images)), torch.full((len(images),), float("nan"))], dim=1)

    result = evaluator.evaluate(by_colour, Agreement(["agreement_a", "agreement_b"], scores))
    assert result is not None and result.agreement == {"agreement_a": 1.0, "agreement_b": None}


def test_the_students_own_features_through_an_identity_adaptor_agree_at_1(evaluator):
    """A student whose backbone is teacher `same`'s model and whose first adaptor is the identity (same width,
    no hidden layer) agrees with it at 1; with another teacher, through its linear adaptor, less."""
    torch.manual_seed(0)
    teacher = create_model("test_resnet", 32, 4).eval()
    other = create_model("test_convnext", 32, 4).eval()
    student = Student(
        copy.deepcopy(teacher), embed_dim(teacher), 0, with_patches=False, extra_teachers=[AdaptorShape(64)]
    )
    assert isinstance(student.adaptors[0].pooled, torch.nn.Identity)
    teachers = {"same": FrozenTeacher(teacher, None), "other": FrozenTeacher(other, None)}
    result = evaluate_student(evaluator, student, None, teachers=teachers)
    assert result is not None
    assert result.agreement["agreement_same"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= result.agreement["agreement_other"] < 0.99


def test_a_standardised_teachers_head_agrees_in_the_teachers_own_scale(evaluator):
    """A head that outputs exactly the teacher's standardised embedding (what training asks of it) agrees at 1 once
    scaled back with the running statistics, and not without them."""
    from dali_kd.training.standardise import TeacherStandardiser

    torch.manual_seed(0)
    teacher = create_model("test_resnet", 32, 4).eval()
    student = Student(copy.deepcopy(teacher), embed_dim(teacher), 0, with_patches=False)
    mean, var = torch.rand(96) + 0.5, torch.rand(96) + 0.5
    head = torch.nn.Linear(96, 96)  # x → (x - mean) / sqrt(var + eps)
    with torch.no_grad():
        head.weight.copy_(torch.diag(torch.rsqrt(var + 1e-6)))
        head.bias.copy_(-mean * torch.rsqrt(var + 1e-6))
    student.adaptors[0].pooled = head
    standardiser = TeacherStandardiser(["same"], [True], CPU)
    standardiser.load_state_dict({"same.pooled.mean": mean, "same.pooled.var": var})
    teachers = {"same": FrozenTeacher(teacher, None)}
    scaled = evaluate_student(
        evaluator, student, None, teachers=teachers, unstandardise=standardiser.unstandardise
    )
    assert scaled is not None and scaled.agreement["agreement"] == pytest.approx(1.0, abs=1e-5)
    unscaled = evaluate_student(evaluator, student, None, teachers=teachers)
    assert unscaled is not None and unscaled.agreement["agreement"] < 0.99


# ---- how results are said ------------------------------------------------------------------------------------------
def test_the_console_says_each_teachers_results_and_the_agreement_as_a_cosine():
    line = eval_line(
        None, {"teacher_knn_top1_res": 62.5, "teacher_head_top1_res": None, "agreement_vit": 0.8125}
    )
    assert line == "teacher k-NN top-1 (res) 62.5%, agreement with vit 0.812"
    assert eval_line(3, {"student_knn_top1": 50.0, "agreement": 0.5}) == (
        "epoch 3: student k-NN top-1 50.0%, agreement with the teacher 0.500"
    )


def summary_with_agreement(keys: list[str]) -> dict:
    names = ["agreement"] if keys == [""] else [f"agreement_{k}" for k in keys]
    history = [
        {
            "epoch": e,
            "step": 2 * e,
            "student_knn_top1": 40.0 + e,
            **{n: 0.1 * e + 0.1 * i for i, n in enumerate(names)},
        }
        for e in (1, 2)
    ]
    teacher = (
        {"teacher_knn_top1": 70.0}
        if keys == [""]
        else {f"teacher_knn_top1_{k}": 60.0 + i for i, k in enumerate(keys)}
    )
    return {"knn_history": history, "chance_top1": 25.0, **teacher}


def test_the_report_draws_one_agreement_panel_per_teacher_with_its_own_knn():
    rows = [{"step": s, "loss": 1.0 / s, "img_per_s": 10.0, "step_ms": 5.0, "lr": 1e-3} for s in (1, 2, 3, 4)]
    fig = figure("run", rows, summary_with_agreement(["res", "vit", "cnn"]))
    panels = [ax for ax in fig.axes if ax.get_title().startswith("Agreement")]
    assert [ax.get_title().split(" (")[0] for ax in panels] == [
        "Agreement with res", "Agreement with vit", "Agreement with cnn"
    ]  # fmt: skip
    assert "its k-NN top-1 61.0%" in panels[1].get_title()
    assert list(panels[2].get_lines()[0].get_ydata()) == pytest.approx([0.3, 0.4])
    accuracy = next(ax for ax in fig.axes if ax.get_title().startswith("Accuracy"))
    labels = {line.get_label() for line in accuracy.get_lines()}
    assert {"teacher k-NN (res)", "teacher k-NN (vit)", "teacher k-NN (cnn)"} <= labels
    one = figure("run", rows, summary_with_agreement([""]))
    assert [ax.get_title().split(" (")[0] for ax in one.axes if ax.get_title().startswith("Agreement")] == [
        "Agreement with the teacher"
    ]
    assert not [ax for ax in figure("run", rows, None).axes if ax.get_title().startswith("Agreement")]


# ---- a two-teacher run --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_teacher_run(image_tree, tmp_path_factory):
    """One finished two-teacher tiny run (2 epochs × 2 steps, a checkpoint every step) and its trainer."""
    out = tmp_path_factory.mktemp("two_teachers")
    trainer = Trainer(
        two_teacher_config(image_tree, out, "train.save_every_n_steps=1"), CPU, show_progress=False
    )
    trainer.fit(out / "run")
    return out / "run", trainer


def test_a_two_teacher_run_reports_each_teachers_knn_and_the_agreement_with_each(two_teacher_run, capsys):
    from dali_kd.commands import report

    run_dir, _ = two_teacher_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("res", "vit"):
        assert 0 <= summary[f"teacher_knn_top1_{key}"] <= 100
        assert -1 <= summary[f"agreement_{key}"] <= 1
        assert all(-1 <= entry[f"agreement_{key}"] <= 1 for entry in summary["knn_history"])
    assert 0 <= summary["teacher_head_top1_res"] <= 100
    assert summary["teacher_head_top1_vit"] is None  # 3 classes, the data has 4
    assert summary["teacher_knn_top1"] is None and "agreement" not in summary  # the names are per teacher
    assert report.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out
    knn, agree = summary["teacher_knn_top1_res"], summary["agreement_vit"]
    assert (
        f"k-NN top-1: student {summary['student_knn_top1']:.1f}%, teacher res {knn:.1f}%, teacher vit"
        in printed
    )
    assert (
        f"agreement with the teacher (mean cosine): res {summary['agreement_res']:.3f}, vit {agree:.3f}"
        in printed
    )
    fig = figure("run", report.read_rows(run_dir), summary)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("Agreement")]
    assert [t.split(" (")[0] for t in titles] == ["Agreement with res", "Agreement with vit"]


def export_heads(run_dir: Path, out: Path, fmt: str, *extra: str) -> dict:
    assert export_command.main([str(run_dir), "--format", fmt, "--heads", "--out", str(out), *extra]) == 0
    return json.loads((out / "preprocess.json").read_text())


def exported_outputs(fmt: str, out: Path, images: torch.Tensor) -> list[torch.Tensor]:
    """What a user gets from the exported files for these images, output by output."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]
    from dali_kd.export import load_with_heads

    model = torch.jit.load(str(out / "student.pt")) if fmt == "torchscript" else load_with_heads(out)
    with torch.no_grad():
        return list(model(images))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors"])
def test_an_export_with_heads_gives_each_head_as_preprocess_json_says_and_as_the_student_computes(
    two_teacher_run, tmp_path, fmt
):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    run_dir, trainer = two_teacher_run
    spec = export_heads(run_dir, tmp_path, fmt)
    assert spec["outputs"] == ["logits", "res.pooled", "vit.pooled", "vit.logits", "vit.tokens"]
    images = export_command.check_batch(spec, 5)
    got = exported_outputs(fmt, tmp_path, images)
    assert len(got) == len(spec["outputs"])
    res, vit = spec["heads"]
    assert (res["key"], res["teacher"], vit["key"], vit["teacher"]) == (
        "res",
        "test_resnet",
        "vit",
        "test_vit2",
    )
    # Each output has the width preprocess.json gives it: res's 96-wide embedding, vit's 64 and its 3 classes,
    # its tokens on its own 3×3 grid (the student's is 2×2); res's logits are the student's own head's.
    assert res["pooled"] == {"output": 1, "shape": [None, 96]} and res["logits"]["output"] == 0
    assert vit["logits"] == {"output": 3, "shape": [None, 3]} and vit["tokens"]["shape"] == [None, 9, 64]
    for head in (res, vit):
        for kind in ("pooled", "logits", "tokens"):
            if kind in head:
                assert list(got[head[kind]["output"]].shape) == [5, *head[kind]["shape"][1:]]
    # The values are the trained student's: its adaptor outputs for the same (already preprocessed) images.
    student = copy.deepcopy(trainer.parts.student).eval()
    student.input = None
    with (
        torch.no_grad()
    ):  # vit's head learnt standardised targets: the export scales it back to vit's features
        want = trainer.parts.standardiser.unstandardise(student.teacher_outputs(images))
    assert vit["unstandardised"] is True and "unstandardised" not in res
    pairs = [(1, want[0].pooled), (0, want[0].logits), (2, want[1].pooled), (3, want[1].logits),
             (4, want[1].patch_tokens)]  # fmt: skip
    for index, tensor in pairs:
        assert tensor is not None and torch.allclose(got[index], tensor, atol=1e-4), spec["outputs"][index]


def test_without_heads_a_two_teacher_export_is_the_bare_student_as_before(two_teacher_run, tmp_path):
    run_dir, _ = two_teacher_run
    assert export_command.main([str(run_dir), "--format", "torchscript", "--out", str(tmp_path)]) == 0
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert "heads" not in spec and "outputs" not in spec
    images = export_command.check_batch(spec, 5)
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "student.pt"))(images)
    assert isinstance(got, torch.Tensor) and got.shape == (5, 4)


def test_heads_with_ema_and_a_folder_of_another_kind_of_export_are_one_line_errors(
    two_teacher_run, tmp_path, capsys
):
    run_dir, _ = two_teacher_run
    assert export_command.main([str(run_dir), "--format", "torchscript", "--heads", "--ema"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --heads with --ema: the EMA averages the backbone only, and the heads were trained on the raw "
        "weights; export --heads without --ema"
    ]
    assert export_command.main([str(run_dir), "--format", "torchscript", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert export_command.main([str(run_dir), "--format", "onnx", "--heads", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {tmp_path}: holds an export without --heads; choose another --out or empty it"
    ]


def test_a_run_in_progress_exports_the_heads_of_its_newest_checkpoint(two_teacher_run, tmp_path):
    run_dir, _ = two_teacher_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.safetensors", "summary.json"))
    spec = export_heads(run, tmp_path / "out", "safetensors")
    assert spec["source"].endswith("(step 4)")
    final = load_file(run_dir / "adaptors.safetensors")
    heads = load_file(tmp_path / "out" / "heads.safetensors")
    assert final.keys() <= heads.keys() and all(torch.equal(heads[k], final[k]) for k in final)


def test_heads_of_a_standardised_teacher_without_its_statistics_are_refused_in_one_line(
    two_teacher_run, tmp_path, capsys
):
    run_dir, _ = two_teacher_run
    run = tmp_path / "run"
    shutil.copytree(
        run_dir, run, ignore=shutil.ignore_patterns("teacher_standardiser.safetensors", "export*")
    )
    assert export_command.main([str(run), "--format", "torchscript", "--heads"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --heads: model.teachers[1] (test_vit2) had its targets standardised, but no running statistics "
        f"come with {run / 'student.safetensors'} (teacher_standardiser.safetensors beside it, or a checkpoint's) "
        "to scale its head's outputs back"
    ]
