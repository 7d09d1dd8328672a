"""A measured training step split into data / teacher / student / optimizer / rest, each part beside its floor.

The trainer's telemetry times three stages per step (data, teacher, student: see dali_kd.telemetry.timing); the
student stage ends after the optimiser step. OptimizerClock times the optimiser step apart through torch's public
optimiser hooks (CUDA events on the GPU, read at log steps only, like the trainer's own), so the split needs no
change to the trainer: student = its forward + backward + clip (+ EMA), optimizer = the step itself, rest = the
step's wall time that no stage covers (Python between steps, logging, waiting for the host).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from dali_kd.training.callbacks import Callback


class OptimizerClock(Callback):
    """Mean optimiser-step ms per log interval, keyed by the interval's last step (`by_step`)."""

    def __init__(self):
        self.by_step: dict[int, float] = {}
        self._pending: list[list] = []
        self._hooked: Any = None
        self._cuda = False

    def _stamp(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_step(self, trainer, batch) -> None:
        if self._hooked is not trainer.parts.optimizer:
            self._cuda = trainer.device.type == "cuda"
            trainer.parts.optimizer.register_step_pre_hook(lambda *_: self._pending.append([self._stamp()]))
            trainer.parts.optimizer.register_step_post_hook(
                lambda *_: self._pending[-1].append(self._stamp())
            )
            self._hooked = trainer.parts.optimizer

    def on_log(self, trainer, row: dict[str, Any]) -> None:
        pending, self._pending = [p for p in self._pending if len(p) == 2], []
        if not pending:
            return
        if self._cuda:
            pending[-1][1].synchronize()
            ms = [a.elapsed_time(b) for a, b in pending]
        else:
            ms = [1000 * (b - a) for a, b in pending]
        self.by_step[row["step"]] = sum(ms) / len(ms)

    def mean_over(self, steps: list[int]) -> float | None:
        values = [self.by_step[s] for s in steps if s in self.by_step]
        return statistics.mean(values) if values else None


def split(result: dict[str, Any], floor: dict[str, Any] | None, with_teacher: bool) -> dict[str, Any]:
    """A result row's step in parts (ms), and with a floor each part and the step as a multiple of it.

    with_teacher: the step runs the teacher (its floor is the whole step's); else (cache replay, student-only)
    the floor is the student's alone. student_ms here excludes the optimiser when it was timed apart."""
    optimizer = result.get("optimizer_ms")
    student_total = result.get("student_ms")
    parts = {
        "data_ms": result.get("data_ms"),
        "teacher_ms": result.get("teacher_ms"),
        "student_ms": None if student_total is None else student_total - (optimizer or 0.0),
        "optimizer_ms": optimizer,
    }
    known = [v for v in (parts["data_ms"], parts["teacher_ms"], student_total) if v is not None]
    parts["rest_ms"] = result["step_ms"] - sum(known) if len(known) == 3 else None
    out: dict[str, Any] = {"parts_ms": parts, "optimizer_timed_apart": optimizer is not None}
    if floor is None:
        return out
    floor_step = floor["step_ms"] if with_teacher else floor["student_ms"]
    student_floor = floor["student_ms"] - floor["optimizer_ms"]

    def ratio(value: float | None, base: float) -> float | None:
        return None if value is None or base <= 0 else value / base

    out["vs_floor"] = {
        "step": ratio(result["step_ms"], floor_step),
        "teacher": ratio(parts["teacher_ms"], floor["teacher_ms"]) if with_teacher else None,
        "student": ratio(parts["student_ms"], student_floor),
        "optimizer": ratio(optimizer, floor["optimizer_ms"]),
        "floor_step_ms": floor_step,
    }
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    """One line per result with its split: ms, and × its floor where there is one."""
    lines = [
        "| mode | step ms (× floor) | data ms | teacher ms (× floor) | student fwd+bwd ms (× floor) | "
        "optimizer ms (× floor) | rest ms |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(ms: float | None, times: float | None = None) -> str:
        if ms is None:
            return "—"
        return f"{ms:.1f}" + (f" ({times:.2f}×)" if times is not None else "")

    for r in results:
        if "split" not in r:
            continue
        parts, vs = r["split"]["parts_ms"], r["split"].get("vs_floor", {})
        lines.append(
            f"| {r['backend']} | {cell(r['step_ms'], vs.get('step'))} | {cell(parts['data_ms'])} | "
            f"{cell(parts['teacher_ms'], vs.get('teacher'))} | {cell(parts['student_ms'], vs.get('student'))} | "
            f"{cell(parts['optimizer_ms'], vs.get('optimizer'))} | {cell(parts['rest_ms'])} |"
        )
    return "\n".join(lines)
