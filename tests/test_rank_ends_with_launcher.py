"""A rank started by torchrun ends when torchrun is SIGKILLed (torchrun starts each rank in a session of its own, so
`kill -9` of it or of its process group reaches it alone); a run started any other way outlives its parent (a
`nohup` run whose terminal closes)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dali_kd.distributed import end_with_launcher

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")

# A rank as dali_kd runs one: its stop-signal handler records SIGTERM instead of ending it. With an argument it is
# still starting up (dali_kd imported, the rendezvous not reached) until a line comes on stdin.
RANK = """
import signal, sys
signal.signal(signal.SIGTERM, lambda *a: None)
import dali_kd
if len(sys.argv) > 1:
    print("starting", flush=True)
    sys.stdin.readline()
from dali_kd.distributed import end_with_launcher
print(end_with_launcher(), flush=True)
while True:
    signal.pause()
"""
# A launcher as torchrun is: it starts the rank in a session of its own, says the rank's pid, and waits.
LAUNCHER = f"""
import os, subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", {RANK!r}, *sys.argv[1:]], start_new_session=True)
print(rank.pid, flush=True)
rank.wait()
"""


def _pdeathsig() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(-1)
    assert libc.prctl(2, ctypes.byref(value), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
    return value.value


def _gone(pid: int) -> bool:
    """Ended (no such process, or a zombie its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _start(*rank_args: str) -> tuple[subprocess.Popen, int]:
    """A launcher and its rank under torchrun's environment; the rank's pid, once it says it got where it waits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHELASTIC_RUN_ID": "none"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *rank_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    assert launcher.stdout is not None
    rank = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == ("starting" if rank_args else "True")
    return launcher, rank


def _wait_gone(rank: int) -> bool:
    deadline = time.monotonic() + 60  # a bound on a hang, not a measured time: the kernel acts at once
    while not _gone(rank) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _gone(rank)


def test_a_torchrun_rank_ends_when_its_launcher_is_sigkilled():
    launcher, rank = _start()
    try:
        launcher.kill()
        launcher.wait()
        assert _wait_gone(rank), "the rank trained on after torchrun was SIGKILLed"
    finally:
        if not _gone(rank):
            os.kill(rank, signal.SIGKILL)


def test_a_rank_whose_launcher_was_sigkilled_during_its_start_up_ends_before_the_rendezvous():
    """Its start-up (imports: seconds) outlasted the launcher: joining the port's next rendezvous would break that
    run, so it ends where it would set the signal."""
    launcher, rank = _start("start-up")
    try:
        launcher.kill()
        launcher.wait()  # the rank has a new parent now
        assert launcher.stdin is not None
        launcher.stdin.write("go on\n")  # the rank reads the pipe it inherited
        launcher.stdin.flush()
        assert _wait_gone(rank), "a rank went on to the rendezvous after torchrun was SIGKILLed"
    finally:
        if not _gone(rank):
            os.kill(rank, signal.SIGKILL)


def test_a_run_not_started_by_torchrun_keeps_running_without_its_parent(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    before = _pdeathsig()
    assert end_with_launcher() is False
    assert _pdeathsig() == before == 0, "a nohup run would end when its terminal closes"
