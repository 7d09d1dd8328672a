"""What bounds a run: the input pipeline, the teacher, the student, or nothing in particular — and what to do."""

from __future__ import annotations

from dataclasses import dataclass

# A quarter-plus of the step spent waiting for data is the first thing to fix, whatever else is slow.
INPUT_BOUND_SHARE = 0.25
# A model stage bounds the run when it takes half the step and clearly more than the other model stage.
MODEL_BOUND_SHARE = 0.5
MODEL_BOUND_RATIO = 1.5

ADVICE = {
    "input-bound": "the GPU waits for data: decode on the GPU (data.backend=dali with --device cuda), raise "
    "data.dali_threads, or cache teacher features",
    "teacher-bound": "the teacher dominates: cache teacher features (train.cache_teacher_features), or use a "
    "smaller/bf16 teacher",
    "student-bound": "the student's forward/backward dominates: this is the expected steady state; "
    "train.compile_student and bf16 (train.precision) make it faster",
    "balanced": "no single stage dominates",
}


@dataclass(frozen=True)
class Verdict:
    name: str
    data_share: float
    teacher_share: float
    student_share: float

    @property
    def advice(self) -> str:
        return ADVICE[self.name]

    def as_dict(self) -> dict:
        return {
            "verdict": self.name,
            "data_share": round(self.data_share, 4),
            "teacher_share": round(self.teacher_share, 4),
            "student_share": round(self.student_share, 4),
            "advice": self.advice,
        }

    def line(self, advice: bool = True) -> str:
        shares = (
            f"{self.name} (data {100 * self.data_share:.0f}%, teacher {100 * self.teacher_share:.0f}%, "
            f"student {100 * self.student_share:.0f}% of step time)"
        )
        return f"{shares}: {self.advice}" if advice else shares


def judge(data_ms: float, teacher_ms: float, student_ms: float, step_ms: float) -> Verdict:
    """Classify one interval from its mean stage times (ms) and mean step time (ms)."""
    step_ms = max(step_ms, data_ms + teacher_ms + student_ms, 1e-9)
    data, teacher, student = data_ms / step_ms, teacher_ms / step_ms, student_ms / step_ms
    if data >= INPUT_BOUND_SHARE:
        name = "input-bound"
    elif teacher >= MODEL_BOUND_SHARE and teacher >= MODEL_BOUND_RATIO * student:
        name = "teacher-bound"
    elif student >= MODEL_BOUND_SHARE and student >= MODEL_BOUND_RATIO * teacher:
        name = "student-bound"
    else:
        name = "balanced"
    return Verdict(name, data, teacher, student)
