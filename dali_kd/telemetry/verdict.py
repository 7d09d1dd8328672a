"""What bounds a run: the input pipeline, the teacher, the student, or nothing in particular — and what to do."""

from __future__ import annotations

from dataclasses import dataclass

# A quarter-plus of the step spent waiting for data is the first thing to fix, whatever else is slow.
INPUT_BOUND_SHARE = 0.25
# A model stage bounds the run when it takes half the step and clearly more than the other model stage.
MODEL_BOUND_SHARE = 0.5
MODEL_BOUND_RATIO = 1.5


@dataclass(frozen=True)
class RunSetup:
    """What a run has switched on and runs on: the advice suggests only what is off and the device can do."""

    device: str = "cpu"  # torch.device.type
    bf16: bool = False  # the precision in force (train.precision auto is bf16 on a GPU, fp32 on the CPU)
    compiled_student: bool = False
    compiled_teacher: bool = False
    teacher_cached: bool = False
    backend: str = "dali"
    local_crops: bool = False

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


def advice(name: str, setup: RunSetup) -> str:
    """What to do about a verdict, given what the run already has (bf16 only on a GPU: on most CPUs bf16 runs
    slower than fp32, and `auto` means fp32 there)."""
    if name == "input-bound":
        return _input_advice(setup)
    if name == "teacher-bound":
        steps = []
        if not setup.teacher_cached and not setup.local_crops:
            also = "" if setup.backend == "dali" else ", with data.backend=dali"
            steps.append(f"cache teacher features (train.cache_teacher_features: true{also})")
        if not setup.compiled_teacher:
            steps.append("compile the teacher (model.teacher.compile: true)")
        if setup.gpu and not setup.bf16:
            steps.append("run in bf16 (train.precision: bf16)")
        steps.append("use a smaller teacher")
        return "the teacher dominates: " + _either(steps)
    if name == "student-bound":
        steps = []
        if not setup.compiled_student:
            # On a CPU the convolutions run in oneDNN either way and the first compile costs about a minute.
            steps.append(
                "compile it (train.compile_student: true)"
                if setup.gpu
                else "compile it for a long run "
                "(train.compile_student: true; its first compile takes about a minute on a CPU)"
            )
        if setup.gpu and not setup.bf16:
            steps.append("run in bf16 (train.precision: bf16)")
        said = "the student's forward/backward dominates: the expected steady state"
        if steps:
            return f"{said}; {_either(steps)} to make it faster"
        have = "compiled, in bf16" if setup.gpu else "compiled"
        return (
            f"{said}, with the student already {have}: a smaller student or a faster device is what is left"
        )
    return "no single stage dominates"


def _input_advice(setup: RunSetup) -> str:
    if setup.backend != "dali":
        where = "on the GPU " if setup.gpu else ""
        steps = [f"decode {where}with DALI (data.backend=dali)", "raise train.num_workers"]
    else:
        steps = ["raise data.dali_threads (one per free core)"]
    return f"the {'GPU' if setup.gpu else 'step'} waits for data: {_either(steps)}"


def _either(steps: list[str]) -> str:
    return steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + " or " + steps[-1]


@dataclass(frozen=True)
class Verdict:
    name: str
    data_share: float
    teacher_share: float
    student_share: float

    def as_dict(self, setup: RunSetup | None = None) -> dict:
        """summary.json's fields; the advice for `setup` (by default a CPU run with nothing switched on)."""
        return {
            "verdict": self.name,
            "data_share": round(self.data_share, 4),
            "teacher_share": round(self.teacher_share, 4),
            "student_share": round(self.student_share, 4),
            "advice": advice(self.name, setup or RunSetup()),
        }

    def line(self) -> str:
        return (
            f"{self.name} (data {100 * self.data_share:.0f}%, teacher {100 * self.teacher_share:.0f}%, "
            f"student {100 * self.student_share:.0f}% of step time)"
        )


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
