"""The command line's choices before training: which run directory, resume or not."""

from __future__ import annotations

import pytest

from dali_kd.config import DEMO_CONFIG_DIR
from dali_kd.errors import UserError
from dali_kd.train import choose_run, main, unused_run_dir


def test_a_fresh_run_is_refused_where_a_run_already_is(tiny_config, tmp_path):
    cfg = tiny_config()  # train.run_name=test
    run_dir = tmp_path / "runs" / "test"
    assert choose_run(cfg, "none") == (run_dir, None)
    run_dir.mkdir(parents=True)
    assert choose_run(cfg, "none") == (run_dir, None), "an empty directory holds no run"
    (run_dir / "checkpoints").mkdir()
    for leftover, named in [
        ("metrics.jsonl", "metrics.jsonl"),
        ("summary.json", "summary.json"),
        ("checkpoints/step_000000004.pt", "checkpoints"),
    ]:
        (run_dir / leftover).write_text("")
        expected = (
            rf"run directory {run_dir} already holds a run \({named}\): resume it with --resume auto, "
            r"or choose another train\.run_name"
        )
        with pytest.raises(UserError, match=expected):
            choose_run(cfg, "none")
        (run_dir / leftover).unlink()
    # The same directory is continued on purpose with --resume auto.
    checkpoint = run_dir / "checkpoints" / "step_000000004.pt"
    checkpoint.write_text("")
    (run_dir / "metrics.jsonl").write_text("")
    assert choose_run(cfg, "auto") == (run_dir, checkpoint)


def test_a_new_run_directory_is_never_one_that_exists(tiny_config, tmp_path):
    assert unused_run_dir(tmp_path, "r") == tmp_path / "r"
    (tmp_path / "r").mkdir()
    assert unused_run_dir(tmp_path, "r") == tmp_path / "r-2"
    (tmp_path / "r-2").mkdir()
    assert unused_run_dir(tmp_path, "r") == tmp_path / "r-3"
    cfg = tiny_config("train.run_name=null")
    first, _ = choose_run(cfg, "none")
    first.mkdir(parents=True)
    second, _ = choose_run(cfg, "none")
    assert second != first and second.parent == first.parent and not second.exists()


def test_cli_refuses_to_start_fresh_in_another_runs_directory(image_tree, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "mine"
    (run_dir / "checkpoints").mkdir(parents=True)
    old = run_dir / "checkpoints" / "step_000000009.pt"
    old.write_text("the old run's")
    args = [
        "--data_config", str(DEMO_CONFIG_DIR / "data_config.yaml"), "--device", "cpu", "--no-progress",
        f"data.root={image_tree / 'train'}", f"data.val_root={image_tree / 'val'}", "data.image_size=32",
        "data.eval_resize=36", "data.dali_threads=1", "model.teacher.name=test_resnet",
        "model.teacher.checkpoint=null", "model.teacher.num_classes=4", "model.student.name=test_vit",
        "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2", "train.compile_student=false",
        f"train.output_dir={tmp_path / 'runs'}", "train.run_name=mine",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: run directory {run_dir} already holds a run (checkpoints): resume it with --resume auto, "
        "or choose another train.run_name"
    ]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [old.name]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"], "nothing written into the old run"
