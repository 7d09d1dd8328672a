"""python -m dali_kd.export: each format loads back and computes what the torch student computes, preprocess.json
says how the run evaluated, and bad input is a one-line error with exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dali_kd.commands.export import check_batch, main
from dali_kd.commands.export_source import StudentWeights, build_student, read_run_config
from dali_kd.config import load_config
from dali_kd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(image_tree, tmp_path_factory) -> Path:
    """One finished tiny run (test_vit student, 4 classes, eval 36 → 32 px, a non-default mean/std) shared by
    the tests: 1 epoch × 1 step, a checkpoint at that step."""
    out = tmp_path_factory.mktemp("export_runs")
    cfg = load_config(
        overrides=[
            f"data.root={image_tree / 'train'}",
            f"data.val_root={image_tree / 'val'}",
            "data.image_size=32",
            "data.eval_resize=36",
            "data.dali_threads=1",
            "data.augment.mean=[0.5,0.4,0.3]",
            "data.augment.std=[0.2,0.25,0.3]",
            "model.teacher.name=test_resnet",
            "model.teacher.checkpoint=null",
            "model.teacher.num_classes=4",
            "model.student.name=test_vit",
            "train.batch_size=8",
            "train.epochs=1",
            "train.max_steps_per_epoch=1",
            "train.save_every_n_steps=1",
            "train.compile_student=false",
            "train.num_workers=0",
            f"train.output_dir={out}",
            "train.run_name=tiny",
            "train.device=cpu",
        ]
    )
    run = out / "tiny"
    Trainer(cfg, torch.device("cpu"), show_progress=False).fit(run)
    return run


def torch_student(run: Path, weights_file: str = "student.safetensors") -> torch.nn.Module:
    cfg = read_run_config(run)
    model, _ = build_student(cfg, StudentWeights(load_file(run / weights_file), "raw", weights_file))
    return model


def batch_for(out: Path) -> torch.Tensor:
    return check_batch(json.loads((out / "preprocess.json").read_text()), 5)


def test_onnx_runs_in_onnxruntime_like_torch(run_dir, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    assert main([str(run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    diff = float(printed.split("max abs diff (onnxruntime vs torch, batch of 4): ")[1].split()[0])
    assert diff < 1e-4
    # A batch size other than the exported one: the batch axis is dynamic.
    images = batch_for(tmp_path)
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = torch_student(run_dir)(images)
    assert got.shape == (5, 4)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)


def test_torchscript_loads_and_matches_torch(run_dir, tmp_path):
    assert main([str(run_dir), "--format", "torchscript", "--out", str(tmp_path)]) == 0
    images = batch_for(tmp_path)
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "student.pt"))(images)
        want = torch_student(run_dir)(images)
    assert got.shape == (5, 4) and torch.allclose(got, want, atol=1e-5)


def test_safetensors_loads_with_the_printed_timm_call(run_dir, tmp_path, capsys):
    import timm

    assert main([str(run_dir), "--format", "safetensors", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('test_vit', num_classes=4, img_size=32)" in printed
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    model = timm.create_model(spec["model"], **spec["timm_kwargs"]).eval()
    model.load_state_dict(load_file(tmp_path / "student.safetensors"))
    images = batch_for(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(images), torch_student(run_dir)(images))


def test_preprocess_json_says_how_the_run_evaluated(run_dir, tmp_path):
    assert main([str(run_dir), "--format", "safetensors", "--out", str(tmp_path)]) == 0
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert spec["resize_shorter_side"] == 36 and spec["center_crop"] == spec["image_size"] == 32
    assert spec["interpolation"] == "bilinear" and spec["antialias"] is True
    assert spec["mean"] == [0.5, 0.4, 0.3] and spec["std"] == [0.2, 0.25, 0.3]
    assert (spec["layout"], spec["dtype"], spec["channel_order"]) == ("NCHW", "float32", "RGB")
    assert spec["model"] == "test_vit" and spec["num_classes"] == 4 and spec["weights"] == "raw"
    assert spec["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    # Recorded at train time, so they survive the training folder moving.
    assert json.loads((run_dir / "summary.json").read_text())["class_names"] == spec["class_names"]


def test_preprocess_json_gives_the_students_own_normalisation(run_dir, tmp_path):
    """A student with its own statistics (model.student.mean/std) was fed those: the export says so."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["student"].update(mean=[0.1, 0.2, 0.3], std=[0.6, 0.7, 0.8])
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([str(run), "--format", "safetensors"]) == 0
    spec = json.loads((run / "export" / "preprocess.json").read_text())
    assert spec["mean"] == [0.1, 0.2, 0.3] and spec["std"] == [0.6, 0.7, 0.8]


