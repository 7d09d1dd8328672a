"""`python -m dali_kd.report RUN_DIR`: draw RUN_DIR/report.png from metrics.jsonl and print a short summary.

Works on a finished run and on one still in progress (summary.json not written yet, a half-written last line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dali_kd.commands.cli import CommandLineParser
from dali_kd.commands.report_figure import draw, series
from dali_kd.errors import UserError
from dali_kd.telemetry.throughput import is_warmup, run_throughput
from dali_kd.telemetry.verdict import Verdict, judge

ROW_KEYS = {"step", "loss", "img_per_s", "step_ms"}  # in every row dali_kd writes; the report reads them
# Also read, where a row has them: null when not measured (no telemetry, no GPU); rows of an older dali_kd lack
# images and interval_s.
MEASURED_KEYS = (
    "data_ms", "teacher_ms", "student_ms", "gpu_util_pct", "gpu_mem_used_mb", "proc_cpu_pct", "proc_rss_mb",
    "images", "interval_s", "lr",
)  # fmt: skip


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a dali_kd run directory?)")
    rows = []
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
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no complete rows yet")
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_numbers(path: Path, number: int, row: dict[str, Any]) -> None:
    """Every value the report reads is a number (null only where dali_kd writes null: what was not measured)."""
    optional = [k for k in row if k in MEASURED_KEYS or k.startswith("loss_")]
    for key in [*sorted(ROW_KEYS), *optional]:
        value = row[key]
        if not _is_number(value) and not (value is None and key in optional):
            raise UserError(f"{path}: line {number}: {key!r} is {json.dumps(value)}, expected a number")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]
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
        lines.append(
            f"GPU utilisation {gpu:.0f}%, peak memory {max(series(later, 'gpu_mem_used_mb')):.0f} MB"
        )
    if summary and summary.get("student_knn_top1") is not None:
        lines.append(
            f"k-NN top-1: student {summary['student_knn_top1']:.1f}%, teacher {summary['teacher_knn_top1']:.1f}%"
        )
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
    return "throughput: not in these rows (no images and interval_s: written by an older dali_kd)"


def verdict_lines(later: list[dict[str, Any]], summary: dict[str, Any] | None) -> list[str]:
    """The step's breakdown and what bounds it: summary.json's, or, on a run in progress, the rows' so far."""
    if summary and summary.get("verdict"):
        data, teacher, student, step = (
            summary.get(f"{s}_ms") for s in ("data", "teacher", "student", "step")
        )
        verdict = Verdict(
            summary["verdict"], summary["data_share"], summary["teacher_share"], summary["student_share"]
        )
        said = f"verdict: {verdict.line()}: {summary['advice']}"
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
        rows = read_rows(args.run_dir)
        summary = read_summary(args.run_dir)
        out = draw(args.run_dir, rows, summary)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text_summary(rows, summary))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
