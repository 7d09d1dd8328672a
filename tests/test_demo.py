"""The embedded demo end to end, as a user runs it: `python -m dali_kd.train` with no config flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dali_kd.commands.demo import (
    DEMO_TEACHERS,
    TeacherRecipe,
    demo_parts,
    demo_teacher_path,
    demo_teachers,
    prepare_demo,
    train_demo_teacher,
)
from dali_kd.config import CONFIG_DIR, SECTION_FILES, load_config
from dali_kd.models import build_model
from tests.conftest import write_tree


def run_demo(home, work, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The demo exactly as shipped, except that its first-use cache (~/.cache/dali_kd) goes to a temporary
    home: the demo's own paths are what make the command line prepare the demo data and teacher."""
    return subprocess.run(
        [sys.executable, "-m", "dali_kd.train", "--no-progress", *overrides],
        capture_output=True, text=True, cwd=work, timeout=timeout, env={**os.environ, "HOME": str(home)},
    )  # fmt: skip


def test_only_the_demos_own_paths_are_prepared_as_the_demo():
    assert demo_parts(load_config()) == (True, True)
    demo = load_config()
    expanded = [f"data.root={Path(demo.data.root).expanduser()}", "data.val_root=null"]
    assert demo_parts(load_config(overrides=expanded)) == (True, True), "the same folder, however written"
    # Not the demo's data, nor its teacher: a teacher the demo's recipe trains on /my/images (dali_kd.config.own_data).
    assert demo_parts(load_config(overrides=["data.root=/my/images"])) == (False, True)
    own_teacher = ["data.root=/my/images", "model.teacher.checkpoint=/my/t.safetensors"]
    assert demo_parts(load_config(overrides=own_teacher)) == (False, False)
    assert demo_parts(load_config(overrides=["data.val_root=/my/val"])) == (False, False)
    assert demo_parts(load_config(overrides=["model.teacher.checkpoint=/my/t.safetensors"])) == (True, False)
    assert demo_parts(load_config(overrides=["model.teacher.name=resnet50"])) == (True, False)
    real = load_config(*(CONFIG_DIR / name for name in SECTION_FILES.values()))
    assert demo_parts(real) == (False, False)


def test_the_demo_teachers_are_those_of_their_architecture_kept_at_the_demos_own_paths():
    demo_cfg = load_config()
    assert demo_teacher_path(demo_cfg.model.teacher.name) == demo_cfg.model.teacher.checkpoint
    assert demo_teachers(demo_cfg) == [0]
    both = load_config(presets=["two_teachers"])
    assert [t.name for t in both.model.teacher_specs] == list(DEMO_TEACHERS)
    assert demo_teachers(both) == [0, 1] and demo_parts(both) == (True, True)
    second = both.model.teacher_specs[1].name
    # The second architecture at the first one's path, or at a path of one's own, is not the demo's.
    elsewhere = both.model.teacher_specs[1].model_copy(update={"checkpoint": "/my/second.safetensors"})
    mine = both.model_copy(
        update={"model": both.model.model_copy(update={"teachers": [both.model.teachers[0], elsewhere]})}
    )
    assert demo_teachers(mine) == [0]
    renamed = load_config(overrides=[f"model.teacher.name={second}"])
    assert demo_teachers(renamed) == [] and demo_parts(renamed) == (True, False)


@pytest.fixture
def demo_home(tmp_path, monkeypatch):
    """A home whose demo folder holds a tiny image tree in place of the demo data, and demo teachers that train
    for two steps: prepare_demo's choices, in seconds."""
    monkeypatch.setenv("HOME", str(tmp_path))
    data = Path(load_config().data.root).expanduser().parent
    write_tree(data / "train", num_classes=4, per_class=8)
    write_tree(data / "val", num_classes=4, per_class=2, seed=1)
    for name in DEMO_TEACHERS:
        monkeypatch.setitem(DEMO_TEACHERS, name, TeacherRecipe(steps=2))
    return tmp_path


TINY = ["data.dali_threads=1", "train.batch_size=8", "train.num_workers=0", "train.device=cpu"]


def test_each_missing_demo_teacher_is_trained_at_its_own_path_once(demo_home, capsys):
    cfg = load_config(presets=["two_teachers"], overrides=TINY)
    paths = [Path(t.checkpoint).expanduser() for t in cfg.model.teacher_specs]
    paths[0].write_bytes(b"the first teacher, already trained")
    prepare_demo(cfg, torch.device("cpu"), show_progress=False, prepare_data=False)
    assert paths[0].read_bytes() == b"the first teacher, already trained", "a teacher that is there is kept"
    second = cfg.model.teacher_specs[1]
    weights = load_file(paths[1])
    model = build_model(second.model_copy(update={"checkpoint": str(paths[1])}), "teacher", 32, 4)
    assert weights.keys() == model.state_dict().keys(), f"the {second.name} teacher at its own path"
    assert capsys.readouterr().out.count("demo: training the") == 1
    mtime = paths[1].stat().st_mtime_ns
    prepare_demo(cfg, torch.device("cpu"), show_progress=False, prepare_data=False)
    assert paths[1].stat().st_mtime_ns == mtime and "demo: training" not in capsys.readouterr().out