def test_ema_weights_are_exported_when_the_run_has_them(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export*"))
    ema = {k: v + 0.01 for k, v in load_file(run / "student.safetensors").items()}
    save_file(ema, run / "student_ema.safetensors")
    assert main([str(run), "--format", "safetensors", "--ema"]) == 0
    assert (run / "export_ema" / "student.safetensors").is_file()
    spec = json.loads((run / "export_ema" / "preprocess.json").read_text())
    assert spec["weights"] == "ema"
    exported = load_file(run / "export_ema" / "student.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_a_run_in_progress_exports_its_newest_checkpoint(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export*", "student.safetensors"))
    assert main([str(run), "--format", "safetensors", "--out", str(tmp_path / "out")]) == 0
    assert "step_000000001.pt (step 1)" in capsys.readouterr().out
    # The checkpoint of the last step holds the same student as the final file.
    exported = load_file(tmp_path / "out" / "student.safetensors")
    final = load_file(run_dir / "student.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dali_kd.export", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_missing_run_dir_and_missing_ema_are_one_line_errors(run_dir, tmp_path):
    missing = run_cli(str(tmp_path / "nowhere"), "--format", "onnx")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"error: run directory not found: {tmp_path / 'nowhere'}"]
    no_ema = run_cli(str(run_dir), "--format", "torchscript", "--ema")
    assert no_ema.returncode == 2
    assert no_ema.stderr.splitlines() == [
        f"error: {run_dir}: the run has no EMA weights (no student_ema.safetensors); export without --ema"
    ]
    assert not (run_dir / "export_ema").exists()


def test_onnx_without_its_packages_names_the_pip_command(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert main([str(run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --format onnx needs onnxruntime: pip install onnx onnxruntime onnxscript "
                   "(or: pip install 'dali_kd[export]')"]  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_class_names_come_from_the_training_folder_when_the_summary_lacks_them(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export*"))
    summary = json.loads((run / "summary.json").read_text())
    del summary["class_names"]  # a run from before they were recorded
    (run / "summary.json").write_text(json.dumps(summary))
    assert main([str(run), "--format", "safetensors"]) == 0
    spec = json.loads((run / "export" / "preprocess.json").read_text())
    assert spec["class_names"] == ["class_0", "class_1", "class_2", "class_3"]


def test_a_mismatch_beyond_the_tolerance_exits_1(run_dir, tmp_path, monkeypatch, capsys):
    import dali_kd.commands.export as export

    monkeypatch.setitem(export.WRITERS, "safetensors", lambda model, path, batch: 0.5)
    assert main([str(run_dir), "--format", "safetensors", "--out", str(tmp_path), "--tolerance", "0.1"]) == 1
    captured = capsys.readouterr()
    assert "max abs diff (safetensors vs torch, batch of 4): 0.5" in captured.out
    assert captured.err.splitlines() == ["error: max abs diff 0.5 is above --tolerance 0.1"]


def test_a_damaged_config_yaml_is_one_line_naming_file_and_key(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export*"))
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("  batch_size:", "  batch_sise:", 1))
    assert main([str(run), "--format", "safetensors"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {run / 'config.yaml'}: train.batch_sise: unknown key (did you mean 'batch_size'?)"
    ]


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        (
            "--tolerance",
            "nan",
            "must be a finite number of at least 0, got nan",
        ),  # every diff would be "above" it
        ("--tolerance", "inf", "must be a finite number of at least 0, got inf"),
        ("--tolerance", "-0.1", "must be a finite number of at least 0, got -0.1"),
        ("--check-batch", "0", "must be from 1 to 1024, got 0"),  # was silently 3
        ("--check-batch", "100000000", "must be from 1 to 1024, got 100000000"),
    ],
)
def test_a_number_flag_that_means_nothing_is_a_usage_error_before_any_work(
    run_dir, tmp_path, capsys, flag, value, says
):
    with pytest.raises(SystemExit) as ended:
        main([str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "out"), flag, value])
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: argument {flag}: {says} (see --help)"]
    assert not (tmp_path / "out").exists(), "nothing was exported"


def test_heads_of_a_single_teacher_run_are_its_projector_and_the_students_own_logits(run_dir, tmp_path):
    """One teacher: output 0 is the student's logits (which learnt the teacher's), output 1 the projector's
    embedding at the teacher's width; the export without --heads in the same run is untouched."""
    assert main([str(run_dir), "--format", "torchscript", "--heads", "--out", str(tmp_path)]) == 0
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert spec["outputs"] == ["logits", "test_resnet.pooled"]
    (head,) = spec["heads"]
    assert head["logits"] == {"output": 0, "shape": [None, 4]}
    assert head["pooled"] == {"output": 1, "shape": [None, 96]}
    images = batch_for(tmp_path)
    with torch.no_grad():
        logits, pooled = torch.jit.load(str(tmp_path / "student.pt"))(images)
        want = torch_student(run_dir)(images)
    assert torch.allclose(logits, want, atol=1e-5) and pooled.shape == (5, 96)
