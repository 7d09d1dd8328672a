"""Ctrl-C on the command line is honoured like SIGTERM: one line at any moment (while the command imports, too),
a checkpoint when it comes mid-run, the final writes finished when it comes after the last step; exit 130, and
nothing asks Slurm to run the job again. The signal goes to the whole process group, as a terminal sends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.faults import ROOT, fake_scontrol, tiny_args

DRIVER = ROOT / "tests" / "drivers" / "run_with_fault.py"

# `python -m dali_kd.train` with SIGINT sent to itself as it starts importing a module (the import is where a
# KeyboardInterrupt would leave a traceback and a half-imported module).
INT_ON_IMPORT = """
import os, runpy, signal, sys
target, sent = sys.argv[1], []
def watch(event, args):
    if event == "import" and args[0] == target and not sent:
        sent.append(target)
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(watch)
sys.argv = ["dali_kd.train", *sys.argv[2:]]
runpy.run_module("dali_kd.train", run_name="__main__", alter_sys=True)
"""


def interrupted_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("interrupted")]


@pytest.mark.parametrize(
    "module", ["pydantic", "torch"]
)  # the config schema's import, then the run's heavy ones
def test_ctrl_c_while_the_command_imports_is_one_line_and_exit_130(image_tree, tmp_path, module):
    path, calls = fake_scontrol(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", INT_ON_IMPORT, module, *tiny_args(image_tree, tmp_path / "runs")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": path, "SLURM_JOB_ID": "5150"},
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 130, result.stderr[-3000:]
    assert interrupted_lines(result.stderr) == [
        "interrupted: SIGINT received: before the first step, nothing to save"
    ]
    assert not (tmp_path / "runs").exists(), "nothing left behind"
    assert not calls.exists(), "a Ctrl-C is not requeued"


def ctrl_c_when_paused(
    fault: str, step: int, image_tree, tmp_path, *extra: str
) -> subprocess.CompletedProcess:
    """Runs the command through the driver, which pauses at `fault`; Ctrl-C to its process group there, then on."""
    path, calls = fake_scontrol(tmp_path)
    args = [*tiny_args(image_tree, tmp_path / "runs"), *extra]
    process = subprocess.Popen(
        [sys.executable, str(DRIVER), fault, str(step), "--", *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": path, "SLURM_JOB_ID": "5150", "SLURM_PROCID": "0"},
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    said = []
    for line in process.stdout:  # the run goes no further until it reads a line
        said.append(line)
        if line.strip() == "paused":
            break
    else:
        pytest.fail(f"the run never paused:\n{''.join(said)}{process.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate("\n", timeout=300)
    assert not calls.exists(), "a Ctrl-C is not requeued"
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(said) + out, err)


def test_ctrl_c_mid_run_saves_a_checkpoint_and_exits_130(image_tree, tmp_path):
    result = ctrl_c_when_paused("pause-at-step", 2, image_tree, tmp_path, "train.max_steps_per_epoch=4")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 130, result.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "fault" / "checkpoints" / "step_000000002.pt"
    assert interrupted_lines(result.stderr) == [
        f"interrupted: SIGINT received: checkpoint saved to {checkpoint}"
    ]
    assert checkpoint.is_file()
    assert not (tmp_path / "runs" / "fault" / "student.safetensors").exists(), "the run did not go on"


@pytest.mark.parametrize(
    ("fault", "step"),
    [
        ("pause-at-eval", 2),
        ("pause-at-finish", 0),
    ],  # the final evaluation; the final weights and summary.json
)
def test_ctrl_c_after_the_last_step_finishes_the_run_and_exits_0(image_tree, tmp_path, fault, step):
    result = ctrl_c_when_paused(fault, step, image_tree, tmp_path)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "SIGINT received after the last step: the run finished and wrote its final weights" in result.stderr
    )
    run_dir = tmp_path / "runs" / "fault"
    assert (run_dir / "student.safetensors").is_file() and (run_dir / "summary.json").is_file()
    assert (run_dir / "checkpoints" / "step_000000002.pt").is_file()
