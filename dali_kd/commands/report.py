"""`python -m dali_kd.report RUN_DIR`: draw RUN_DIR/report.png from metrics.jsonl and print a short summary.

Works on a finished run and on one still in progress (summary.json not written yet, a half-written last line).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dali_kd.commands.cli import CommandLineParser
from dali_kd.commands.report_figure import draw, empty_panels, series, summary_verdict
from dali_kd.console.results import teachers_said
from dali_kd.errors import UserError
from dali_kd.telemetry.throughput import is_warmup, run_throughput
from dali_kd.telemetry.verdict import judge

ROW_KEYS = {"step", "loss", "img_per_s", "step_ms"}  # in every row dali_kd writes; the report reads them
# Also read, where a row has them: null when not measured (no telemetry, no GPU); rows of an older dali_kd lack
# images and interval_s.
MEASURED_KEYS = (
    "data_ms", "teacher_ms", "student_ms", "gpu_util_pct", "gpu_mem_used_mb", "proc_cpu_pct", "proc_rss_mb",
    "images", "interval_s", "lr",
)  # fmt: skip
# The largest step the figure's x-axis (floats) still tells apart from the next one.
MAX_STEP = 2**53


@dataclass(frozen=True)
class Metrics:
    """metrics.jsonl's rows that can be drawn, and the rows left out, each said as `line N (why)`."""

    rows: list[dict[str, Any]]
    left_out: list[str]


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir).rows


def read_metrics(run_dir: Path) -> Metrics:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a dali_kd run directory?)")
    rows, left_out = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a live run may be in the middle of writing its last line
        if not isinstance(row, dict) or not row.keys() >= ROW_KEYS:
            missing = sorted(ROW_KEYS - row.keys()) if isinstance(row, dict) else sorted(ROW_KEYS)
            raise UserError(
                f"{path}: not a dali_kd run (line {number} lacks {', '.join(repr(k) for k in missing)})"
            )
        check_numbers(path, number, row)
        if not is_step_number(row["step"]):
            left_out.append(f"line {number} ('step' is {shown(row['step'])}, not a step number)")
            continue
        rows.append({**{k: beyond_float(v) for k, v in row.items()}, "step": int(row["step"])})
    if not rows:
        raise UserError(
            f"{path}: " + (f"no row to draw: {left_out[0]}" if left_out else "no complete rows yet")
        )
    return Metrics(rows, left_out)


def is_step_number(value: float) -> bool:
    """A whole number from 0 to MAX_STEP (1.0 included: another JSON writer may add the point)."""
    return (not isinstance(value, float) or value.is_integer()) and 0 <= value <= MAX_STEP


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_numbers(path: Path, number: int, row: dict[str, Any]) -> None:
    """Every value the report reads is a number (null only where dali_kd writes null: what was not measured)."""
    optional = [k for k in row if k in MEASURED_KEYS or k.startswith("loss_")]
    for key in [*sorted(ROW_KEYS), *optional]:
        value = row[key]
        if not _is_number(value) and not (value is None and key in optional):
            raise UserError(f"{path}: line {number}: {key!r} is {shown(value)}, expected a number")


def shown(value: Any) -> str:
    """A value as the file has it, a long one cut short."""
    said = json.dumps(value)
    return said if len(said) <= 24 else f"{said[:12]}… ({len(said)} characters)"


def beyond_float(value: Any) -> Any:
    """An integer too large for a float (JSON allows one) as the infinity it is to a plot, not an OverflowError."""
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        return math.inf if value > 0 else -math.inf
    return value


class Evaluation(BaseModel):
    """One knn_history entry: its step and its accuracies (null: not measured)."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, float | None]
    step: Annotated[int, Field(ge=0, le=MAX_STEP)]


class SummaryRead(BaseModel):
    """What the report reads from summary.json, so that a damaged one is set aside rather than half drawn."""

    model_config = ConfigDict(extra="allow", strict=True)
    verdict: str | None = None
    advice: str | None = None
    data_share: float | None = None
    teacher_share: float | None = None
    student_share: float | None = None
    data_ms: float | None = None
    teacher_ms: float | None = None
    student_ms: float | None = None
    step_ms: float | None = None
    student_knn_top1: float | None = None
    teacher_knn_top1: float | None = None
    teacher_head_top1: float | None = None
    chance_top1: float | None = None
    knn_history: list[Evaluation] = []


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, None where there is none yet or it is damaged (read_summary_checked says why)."""
    return read_summary_checked(run_dir)[0]


