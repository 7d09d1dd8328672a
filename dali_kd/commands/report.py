"""`python -m dali_kd.report RUN_DIR`: draw RUN_DIR/report.png from metrics.jsonl and print a short summary.

Works on a finished run and on one still in progress (summary.json not written yet, a half-written last line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dali_kd.commands.cli import CommandLineParser
from dali_kd.errors import UserError
from dali_kd.io import atomic_write
from dali_kd.telemetry.verdict import judge

ROW_KEYS = {"step", "loss", "img_per_s", "step_ms"}  # in every row dali_kd writes; the report reads them
# Also read, where a row has them: null when not measured (no telemetry, no GPU).
MEASURED_KEYS = (
    "data_ms", "teacher_ms", "student_ms", "gpu_util_pct", "gpu_mem_used_mb", "proc_cpu_pct", "proc_rss_mb",
)  # fmt: skip
STAGE_COLOURS = {"data": "#d62728", "teacher": "#1f77b4", "student": "#2ca02c", "other": "#c7c7c7"}


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


def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else r[key] for r in rows]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else None


def text_summary(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    steps = [r["step"] for r in rows]
    lines = [
        f"steps logged: {steps[0]}..{steps[-1]} ({'finished' if summary else 'in progress'})",
        f"loss: {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}",
        f"throughput: {_mean(_series(rows[1:] or rows, 'img_per_s')):.1f} img/s (mean after the first interval)",
    ]
    later = rows[1:] or rows
    data, teacher, student, step = (
        _mean(_series(later, f"{s}_ms")) for s in ("data", "teacher", "student", "step")
    )
    if data is not None and teacher is not None and student is not None and step is not None:
        verdict = judge(data, teacher, student, step)
        lines.append(
            f"step {step:.1f} ms = data {data:.1f} + teacher {teacher:.1f} + student {student:.1f} ms (+ other)"
        )
        lines.append(f"verdict: {verdict.line()}")
    gpu = _mean(_series(later, "gpu_util_pct"))
    if gpu is not None:
        lines.append(
            f"GPU utilisation {gpu:.0f}%, peak memory {max(_series(later, 'gpu_mem_used_mb')):.0f} MB"
        )
    if summary and summary.get("student_knn_top1") is not None:
        lines.append(
            f"k-NN top-1: student {summary['student_knn_top1']:.1f}%, teacher {summary['teacher_knn_top1']:.1f}%"
        )
    return "\n".join(lines)


def draw(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), constrained_layout=True)
    fig.suptitle(figure_title(run_dir, rows, summary), fontsize=13)
    _plot_loss(axes[0, 0], steps, rows)
    _plot_step_time(axes[0, 1], steps, rows)
    _plot_throughput(axes[1, 0], steps, rows)
    _plot_utilisation(axes[1, 1], steps, rows)
    out = run_dir / "report.png"
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return out


def figure_title(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    """The run's name and what bounds it (the summary's verdict, or the last row's on a run in progress)."""
    title = run_dir.name + ("" if summary else " (in progress)")
    if summary and summary.get("verdict"):
        verdict = (
            f"{summary['verdict']} (data {100 * summary['data_share']:.0f}%, teacher "
            f"{100 * summary['teacher_share']:.0f}%, student {100 * summary['student_share']:.0f}% of step time)"
        )
    else:
        verdict = rows[-1].get("verdict") or "no stage timing"
    return f"{title} — {verdict}"


def _plot_loss(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    ax.plot(steps, _series(rows, "loss"), label="loss", color="black", linewidth=2)
    for key in sorted(k for k in rows[-1] if k.startswith("loss_")):
        ax.plot(steps, _series(rows, key), label=key.removeprefix("loss_"), linewidth=1)
    ax.set(title="Loss", xlabel="step")
    ax.legend()


def _plot_step_time(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    if rows[-1].get("data_ms") is not None:
        stages = {s: _series(rows, f"{s}_ms") for s in ("data", "teacher", "student")}
        step_ms = _series(rows, "step_ms")
        stages["other"] = [
            max(0.0, t - sum(stages[s][i] for s in ("data", "teacher", "student")))
            for i, t in enumerate(step_ms)
        ]
        ax.stackplot(steps, *stages.values(), labels=list(stages), colors=[STAGE_COLOURS[s] for s in stages])
        ax.legend(loc="upper right")
    else:
        ax.plot(steps, _series(rows, "step_ms"), color="black", label="step")
    ax.set(title="Step time by stage (ms, mean per interval)", xlabel="step", ylabel="ms")


def _plot_throughput(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    ax.plot(steps, _series(rows, "img_per_s"), color="#9467bd")
    ax.set(title="Throughput (images/s)", xlabel="step", ylabel="img/s")
    ax.set_ylim(bottom=0)


def _plot_utilisation(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    """Utilisation and memory on twin axes: the GPU's, or the process's own on a CPU run."""
    if any(r.get("gpu_util_pct") is not None for r in rows):
        title, use, memory = (
            "GPU",
            ("gpu_util_pct", "GPU utilisation %"),
            ("gpu_mem_used_mb", "memory used (MB)"),
        )
    else:
        title = "No GPU telemetry (CPU run or no NVML): process CPU and memory"
        use, memory = (
            ("proc_cpu_pct", "process CPU % (100 = one core)"),
            ("proc_rss_mb", "resident memory (MB)"),
        )
    ax.plot(steps, _series(rows, use[0]), color="#ff7f0e", label=use[1])
    ax.set(title=title, xlabel="step", ylabel="%")
    ax.set_ylim(bottom=0, top=105 if use[0] == "gpu_util_pct" else None)
    twin = ax.twinx()
    twin.plot(steps, _series(rows, memory[0]), color="#8c564b", label=memory[1])
    twin.set_ylabel("MB")
    twin.set_ylim(bottom=0)
    ax.legend(loc="lower left")
    twin.legend(loc="lower right")


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
