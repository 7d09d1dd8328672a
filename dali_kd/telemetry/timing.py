"""Per-stage step timing without stalling the GPU: CUDA events on GPU (read at log steps only), perf_counter on CPU.

A step is marked at its start, when the batch is in hand ("data"), after the teacher ("teacher") and after the
optimizer step ("student"); a step of several batches (gradient accumulation) marks the three stages per batch, and
each stage's time is its sum over them. On the GPU the events sit in the compute stream, so "data" measures the time the GPU
sat idle waiting for the input — the real stall — not host time that overlapped with earlier GPU work. The stage
sum therefore never exceeds the step's wall time. A stage can be split further (`split(name)`: several teachers' time,
each teacher's as `teacher_ms_<key>`); a split's time is also its stage's.
"""

from __future__ import annotations

import time

import torch

STAGES = ("data", "teacher", "student")


class StepTimer:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.cuda = device.type == "cuda" and enabled
        self._current: list = []
        self._pending: list[list] = []
        # Per step: (index in _current of the stamp that ends the split, its name).
        self._splits: list[tuple[int, str]] = []
        self._pending_splits: list[list[tuple[int, str]]] = []

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start_step(self) -> None:
        if self.enabled:
            self._current = [self._stamp()]
            self._splits = []

    def mark(self) -> None:
        """Mark the end of the next stage, in STAGES order."""
        if self.enabled:
            self._current.append(self._stamp())

    def split(self, name: str) -> None:
        """Mark the end of a named part of the stage under way (its time since the last mark or split)."""
        if self.enabled:
            self._current.append(self._stamp())
            self._splits.append((len(self._current) - 1, name))

    def end_step(self) -> None:
        marks = len(self._current) - 1 - len(self._splits)
        if self.enabled and marks > 0 and marks % len(STAGES) == 0:
            self._pending.append(self._current)
            self._pending_splits.append(self._splits)
        self._current = []
        self._splits = []

    def collect(self) -> dict[str, float | None]:
        """Mean milliseconds per stage over the steps since the last collect: `data_ms`, `teacher_ms`, `student_ms`.

        On the GPU this waits for the last recorded event — call it only at log steps.
        """
        pending, self._pending = self._pending, []
        all_splits, self._pending_splits = self._pending_splits, []
        if not pending:
            return {f"{stage}_ms": None for stage in STAGES}
        if self.cuda:
            pending[-1][-1].synchronize()
            elapsed = [
                [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)] for marks in pending
            ]
        else:
            elapsed = [[1000 * (b - a) for a, b in zip(marks, marks[1:], strict=False)] for marks in pending]
        totals = dict.fromkeys((f"{stage}_ms" for stage in STAGES), 0.0)
        for step, splits in zip(elapsed, all_splits, strict=True):
            ends_split = dict(splits)
            stage = 0  # the stage each interval belongs to: a split's interval is part of the stage under way
            for end, ms in enumerate(step, start=1):
                totals[f"{STAGES[stage % len(STAGES)]}_ms"] += ms
                if end in ends_split:
                    totals[ends_split[end]] = totals.get(ends_split[end], 0.0) + ms
                else:
                    stage += 1
        return {name: total / len(elapsed) for name, total in totals.items()}