def read_summary_checked(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """summary.json and, where it is left out of the report, why (`summary.json (why)`)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None, None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        SummaryRead.model_validate(summary)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"summary.json ({getattr(e, 'strerror', None) or 'not JSON text'})"
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the file"
        said = "not a JSON object" if error["type"] == "model_type" else error["msg"].lower()
        return None, f"summary.json ({where}: {said})"
    return summary, None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def text_summary(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    steps = [r["step"] for r in rows]
    lines = [
        f"steps logged: {steps[0]}..{steps[-1]} ({'finished' if summary else 'in progress'})",
        f"loss: {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}",
        throughput_line(rows),
    ]
    later = [row for i, row in enumerate(rows) if not is_warmup(row, i)] or rows
    lines += verdict_lines(later, summary)
    gpu = _mean(series(later, "gpu_util_pct"))
    if gpu is not None:
        memory = max((v for v in series(later, "gpu_mem_used_mb") if math.isfinite(v)), default=None)
        lines.append(
            f"GPU utilisation {gpu:.0f}%" + (f", peak memory {memory:.0f} MB" if memory is not None else "")
        )
    teachers = teachers_said(summary, "teacher_knn_top1", "{:.1f}%") if summary else ""
    if summary and summary.get("student_knn_top1") is not None and teachers:
        lines.append(f"k-NN top-1: student {summary['student_knn_top1']:.1f}%, {teachers}")
    agreement = teachers_said(summary, "agreement", "{:.3f}") if summary else ""
    if agreement:
        lines.append(f"agreement with the teacher (mean cosine): {agreement}")
    return "\n".join(lines)


def throughput_line(rows: list[dict[str, Any]]) -> str:
    """The run's img/s as summary.json has it (dali_kd.telemetry.throughput defines both figures)."""
    run = run_throughput(rows)
    steady, overall = run.images_per_sec, run.images_per_sec_overall
    if steady is not None and overall is not None:
        left_out = f"the warm-up interval, with compilation, left out; {overall:.1f} with it"
        return f"throughput: {steady:.1f} img/s ({left_out})"
    if overall is not None:
        return f"throughput: {overall:.1f} img/s (the warm-up interval alone so far, compilation included)"
    if any("interval_s" in row for row in rows):
        return "throughput: not in these rows (no finite images and interval_s)"
    return "throughput: not in these rows (no images and interval_s: written by an older dali_kd)"


def verdict_lines(later: list[dict[str, Any]], summary: dict[str, Any] | None) -> list[str]:
    """The step's breakdown and what bounds it: summary.json's, or, on a run in progress, the rows' so far."""
    verdict = summary_verdict(summary)
    if summary and verdict:
        data, teacher, student, step = (
            summary.get(f"{s}_ms") for s in ("data", "teacher", "student", "step")
        )
        said = f"verdict: {verdict.line()}: {summary.get('advice') or 'no advice recorded'}"
    else:
        data, teacher, student, step = (
            _mean(series(later, f"{s}_ms")) for s in ("data", "teacher", "student", "step")
        )
        if data is None or teacher is None or student is None or step is None:
            return []
        said = f"verdict so far: {judge(data, teacher, student, step).line()}"
    lines = []
    if data is not None and teacher is not None and student is not None and step is not None:
        lines.append(
            f"step {step:.1f} ms = data {data:.1f} + teacher {teacher:.1f} + student {student:.1f} ms (+ other)"
        )
    return [*lines, said]


def main(argv: list[str] | None = None) -> int:
    parser = CommandLineParser(prog="python -m dali_kd.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if not args.run_dir.is_dir():
            raise UserError(f"run directory not found: {args.run_dir}")
        metrics = read_metrics(args.run_dir)
        rows, (summary, problem) = metrics.rows, read_summary_checked(args.run_dir)
        out = draw(args.run_dir, rows, summary)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text_summary(rows, summary))
    not_drawn = [f"metrics.jsonl {line}" for line in metrics.left_out] + empty_panels(rows)
    not_drawn += [problem] if problem else []
    if not_drawn:
        print(f"not drawn: {'; '.join(not_drawn)}")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
