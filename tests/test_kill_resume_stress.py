"""Two gloo ranks killed at chosen moments and resumed with `--resume auto` (tests/drivers/stress_kill_resume.py, whose
`--tries 20 --busy 2` run is the long version): each resumed run finishes and matches the uninterrupted run bit for
bit, and no rank of a killed job trains on after its launcher is gone."""

from __future__ import annotations

import pytest

from tests.drivers.stress_kill_resume import Try, failure_logs, stress


@pytest.mark.slow
def test_killed_two_rank_runs_resume_bit_exact(tmp_path):
    attempts = [
        # torchrun alone SIGKILLed (`kill -9 PID`, `timeout -s KILL`): its ranks, in sessions of their own, must
        # end with it, not finish the run on their own while the user resumes it.
        Try(0, "launcher-at-step", step=3),
        # The same while the ranks start up: they must not join the rendezvous of the resumed run on the same port.
        Try(1, "launcher-at-start"),
        # Rank 1 SIGKILLed while rank 0 writes the epoch-end checkpoint.
        Try(2, "waiter-mid-ckpt", step=4),
    ]
    outcomes = stress(tmp_path, tries=0, attempts=attempts, port=29640, say=lambda line: None)
    for outcome in outcomes:
        assert outcome.problem is None, f"{outcome.line(len(attempts))}\n{failure_logs(outcome, 3000)}"
    assert len(outcomes) == len(attempts)
