"""`python -m dali_kd.tune` stopped or misused: Ctrl-C and SIGTERM end it with one line and take its temporary runs
away; an --options word that matches nothing and a --json file that cannot be written are said before any timing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from dali_kd.commands import tune
from tests.conftest import tiny_overrides
from tests.faults import ROOT


@pytest.mark.parametrize(
    ("signum", "code", "how"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 75, "preempted")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_stop_signal_after_the_first_timing_is_one_line_and_leaves_no_temporary_runs(
    image_tree, tmp_path, signum, code, how
):
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "dali_kd.tune", *tiny_overrides(image_tree, tmp_path), "--quick", "--steps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)},
    )  # fmt: skip
    assert process.stdout is not None
    said = []
    for line in process.stdout:
        said.append(line)
        if line.startswith("round 1/"):  # the first timing row; more rounds follow
            break
    else:
        pytest.fail(f"no timing row:\n{''.join(said)}")
    assert list(temp.glob("dali_kd_tune_*")), "the timing runs' folder exists while it tunes"
    os.killpg(process.pid, signum)  # the whole group, as a terminal's Ctrl-C or a scheduler's SIGTERM
    out, err = process.communicate(timeout=300)
    assert "Traceback" not in err, err[-3000:]
    assert process.returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    assert [line for line in err.splitlines() if line.startswith(how)] == [
        f"{how}: {name} received: tuning stopped, nothing decided"
    ]
    assert "fastest:" not in out
    assert not list(temp.glob("dali_kd_tune_*")), "the temporary runs are removed"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--options", "nosuchoption"],
            r"^--options: 'nosuchoption' matches no speed option \(this config's",
        ),
        (
            ["--options", "prefetch,typo"],
            r"^--options: 'typo' matches no speed option .*data\.prefetch_batches",
        ),
        (["--options", ","], r"^--options: names no option"),
        (["--json", "{tmp}/no/such/folder/t.json"], r"^--json: the folder .*/no/such/folder does not exist$"),
        (["--json", "{tmp}"], r"^--json: .* is a folder; give the name of a file to write$"),
    ],
)
def test_a_flag_that_cannot_work_is_one_line_before_any_timing(image_tree, tmp_path, capsys, flags, says):
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert tune.main([*tiny_overrides(image_tree, tmp_path), "--quick", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "nothing was timed"
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("error: ")
    assert re.search(says, captured.err.removeprefix("error: ").strip()), captured.err
