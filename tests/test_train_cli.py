"""The command line's choices before training: which run directory, resume or not."""

from __future__ import annotations

import pytest

from dali_kd.commands.train import main
from dali_kd.config import DEMO_CONFIG_DIR
from dali_kd.errors import UserError
from dali_kd.runs.checkpoint import CheckpointDir
from dali_kd.runs.directory import choose_run, claim, claim_unused


def chosen(cfg, resume: str):
    """(run directory, checkpoint) as choose_run decides, its claim let go again."""
    held, checkpoint = choose_run(cfg, resume)
    held.release()
    return held.path, checkpoint


def test_a_fresh_run_is_refused_where_a_run_already_is(tiny_config, tmp_path):
    cfg = tiny_config()  # train.run_name=test
    run_dir = tmp_path / "runs" / "test"
    assert chosen(cfg, "none") == (run_dir, None)
    assert not (tmp_path / "runs").exists(), "a claim let go with nothing written leaves nothing behind"
    run_dir.mkdir(parents=True)
    assert chosen(cfg, "none") == (run_dir, None), "an empty directory holds no run"
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
    assert chosen(cfg, "auto") == (run_dir, checkpoint)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_a_new_run_directory_is_never_one_that_exists(tiny_config, tmp_path):
    first = claim_unused(tmp_path, "r")
    assert first.path == tmp_path / "r"
    (tmp_path / "r-2").mkdir()
    third = claim_unused(tmp_path, "r")
    assert third.path == tmp_path / "r-3", "r is held, r-2 exists"
    cfg = tiny_config("train.run_name=null")
    one, _ = choose_run(cfg, "none")
    two, _ = choose_run(cfg, "none")  # started in the same second: the same dated name
    assert two.path != one.path and two.path.parent == one.path.parent and two.path.is_dir()
    for held in (first, third, one, two):
        held.release()
    made = (first.path, third.path, one.path, two.path)
    assert not any(path.exists() for path in made), "a claim let go with nothing written removes its folder"
    assert (tmp_path / "r-2").is_dir(), "a folder the claims did not make stays"


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_a_run_directory_another_run_holds_is_refused_at_once(tiny_config, tmp_path, resume):
    cfg = tiny_config()
    other = claim(tmp_path / "runs" / "test")  # a run started a moment earlier, still going
    with pytest.raises(UserError, match=r"run directory .*/runs/test is in use by another run \(pid \d+ on "):
        choose_run(cfg, resume)
    other.release()
    held, _ = choose_run(cfg, resume)  # it ended: the directory is free again
    held.release()


def test_a_save_removes_only_its_own_temporary_files_and_a_claim_the_rest(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "run", keep_last=2)
    checkpoints.path.mkdir(parents=True)
    in_progress = checkpoints.path / ".step_000000006.pt.0a1b2c3d4e5f.x8y9.tmp"  # another process, writing
    in_progress.write_bytes(b"half")
    checkpoints.save({"format": 1, "step": 5}, 5)
    assert in_progress.exists(), "a save deleted another process's checkpoint while it was being written"
    # A run that holds the directory knows whoever wrote it has ended: a killed write's leftover goes.
    claim(tmp_path / "run").release()
    assert not in_progress.exists()
    assert [p.name for p in checkpoints.path.iterdir()] == ["step_000000005.pt"]


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
