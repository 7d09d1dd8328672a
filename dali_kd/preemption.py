"""Preemption: SIGUSR1/SIGTERM ask for a checkpoint at the next step boundary, exit 75, and a Slurm requeue."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the job is requeued and resumes by itself
JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")


class Preempted(Exception):
    """Raised by the trainer after it has saved a checkpoint because a stop signal arrived."""

    def __init__(self, checkpoint, signal_name: str):
        super().__init__(f"{signal_name} received: checkpoint saved to {checkpoint}")
        self.checkpoint = checkpoint


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
