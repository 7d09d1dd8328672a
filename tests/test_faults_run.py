"""A run's own folder and numbers a user can get wrong: two runs never share a run directory, a run name cannot
leave train.output_dir, out-of-range seeds and sizes and hand-edited metrics are one line each, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dali_kd.commands import train
from tests.faults import ROOT, assert_one_line_error, run_module, tiny_args

DRIVER = ROOT / "tests" / "drivers" / "run_with_fault.py"


def test_a_second_run_into_a_running_runs_directory_is_refused_and_the_first_is_untouched(
    image_tree, tmp_path, capsys
):
    out = tmp_path / "runs"
    args = tiny_args(image_tree, out)  # train.run_name=fault, --resume none
    first = subprocess.Popen(
        [sys.executable, str(DRIVER), "pause-at-step", "2", "--", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        for line in first.stdout:  # the first run is training (its step 1 is done)
            if line.strip() == "paused":
                break
        else:
            pytest.fail(f"the first run ended early: {first.stderr.read()[-3000:]}")
        code = train.main([*args, "--resume", "auto"])  # as a second Slurm job with the same run name would
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert len(err) == 1 and err[0].startswith(
            f"error: run directory {out / 'fault'} is in use by another run"
        )
        assert sorted(p.name for p in out.iterdir()) == ["fault"], (
            "the refused run made no directory of its own"
        )
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
        first.wait()
    summary = json.loads((out / "fault" / "summary.json").read_text())
    assert summary["steps"] == 2
    log = (out / "fault" / "train.log").read_text()
    assert log.count("test_resnet → test_vit on") == 1, "another run wrote into the first run's train.log"
    assert not (out / "fault" / ".run.lock").exists(), "the claim is let go when the run ends"


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/tmp/elsewhere", "."])
def test_a_run_name_is_one_folder_inside_the_output_dir(image_tree, tmp_path, name):
    result = run_module(
        "dali_kd.train", [*tiny_args(image_tree, tmp_path / "runs"), f"train.run_name={name}"], tmp_path
    )
    assert_one_line_error(
        result, 2, r"^error: command line: train\.run_name: must be one folder name inside "
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written anywhere"


ROWS = {"step": 1, "epoch": 0, "loss": 0.5, "lr": 1e-3, "img_per_s": 10.0, "step_ms": 5.0, "data_ms": None}
NUMBERS_OUT_OF_RANGE = [  # (command, arguments, what the one line says)
    ("dali_kd.train", ["train.seed=4294967296"], r"train\.seed: Input should be less than or equal to 4294967295"),
    ("dali_kd.shard", ["src", "out", "--seed", "1" * 65], r"argument --seed: must be from 0 to 4294967295"),
    ("dali_kd.shard", ["src", "out", "--max-image-pixels", "-1"], r"argument --max-image-pixels: must be at least 1"),
    ("dali_kd.scan", ["src", "--max-pixels", "x"], r"argument --max-pixels: expected a whole number, got .x."),
    ("dali_kd.report", [], r"the following arguments are required: run_dir"),
]  # fmt: skip


@pytest.mark.parametrize(("module", "args", "says"), NUMBERS_OUT_OF_RANGE)
def test_numbers_out_of_range_and_usage_mistakes_are_one_line(image_tree, tmp_path, module, args, says):
    if module == "dali_kd.train":
        args = [*tiny_args(image_tree, tmp_path / "runs"), *args]
    assert_one_line_error(run_module(module, args, tmp_path), 2, says)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [("loss", None, "null"), ("loss", "0.5", '"0.5"'), ("img_per_s", None, "null"), ("data_ms", "3", '"3"')],
)
def test_report_names_the_file_row_and_key_of_a_value_that_is_not_a_number(tmp_path, key, value, shown):
    rows = [ROWS, {**ROWS, "step": 2, key: value}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_module("dali_kd.report", [str(tmp_path)], tmp_path)
    assert_one_line_error(
        result, 2, rf"^error: {tmp_path / 'metrics.jsonl'}: line 2: '{key}' is {shown}, expected a number$"
    )
