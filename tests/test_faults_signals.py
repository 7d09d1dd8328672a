"""Stop signals are honoured from the first second: during start-up (scan, models, data stream) SIGUSR1 or
SIGTERM ends the run at once with exit 75 and a Slurm requeue — nothing to save yet, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.faults import ROOT, fake_scontrol, tiny_args

DRIVER = ROOT / "tests" / "drivers" / "run_with_fault.py"


@pytest.mark.parametrize(
    ("fault", "signal_name"),
    [
        ("usr1-during-scan", "SIGUSR1"),
        ("term-during-scan", "SIGTERM"),
        ("usr1-during-models", "SIGUSR1"),
        ("term-during-stream", "SIGTERM"),
    ],
)
def test_a_stop_signal_during_start_up_exits_75_and_requeues(image_tree, tmp_path, fault, signal_name):
    path, calls = fake_scontrol(tmp_path)
    env = {
        **os.environ,
        "PATH": path,
        "SLURM_JOB_ID": "5150",
        "SLURM_PROCID": "0",
    }
    result = subprocess.run(
        [sys.executable, str(DRIVER), fault, "0", "--", *tiny_args(image_tree, tmp_path / "runs")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 75, result.stderr[-3000:]
    assert f"preempted: {signal_name} received: before the first step, nothing to save" in result.stderr
    assert calls.read_text().split() == ["requeue", "5150"]
    assert not list((tmp_path / "runs").rglob("step_*.pt"))


def test_the_start_up_handlers_are_put_back_when_main_returns(tiny_config):
    import signal

    from dali_kd import train

    before = signal.getsignal(signal.SIGUSR1)
    assert train.main(["data.root=/no/such/folder"]) == 2
    assert signal.getsignal(signal.SIGUSR1) is before
