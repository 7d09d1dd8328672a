"""Where a run stands: its counters and results, as one typed state that a checkpoint carries whole."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class RunState:
    """Every counter the loop keeps, set at construction; `state_dict`/`load_state_dict` for checkpoints.

    train_s counts training only (evaluation and checkpoints excluded); wall_s everything, carried over resumes.
    """

    step: int = 0  # optimizer steps taken (the next step is step + 1)
    epoch: int = 0  # step-capped epochs completed
    step_in_epoch: int = 0
    final_loss: float = math.nan  # the last logged interval's mean loss
    # Evaluation results (top-1 and top-5 %): k-NN on the pooled embedding, and through the classifier head where
    # it has the data's classes; the teacher's once at the start, the student's (and its EMA's) at the last
    # evaluation. Top-5 is None with fewer than 5 classes.
    teacher_knn_top1: float | None = None
    teacher_head_top1: float | None = None
    student_knn_top1: float | None = None
    student_head_top1: float | None = None
    student_ema_knn_top1: float | None = None
    student_ema_head_top1: float | None = None
    teacher_knn_top5: float | None = None
    teacher_head_top5: float | None = None
    student_knn_top5: float | None = None
    student_head_top5: float | None = None
    student_ema_knn_top5: float | None = None
    student_ema_head_top5: float | None = None
    # Results by name that not every run has: each teacher's (teacher_knn_top1_<key>, ...) with several teachers,
    # and the student's agreement with each teacher (agreement, or agreement_<key>).
    named_results: dict[str, float | None] = field(default_factory=dict)
    knn_history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation's results
    train_s: float = 0.0
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        # Clock marks of this process (never saved): when the wall clock and the training clock last started.
        self._wall_mark: float | None = None
        self._train_mark: float | None = None

    def state_dict(self) -> dict[str, Any]:
        self.update_wall()
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the keys this state knows (a checkpoint's progress dict also holds other parts' counters)."""
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, copy.deepcopy(state[f.name]))

    def record(self, name: str, value: float | None) -> None:
        """An evaluation result: into its own field where it has one, else into named_results."""
        if name in {f.name for f in fields(self)}:
            setattr(self, name, value)
        else:
            self.named_results[name] = value

    def result(self, name: str) -> float | None:
        return getattr(self, name) if name in {f.name for f in fields(self)} else self.named_results.get(name)

    # ---- clocks -------------------------------------------------------------------------------------------------
    def start_clocks(self) -> None:
        self._wall_mark = time.perf_counter()

    def update_wall(self) -> None:
        if self._wall_mark is not None:
            now = time.perf_counter()
            self.wall_s += now - self._wall_mark
            self._wall_mark = now

    def resume_training_clock(self) -> None:
        self._train_mark = time.perf_counter()

    def training_seconds(self) -> float:
        """train_s with the running stretch counted up to now (the clock that metrics rows are timed on)."""
        running = time.perf_counter() - self._train_mark if self._train_mark is not None else 0.0
        return self.train_s + running

    def pause_training_clock(self) -> bool:
        """Add the training time since the last resume; True if the clock was running."""
        if self._train_mark is None:
            return False
        self.train_s += time.perf_counter() - self._train_mark
        self._train_mark = None
        return True
