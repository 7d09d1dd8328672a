"""Preemption: SIGUSR1/SIGTERM/SIGINT ask for a checkpoint at the next step boundary; the command line then exits 75
and asks Slurm to requeue (130 after Ctrl-C, which nothing requeues), a Python program gets the signal back."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the job is requeued and resumes by itself
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C: the user stopped it, so nothing requeues it
# What a run turns into a checkpoint, on the command line and in a Python program alike.
RUN_SIGNALS = ("SIGINT", "SIGUSR1", "SIGTERM")
JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")


class Preempted(BaseException):
    """A stop signal arrived: raised by the trainer after it saved a checkpoint, or at once during start-up.

    A BaseException, like KeyboardInterrupt: no `except Exception` on the way (a model loader turning errors into
    user errors, say) may mistake it for a failure.
    """

    def __init__(self, checkpoint, signal_name: str):
        where = (
            f"checkpoint saved to {checkpoint}" if checkpoint else "before the first step, nothing to save"
        )
        super().__init__(f"{signal_name} received: {where}")
        self.checkpoint = checkpoint
        self.signal_name = signal_name

    @property
    def interrupted(self) -> bool:
        """Ctrl-C: the user's own stop, not a scheduler's."""
        return self.signal_name == "SIGINT"


class StopSignal:
    """Handlers for stop signals that record the signal; the run acts on it at a point where that is safe.

    Acting inside the handler is not: a signal lands at any bytecode, and an exception raised there in the middle
    of an import leaves a module half-imported, or is swallowed (a finaliser, a library's callback) and the signal
    is lost. So the handler only records it, and `check()` (called at safe points: after the imports, between
    start-up stages, every step) turns it into Preempted. Within `interrupting()` (start-up work after the imports:
    a cold scan, the demo's preparation, building the models) the handler also raises at once, since Slurm's grace
    time (--signal=USR1@90) is shorter than a cold scan and there is nothing to save yet; what it raised is still
    recorded, so a swallowed raise is caught by the next check.

    signals: SIGUSR1 and SIGTERM, or RUN_SIGNALS (SIGINT too: a run, on the command line or inside a Python program,
    where Ctrl-C must also leave a checkpoint). A signal the process ignores stays ignored, and outside the main thread (where
    Python cannot set handlers) none is watched. Nested instances (the command's, then the training loop's) watch
    the same signals and share what they saw: a new one starts with the signal its predecessor recorded, and hands
    back what it recorded when `restore()` puts the predecessor back. As a context manager, the exit restores the
    previous handlers and passes the recorded signal on to them (`pass_on()`).
    """

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self, signals: Sequence[str] = SIGNALS):
        self.received: str | None = None
        self._interrupt = False
        self._previous: dict[int, Any] = {}
        self.signals: tuple[str, ...]
        outer = _watching()
        self.signals = outer.signals if outer is not None else tuple(signals)
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) not in (signal.SIG_IGN, None):
                self._previous[signum] = signal.signal(signum, self._handle)
        if outer is not None:
            self.received = outer.received

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received = self.received or name
        if self._interrupt:
            self._interrupt = False  # once: a second signal must not break the unwinding of the first
            raise Preempted(None, name)

    def check(self) -> None:
        """A safe point before the first step: Preempted if a stop signal arrived (nothing saved yet)."""
        if self.received is not None:
            raise Preempted(None, self.received)

    @contextmanager
    def interrupting(self) -> Iterator[None]:
        """Start-up work within which a stop signal ends the run at once (checked on the way in and out)."""
        self.check()
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False
        self.check()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
            if (outer := _stop_signal_of(handler)) is not None:
                outer.received = outer.received or self.received
        self._previous = {}

    def pass_on(self) -> None:
        """restore(), then the signal recorded meanwhile reaches the handler that was there before, as if dali_kd had
        never caught it: a Python handler runs (Python's own for SIGINT raises KeyboardInterrupt), the default
        ends the process by that signal, an outer StopSignal has it already (the command line's own, which makes
        the process exit 75)."""
        previous = dict(self._previous)
        self.restore()
        signum = getattr(signal, self.received or "", None)
        if signum is None or signum not in previous or _stop_signal_of(previous[signum]) is not None:
            return
        for stream in (sys.stdout, sys.stderr):  # what was said before the process may end
            with suppress(Exception):
                stream.flush()
        signal.raise_signal(signum)

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pass_on()


def _stop_signal_of(handler: Any) -> StopSignal | None:
    outer = getattr(handler, "__self__", None)
    return outer if isinstance(outer, StopSignal) else None


def _watching() -> StopSignal | None:
    """The StopSignal whose handler is in place now, if any."""
    for name in ("SIGUSR1", "SIGTERM", "SIGINT"):
        signum = getattr(signal, name, None)
        if signum is not None and (found := _stop_signal_of(signal.getsignal(signum))) is not None:
            return found
    return None


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` wants: <array job>_<task> for an array task, else SLURM_JOB_ID."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and JOB_ID_RE.match(job) else None


def requeue() -> bool:
    """Ask Slurm to requeue this job (rank 0 only). No shell; the id is validated; failures are reported, not fatal."""
    import subprocess  # here, like console: the module loads first of all, before the signal handlers go in

    from dali_kd import console

    job = slurm_job_id()
    if job is None:
        if os.environ.get("SLURM_JOB_ID"):
            console.warning(
                f"warning: not requeueing: unexpected Slurm job id {os.environ['SLURM_JOB_ID']!r}"
            )
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        console.warning(f"warning: scontrol requeue {job} failed: {e}")
        return False
    if result.returncode != 0:
        console.warning(f"warning: scontrol requeue {job} failed: {result.stderr.strip()[:200]}")
        return False
    console.info(f"requeued Slurm job {job}; it will resume from the checkpoint")
    return True
