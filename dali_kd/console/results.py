"""Evaluation results as words: what each result is called in the lines a run prints (percentages, and the
student's agreement with each teacher, a mean cosine)."""

from __future__ import annotations

from typing import Any

# What eval_line calls each result (all of them percentages); a result it does not know is named by its key.
EVAL_NAMES = {
    "student_knn_top1": "student k-NN top-1",
    "student_head_top1": "head top-1",
    "student_ema_knn_top1": "EMA k-NN top-1",
    "student_ema_head_top1": "EMA head top-1",
    "teacher_knn_top1": "teacher k-NN top-1",
    "teacher_head_top1": "head top-1",
    "student_knn_top5": "k-NN top-5",
    "student_head_top5": "head top-5",
    "student_ema_knn_top5": "EMA k-NN top-5",
    "student_ema_head_top5": "EMA head top-5",
    "teacher_knn_top5": "k-NN top-5",
    "teacher_head_top5": "head top-5",
}


def eval_line(epoch: int | None, results: dict[str, float | None]) -> str:
    """One evaluation's results (percentages, the agreement a mean cosine; None: not measured) as one line, e.g.
    `epoch 3: student k-NN top-1 41.2%, head top-1 47.0%, EMA k-NN top-1 42.5%, EMA head top-1 48.1%`
    (epoch None: the teacher's, before training)."""
    said = [result_said(name, value) for name, value in results.items() if value is not None]
    return ", ".join(said) if epoch is None else f"epoch {epoch}: {', '.join(said)}"


def result_said(name: str, value: float) -> str:
    """One evaluation result in words: a percentage, or the agreement with a teacher (a mean cosine, not a
    percentage); a result named per teacher (`<name>_<key>`) says the teacher's key."""
    if name == "agreement" or name.startswith("agreement_"):
        return f"agreement with {name[len('agreement_') :] or 'the teacher'} {value:.3f}"
    base = next((b for b in EVAL_NAMES if name.startswith(f"{b}_")), None)
    if base is not None:
        return f"{EVAL_NAMES[base]} ({name.removeprefix(f'{base}_')}) {value:.1f}%"
    return f"{EVAL_NAMES.get(name, name)} {value:.1f}%"


def teachers_said(summary: dict[str, Any], name: str, form: str) -> str:
    """A result of the teacher (or of the student against it) as `teacher 61.2%`, or with several teachers each
    one's (`name_<key>`) as `teacher resnet14t 61.2%, teacher convnext_atto 70.3%`; "" where none was measured."""
    said = "teacher " if name.startswith("teacher") else ""
    if summary.get(name) is not None:
        return f"{said}{form.format(summary[name])}"
    each = [(k.removeprefix(f"{name}_"), v) for k, v in summary.items() if k.startswith(f"{name}_")]
    return ", ".join(f"{said}{key} {form.format(value)}" for key, value in each if value is not None)
