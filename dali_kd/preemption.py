"""Preemption: SIGUSR1/SIGTERM ask for a checkpoint at the next step boundary, exit 75, and a Slurm requeue."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the job is requeued and resumes by itself
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


def preempt_at_once() -> Callable[[], None]:
    """From the first second of a run until its loop starts (scan, demo, models, compilation), SIGUSR1/SIGTERM
    end it as preempted straight away (exit 75, requeued): there is nothing to save yet, and Slurm's grace time
    (--signal=USR1@90) is shorter than a cold scan. The loop then installs StopSignal, and restores this after.
    Returns a function that puts the previous handlers back."""

    def handle(signum, frame) -> None:
        raise Preempted(None, signal.Signals(signum).name)

    previous = {}
    for name in StopSignal.SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, handle)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


class StopSignal:
    """Installs handlers that only set a flag: the training loop decides when it is safe to stop."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` wants: <array job>_<task> for an array task, else SLURM_JOB_ID."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and JOB_ID_RE.match(job) else None


def requeue() -> bool:
    """Ask Slurm to requeue this job (rank 0 only). No shell; the id is validated; failures are reported, not fatal."""
    job = slurm_job_id()
    if job is None:
        if os.environ.get("SLURM_JOB_ID"):
            print(
                f"warning: not requeueing: unexpected Slurm job id {os.environ['SLURM_JOB_ID']!r}",
                file=sys.stderr,
            )
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"warning: scontrol requeue {job} failed: {e}", file=sys.stderr)
        return False
    if result.returncode != 0:
        print(f"warning: scontrol requeue {job} failed: {result.stderr.strip()[:200]}", file=sys.stderr)
        return False
    print(f"requeued Slurm job {job}; it will resume from the checkpoint", flush=True)
    return True
