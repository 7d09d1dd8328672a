"""Stop signals are honoured from the command's first line: while it imports they are recorded and end the run at
the next safe point; during start-up (scan, models, data stream) SIGUSR1 or SIGTERM ends the run at once with exit
75 and a Slurm requeue — nothing to save yet, nothing left behind; after the last step the run finishes its writes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from dali_kd.commands import train
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

    from dali_kd.commands import train

    names = ("SIGUSR1", "SIGTERM", "SIGINT")
    before = [signal.getsignal(getattr(signal, name)) for name in names]
    assert train.main(["data.root=/no/such/folder"]) == 2
    assert [signal.getsignal(getattr(signal, name)) for name in names] == before


# ---- while the command is importing: recorded, acted on at the next safe point --------------------------------
def test_a_stop_signal_while_importing_is_recorded_and_ends_the_start_up_at_the_next_safe_point():
    import signal

    from dali_kd.runs.preemption import Preempted, StopSignal

    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # in the middle of an import: nothing may be raised there
        assert stop.received == "SIGTERM"
        with pytest.raises(Preempted, match="^SIGTERM received: before the first step, nothing to save$"):
            stop.check()  # the safe point after the imports
    finally:
        stop.restore()


def test_a_stop_signal_raised_during_start_up_and_swallowed_there_is_not_lost():
    import signal

    from dali_kd.runs.preemption import Preempted, StopSignal

    stop = StopSignal()
    try:
        # Raised at once in the start-up work, and swallowed there by a library (a finaliser, a callback).
        swallowed = contextlib.suppress(Preempted)
        with pytest.raises(Preempted, match="^SIGUSR1 received"), stop.interrupting(), swallowed:
            os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        stop.restore()


def test_the_loops_handler_takes_over_a_signal_the_command_recorded_and_hands_back_its_own():
    import signal

    from dali_kd.runs.preemption import StopSignal

    command = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        loop = StopSignal()
        assert loop.received == "SIGUSR1", "a signal recorded before the loop started was dropped"
        loop.restore()
        assert command.received == "SIGUSR1"
    finally:
        command.restore()


IMPORT_WATCH = """
import runpy, signal, sys
seen = {}
def watch(event, args):
    if event == "import" and args[0] in ("pydantic", "yaml", "numpy", "torch") and args[0] not in seen:
        seen[args[0]] = signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
sys.addaudithook(watch)
sys.argv = ["dali_kd.train", *sys.argv[1:]]
try:
    runpy.run_module("dali_kd.train", run_name="__main__")
finally:
    print("handled before", sorted(m for m, handled in seen.items() if handled), file=sys.stderr)
    print("unhandled before", sorted(m for m, handled in seen.items() if not handled), file=sys.stderr)
"""


def test_python_m_dali_kd_train_handles_stop_signals_before_it_imports_anything_heavy(tmp_path):
    # A config mistake ends the run after pydantic and yaml are imported (torch and numpy are not needed).
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WATCH, "train.seed=-1"], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip
    assert "train.seed" in result.stderr, result.stderr[-3000:]
    assert "handled before ['pydantic', 'yaml']" in result.stderr, result.stderr[-3000:]
    assert "unhandled before []" in result.stderr


def test_sigterm_right_after_start_exits_75_with_one_line(image_tree, tmp_path):
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "dali_kd.train", *tiny_args(image_tree, tmp_path / "runs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    # As soon as the process catches SIGTERM (its handler is in place), while it is still importing.
    status = f"/proc/{process.pid}/status"
    while process.poll() is None:
        with open(status) as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & (1 << (signal.SIGTERM - 1)):
            break
        os.sched_yield()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("preempted:")] == [
        "preempted: SIGTERM received: before the first step, nothing to save"
    ]
    assert not (tmp_path / "runs").exists(), "nothing left behind"


def test_sigterm_while_the_final_weights_are_written_finishes_them_and_exits_0(image_tree, tmp_path, capsys):
    import signal

    from dali_kd.training.callbacks import Callback

    class TermAtFinish(Callback):
        def on_finish(self, trainer, summary):  # just before the final weights and summary.json are written
            os.kill(os.getpid(), signal.SIGTERM)

    # main() called from a Python program hands the signal back once it is done: here to this test's handler.
    delivered = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: delivered.append(signum))
    try:
        code = train.main(tiny_args(image_tree, tmp_path / "runs"), callbacks=[TermAtFinish()])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0
    assert delivered == [signal.SIGTERM]
    run_dir = tmp_path / "runs" / "fault"
    err = capsys.readouterr().err
    assert "SIGTERM received after the last step: the run finished and wrote its final weights" in err
    assert "nothing to save" not in err
    assert (run_dir / "student.safetensors").is_file() and (run_dir / "summary.json").is_file()


# A test that runs the command in-process, and `timeout` sends pytest SIGTERM in the middle of it.
IN_PROCESS_TEST = """
import os, signal
from pathlib import Path

from dali_kd.commands import train
from dali_kd.training.callbacks import Callback
from tests.faults import tiny_args


class TermBeforeStep2(Callback):
    def on_step(self, trainer, batch):
        if trainer.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_runs_the_command_in_process():
    args = tiny_args(Path(os.environ["IMAGES"]), Path(os.environ["RUNS"]))
    train.main([*args, "train.max_steps_per_epoch=3"], callbacks=[TermBeforeStep2()])


def test_comes_after_it():
    Path(os.environ["RUNS"], "pytest went on").touch()
"""


def test_sigterm_while_a_test_runs_the_command_in_process_stops_pytest(image_tree, tmp_path):
    (tmp_path / "test_in_process.py").write_text(IN_PROCESS_TEST)
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_in_process.py"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "IMAGES": str(image_tree), "RUNS": str(runs)},
    )  # fmt: skip
    assert result.returncode == -signal.SIGTERM, (
        result.returncode,
        result.stdout[-3000:],
        result.stderr[-3000:],
    )
    assert [p.name for p in runs.rglob("step_*.pt")] == ["step_000000002.pt"], "the checkpoint is saved first"
    assert not (runs / "pytest went on").exists()


def test_the_dali_kd_train_script_is_the_program_that_exits_75():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dali-kd-train"] == "dali_kd.commands.train:program"  # as the driver above runs it
