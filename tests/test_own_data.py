"""Your own images in one command: a data.root of one's own never keeps the demo's val folder or teacher, evaluation
takes a held-out part of the folder, and a teacher whose head lacks the data's classes teaches its features only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from dali_kd.config import CONFIG_DIR, DEMO_CONFIG_DIR, SECTION_FILES, LossConfig, load_config
from dali_kd.config.own_data import OWN_DATA_HOLDOUT
from dali_kd.data import ImageIndex, prepare_data
from dali_kd.data.holdout import held_out, split_off
from dali_kd.errors import UserError
from dali_kd.models import head_sizes
from dali_kd.training.build import teacher_head_loss
from dali_kd.training.trainer import Trainer
from tests.conftest import write_tree

ROOT = Path(__file__).resolve().parents[1]
DEMO = load_config()


def test_a_data_root_of_ones_own_takes_neither_the_demos_val_folder_nor_its_teacher(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("data: {root: /my/images}\n")
    data_file = tmp_path / "data.yaml"
    demo_data = yaml.safe_load((DEMO_CONFIG_DIR / SECTION_FILES["data"]).read_text())
    data_file.write_text(yaml.safe_dump({**demo_data, "root": "/my/images"}))
    for cfg in (
        load_config(overrides=["data.root=/my/images"]),
        load_config(presets=[preset]),
        load_config(data_config=data_file),
    ):
        assert cfg.data.val_root is None and cfg.data.holdout_fraction == OWN_DATA_HOLDOUT
        teacher = cfg.model.teacher
        assert teacher.checkpoint != DEMO.model.teacher.checkpoint
        assert (
            Path(teacher.checkpoint).parent.parent == Path(DEMO.model.teacher.checkpoint).parent / "teachers"
        )
        assert teacher.num_classes is None, "the demo's 10 classes are not this data's"

    # A teacher trained at one image size is not reused at another (nor on another held-out part).
    paths = {
        load_config(overrides=["data.root=/my/images", *more]).model.teacher.checkpoint
        for more in ([], ["data.image_size=64", "data.eval_resize=72"], ["data.holdout_fraction=0.2"])
    }
    assert len(paths) == 3

    # The demo keeps its own val folder and teacher; the demo's val folder with another root is never in force.
    assert DEMO.data.val_root is not None and DEMO.data.holdout_fraction == 0
    assert load_config(overrides=[f"data.root={Path(DEMO.data.root).expanduser()}"]).data.val_root is not None
    # What is given on the command line with it stays.
    given = load_config(overrides=["data.root=/my/images", "data.val_root=/my/val"])
    assert given.data.val_root == "/my/val" and given.data.holdout_fraction == 0
    assert (
        load_config(overrides=["data.root=/my/images", "data.holdout_fraction=0"]).data.holdout_fraction == 0
    )
    mine = load_config(overrides=["data.root=/my/images", "model.teacher.checkpoint=/my/t.safetensors"])
    assert mine.model.teacher.checkpoint == "/my/t.safetensors" and mine.model.teacher.num_classes is None
    random_init = load_config(overrides=["data.root=/my/images", "model.teacher.checkpoint=null"])
    assert random_init.model.teacher.num_classes == DEMO.model.teacher.num_classes, (
        "no weights to take a head from"
    )
    pretrained = load_config(overrides=["data.root=/my/images", "model.teacher.pretrained=true"])
    assert pretrained.model.teacher.checkpoint is None, "pretrained weights, not a teacher trained here"
    # Another folder, or another held-out part, is another teacher.
    other = load_config(overrides=["data.root=/my/other"]).model.teacher.checkpoint
    all_in = load_config(
        overrides=["data.root=/my/images", "data.holdout_fraction=0"]
    ).model.teacher.checkpoint
    assert len({other, all_in, load_config(overrides=["data.root=/my/images"]).model.teacher.checkpoint}) == 3
    # The real-use files name no demo path: nothing changes there.
    real = load_config(*(CONFIG_DIR / name for name in SECTION_FILES.values()))
    assert real.data.val_root == "/datasets/imagenet/val" and real.model.teacher.pretrained


def test_a_list_of_teachers_over_ones_own_data_is_read_as_written():
    """`--preset two_teachers data.root=/my/images`: the held-out part as for one teacher; the teachers as listed
    (the demo's one-teacher substitution used to write model.teacher beside model.teachers: a config error)."""
    cfg = load_config(presets=["two_teachers"], overrides=["data.root=/my/images"])
    assert cfg.data.val_root is None and cfg.data.holdout_fraction == OWN_DATA_HOLDOUT
    listed = load_config(presets=["two_teachers"]).model.teachers
    assert cfg.model.teacher is None and cfg.model.teachers == listed


def test_shards_cannot_be_split_the_error_says_what_to_set():
    with pytest.raises(UserError, match=r"data.holdout_fraction=0.1 with data.format=shards.*data.val_root"):
        load_config(overrides=["data.root=/my/shards", "data.format=shards"])


def test_the_held_out_part_is_per_class_stable_and_never_trained_on(tmp_path):
    root = write_tree(tmp_path / "images", num_classes=3, per_class=10)
    (root / "lonely").mkdir()
    (root / "class_0" / "0.jpg").rename(
        root / "lonely" / "0.jpg"
    )  # a class of one image keeps it for training
    data = load_config(overrides=[f"data.root={root}", "data.holdout_fraction=0.15"]).data
    splits = prepare_data(data)
    assert splits.val is not None
    train, val = set(splits.train.files), set(splits.val.files)
    assert not train & val and len(train | val) == 30
    held_per_class = {name: splits.val.labels.count(i) for i, name in enumerate(splits.val.class_names)}
    assert held_per_class == {"class_0": 1, "class_1": 2, "class_2": 2, "lonely": 0}  # round(9 or 10 × 0.15)
    assert splits.train.class_names == splits.val.class_names
    again = prepare_data(data)
    assert again.val is not None and again.val.files == splits.val.files, "the same files every run"

    rel = [str(Path(f).relative_to(root)) for f in sorted(train | val)]
    assert held_out(rel, 0.15) == held_out(reversed(rel), 0.15), "whatever order they are listed in"
    # A file the scan sets aside moves no other file between the parts (class_1 without it: 9 × 0.15 rounds to 1).
    bad = next(r for r in rel if r.startswith("class_1/") and r not in held_out(rel, 0.15))
    everything = ImageIndex.from_folder(root)
    index_without = everything.take([i for i, f in enumerate(everything.files) if not f.endswith(bad)])
    _, val_without, _ = split_off(index_without, 0.15, set_aside=[bad])
    assert val_without is not None and set(val_without.files) == set(splits.val.files)


def test_no_validation_folder_and_no_held_out_part_says_there_is_no_evaluation(image_tree):
    data = load_config(overrides=[f"data.root={image_tree / 'train'}", "data.holdout_fraction=0"]).data
    splits = prepare_data(data)
    assert splits.val is None and splits.train.num_samples == 48
    assert "data: no evaluation (data.val_root is null and data.holdout_fraction is 0)" in splits.messages


def test_a_teacher_whose_head_lacks_the_datas_classes_teaches_features_only():
    loss = LossConfig()
    assert loss.logit_weight > 0
    assert teacher_head_loss(loss, "resnet18", 4, 4) == (loss, None)
    assert teacher_head_loss(loss, "vit_base_patch14_dinov2", 0, 4) == (loss, None), "no head: no logits"
    off, line = teacher_head_loss(loss, "resnet18", 10, 2)
    assert off.logit_weight == 0 and off.feature_weight == loss.feature_weight
    assert line is not None and "\n" not in line
    assert line.startswith("model.teacher: resnet18's classifier has 10 outputs but the data has 2 classes")
    for key in ("model.teacher.checkpoint", "model.teacher.name", "model.teacher.num_classes=0"):
        assert key in line
    logits_only = LossConfig(feature_weight=0.0)
    with pytest.raises(
        UserError, match=r"train.loss.logit_weight is the only loss.*model.teacher.checkpoint"
    ):
        teacher_head_loss(logits_only, "resnet18", 10, 2)
    # The first of several teachers: the keys to set are its own.
    _, first = teacher_head_loss(loss, "resnet18", 10, 2, "model.teachers.0")
    assert first is not None and first.startswith("model.teachers.0: resnet18's classifier has 10 outputs")
    assert "model.teachers.0.checkpoint" in first and "model.teacher." not in first


def test_a_run_with_a_ten_class_teacher_on_four_classes_distils_no_logits(tiny_config, tmp_path, capsys):
    cfg = tiny_config("model.teacher.num_classes=10", "train.epochs=1", "train.max_steps_per_epoch=2")
    Trainer(cfg, torch.device("cpu"), show_progress=False).fit(tmp_path / "run")
    assert (
        "model.teacher: test_resnet's classifier has 10 outputs but the data has 4 classes"
        in capsys.readouterr().out
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (
        rows and all("loss_logit" not in row for row in rows) and all("loss_feature" in row for row in rows)
    )


def test_a_checkpoint_teacher_without_num_classes_has_the_head_its_weights_have(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(path))
    cfg = load_config(overrides=[f"model.teacher.checkpoint={path}", "model.teacher.name=test_resnet",
                                 "model.teacher.num_classes=null"]).model  # fmt: skip
    assert head_sizes(cfg, None) == (3, 3)
    headless = tmp_path / "headless.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(headless))
    assert head_sizes(
        cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": str(headless)})}), None
    ) == (0, 0)


def own_data_commands() -> list[str]:
    """The commands docs/data.md's own-data section gives, as written there."""
    page = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    section = page.partition("## Your own images")[2].partition("\n## ")[0]
    block = section.partition("```bash\n")[2].partition("```")[0]
    return [
        line.split("#")[0].strip() for line in block.splitlines() if line.startswith("python -m dali_kd.")
    ]


@pytest.mark.slow
def test_the_documented_own_data_command_works_from_an_empty_home(tmp_path):
    (command,) = own_data_commands()
    assert command == "python -m dali_kd.train data.root=/my/images"
    images = write_tree(tmp_path / "my" / "images", num_classes=2, per_class=20)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    argv = [sys.executable, *command.split()[1:]]
    argv = [a.replace("/my/images", str(images)) for a in argv]
    # Only for speed: a small image, batch and run, no compile; one thread (two cores shared with other jobs).
    speed = ["data.image_size=32", "data.eval_resize=36", "data.dali_threads=1", "train.batch_size=8",
             "train.epochs=1", "train.max_steps_per_epoch=3", "train.compile_student=false"]  # fmt: skip
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv + ["--no-progress", *speed], capture_output=True, text=True, cwd=work, env=env,
                            timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "data: val split: 4 of the 40 images under data.root held out for evaluation" in out
    (run_dir,) = (work / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student_knn_top1"] is not None and summary["num_classes"] == 2
    teacher = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["teacher"]
    demo_teacher = Path(DEMO.model.teacher.checkpoint.replace("~", str(home), 1))
    assert Path(teacher["checkpoint"].replace("~", str(home), 1)).is_file()
    assert "/teachers/images-" in teacher["checkpoint"] and "teacher: resnet14t trained on data.root" in out
    assert not demo_teacher.exists() and not (demo_teacher.parent / "data").exists(), "nothing of the demo"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "classifier has" not in out and "loss_logit" in rows[0], (
        "a teacher of these two classes: logits too"
    )


def test_the_teacher_trained_for_ones_own_data_never_sees_its_held_out_part(
    image_tree, tmp_path, monkeypatch
):
    from dali_kd.commands import demo

    cfg = load_config(
        overrides=[
            f"data.root={image_tree / 'train'}",
            "data.image_size=32",
            "data.eval_resize=36",
            "train.batch_size=8",
            "train.device=cpu",
        ]  # fmt: skip
    )
    assert demo.demo_parts(cfg) == (False, True) and cfg.data.holds_out
    streamed = []
    make_train_stream = demo.make_train_stream

    def recording(settings, index, *args, **kwargs):
        streamed.append(index)
        return make_train_stream(settings, index, *args, **kwargs)

    monkeypatch.setattr(demo, "make_train_stream", recording)
    path = tmp_path / "teacher.safetensors"
    demo.train_demo_teacher(cfg, path, torch.device("cpu"), show_progress=False, steps=1)
    held = prepare_data(cfg.data).val
    assert held is not None and held.num_samples == 4 and path.is_file()
    (index,) = streamed
    assert index.num_samples == 44 and not set(index.files) & set(held.files)