def test_a_teacher_of_ones_own_beside_a_demo_teacher_is_only_read(demo_home, capsys):
    """Only the demo teacher is made: a missing checkpoint of the user's own stays missing (the run then says so)."""
    mine = demo_home / "mine.safetensors"
    second = load_config(presets=["two_teachers"]).model.teacher_specs[1]
    teachers = f"model.teachers=[{{name: resnet14t, checkpoint: {mine}}}, {{name: {second.name}, checkpoint: {second.checkpoint}}}]"
    cfg = load_config(presets=["two_teachers"], overrides=[*TINY, teachers])
    assert demo_teachers(cfg) == [1]
    prepare_demo(cfg, torch.device("cpu"), show_progress=False, prepare_data=False)
    assert not mine.exists() and Path(cfg.model.teacher_specs[1].checkpoint).expanduser().is_file()


def test_a_demo_teacher_trains_for_its_own_recipes_steps(tiny_config, tmp_path, monkeypatch, capsys):
    """Each architecture learns the demo data at its own step count and learning rate (RESULTS.md)."""
    monkeypatch.setitem(DEMO_TEACHERS, "test_resnet", TeacherRecipe(steps=3, lr=1e-3))
    train_demo_teacher(tiny_config(), tmp_path / "t.safetensors", torch.device("cpu"))
    assert "demo: teacher step 3/3, loss" in capsys.readouterr().out


def test_a_data_root_of_ones_own_is_never_made_into_the_demo(tmp_path):
    """`python -m dali_kd.train data.root=/my/images` used to generate the demo dataset into /my."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    missing = tmp_path / "images" / "train"
    result = run_demo(home, work, "--device", "cpu", f"data.root={missing}", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: data folder not found: {missing}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "work"]
    assert list(home.iterdir()) == [] and list(work.iterdir()) == [], "no demo data, no teacher, no run"


@pytest.mark.slow
def test_demo_distils_a_student_near_its_teacher(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo-home")
    work = tmp_path_factory.mktemp("demo-work")
    result = run_demo(home, work)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((work / "runs").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    # The run directory is printed at the start and at the end.
    assert result.stdout.count(f"run directory: runs/{run_dir.name}") == 2, result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    # compile_student: auto compiles on CUDA only: on a CPU the first compile outweighs a 2-minute run.
    assert summary["device"] == "cpu" and summary["backend"] == "dali" and not summary["compiled_student"]
    # A log file has no bar: the teacher's loss is a line at each quarter of its training.
    assert "demo: teacher step 30/120, loss " in result.stdout and "teacher step 120/120" in result.stdout
    assert summary["steps"] == summary["epochs"] * summary["steps_per_epoch"] > 0
    chance = summary["chance_top1"]
    assert summary["teacher_knn_top1"] > 80, "the demo teacher must really know the task"
    assert summary["student_knn_top1"] > 5 * chance, "the student must end far above chance"
    assert summary["student_knn_top1"] >= summary["teacher_knn_top1"] - 10, (
        "and within 10 points of its teacher"
    )
    for name in ("config.yaml", "metrics.jsonl", "student.safetensors"):
        assert (run_dir / name).is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    # Second use: the dataset and the teacher come from the cache, no preparation again. It also trains the demo
    # with DINO multi-crop (2 global + 8 local crops per image), as `python -m dali_kd.train train.use_local_crops=true`.
    again = run_demo(
        home,
        work,
        "train.use_local_crops=true",
        "train.epochs=1",
        "train.compile_student=false",
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "first use" not in again.stdout
    assert "batch 64, crops 2×32 px + 8×16 px" in again.stdout
    (multi_crop_dir,) = set((work / "runs").iterdir()) - {run_dir}
    rows = [json.loads(line) for line in (multi_crop_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_global", "loss_local"} <= set(rows[0]) and rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((multi_crop_dir / "summary.json").read_text())
    assert summary["steps"] == summary["steps_per_epoch"] and summary["student_knn_top1"] > 3 * chance


def test_the_demo_teacher_trains_on_one_view_batches_even_with_multi_crop_on(tiny_config, tmp_path):
    """`python -m dali_kd.train train.use_local_crops=true` on first use fed [B, V, C, H, W] to a conv."""
    cfg = tiny_config("train.use_local_crops=true", "data.local_crop_size=16")
    path = tmp_path / "teacher.safetensors"
    accuracy = train_demo_teacher(cfg, path, torch.device("cpu"), show_progress=False, steps=2)
    assert 0 <= accuracy <= 100
    assert cfg.train.use_local_crops, "the caller's config is left as it was"
    saved = load_file(path)
    teacher = build_model(cfg.model.teacher.model_copy(update={"checkpoint": str(path)}), "teacher", 32, 4)
    assert saved.keys() == teacher.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in teacher.state_dict().items())


def test_the_demo_teacher_learns_from_unmixed_images_whatever_the_run_mixes(tiny_config, tmp_path):
    """`python -m dali_kd.train --preset function_matching` on first use trained the shared demo teacher on mixed
    images against their own labels (57.5% val instead of ~97%); the teacher must not depend on the run's mixing."""
    weights = {}
    for mix in ("none", "mixup"):
        cfg = tiny_config(f"data.augment.mix={mix}")
        path = tmp_path / f"teacher-{mix}.safetensors"
        train_demo_teacher(cfg, path, torch.device("cpu"), show_progress=False, steps=3)
        weights[mix] = load_file(path)
    assert cfg.data.augment.mix == "mixup", "the caller's config is left as it was"
    assert all(torch.equal(weights["none"][k], v) for k, v in weights["mixup"].items())
