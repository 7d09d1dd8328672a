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

# A rank as dali_kd runs one: its stop-signal handler records SIGTERM instead of ending it.
RANK = """
import signal, sys
signal.signal(signal.SIGTERM, lambda *a: None)
from dali_kd.distributed import end_with_launcher
print(end_with_launcher(), flush=True)
while True:
    signal.pause()
"""
# A launcher as torchrun is: it starts the rank in a session of its own, says the rank's pid, and waits.
LAUNCHER = f"""
import os, subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", {RANK!r}], start_new_session=True)
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


def _start(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True, env=env)
    assert launcher.stdout is not None
    rank = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == str("TORCHELASTIC_RUN_ID" in env)  # the rank is set up
    return launcher, rank


def test_a_torchrun_rank_ends_when_its_launcher_is_sigkilled():
    launcher, rank = _start({"TORCHELASTIC_RUN_ID": "none"})
    try:
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60  # a bound on a hang, not a measured time: the kernel acts at once
        while not _gone(rank) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _gone(rank), "the rank trained on after torchrun was SIGKILLed"
    finally:
        if not _gone(rank):
            os.kill(rank, signal.SIGKILL)


def test_a_run_not_started_by_torchrun_keeps_running_without_its_parent(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    before = _pdeathsig()
    assert end_with_launcher() is False
    assert _pdeathsig() == before == 0, "a nohup run would end when its terminal closes"
