"""report.png: a run's metrics rows (and its summary, once finished) drawn as six panels with matplotlib."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from dali_kd.console.losses import TEACHER_LOSS_PARTS, teacher_losses
from dali_kd.io import atomic_write
from dali_kd.telemetry.throughput import is_warmup, run_throughput
from dali_kd.telemetry.verdict import Verdict

STAGE_COLOURS = {"data": "#d62728", "teacher": "#1f77b4", "student": "#2ca02c", "other": "#c7c7c7"}
# The steady state's largest step time times this is the step-time panel's top; a slower warm-up interval is
# marked there with its value instead of squashing the rest into the bottom of the panel.
STEADY_HEADROOM = 1.3
# The height each row of agreement panels (two teachers a row) adds to the figure.
AGREEMENT_ROW_INCHES = 3.6


def series(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The key's values, NaN where a row lacks one or its value is not finite (a gap in the line)."""
    return [r[key] if r.get(key) is not None and math.isfinite(r[key]) else math.nan for r in rows]


def panel_keys(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each panel drawn from the rows, by the key its line needs."""
    use = utilisation_keys(rows)[1][0]
    return {
        "loss": "loss",
        "step time": "step_ms",
        "throughput": "img_per_s",
        "utilisation": use,
        "learning rate": "lr",
    }


def empty_panels(rows: list[dict[str, Any]]) -> list[str]:
    """The panels with nothing to draw, each as `the X panel (no finite 'key')`."""
    return [
        f"the {panel} panel (no finite {key!r})"
        for panel, key in panel_keys(rows).items()
        if not any(math.isfinite(v) for v in series(rows, key))
    ]


def figure(run_name: str, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> Any:
    """The report's figure: loss, step time, throughput, utilisation, accuracy and learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    agreement = agreement_names(summary)
    extra_rows = math.ceil(len(agreement) / 2)
    fig, grid = plt.subplots(
        3 + extra_rows, 2, figsize=(13, 11 + AGREEMENT_ROW_INCHES * extra_rows), constrained_layout=True
    )
    axes, below = grid[:3], grid[3:].flat
    fig.suptitle(figure_title(run_name, rows, summary), fontsize=13)
    plot_loss(axes[0, 0], steps, rows)
    plot_step_time(axes[0, 1], steps, rows)
    plot_throughput(axes[1, 0], steps, rows)
    plot_utilisation(axes[1, 1], steps, rows)
    plot_accuracy(axes[2, 0], steps, summary)
    plot_learning_rate(axes[2, 1], steps, rows)
    for ax, said in zip(axes.flat[[0, 1, 2, 3, 5]], panel_keys(rows).values(), strict=True):
        if not any(math.isfinite(v) for v in series(rows, said)):
            say_on(ax, f"no finite {said!r} in these rows")
    for i, ax in enumerate(below):
        if i < len(agreement):
            plot_agreement(ax, steps, summary or {}, agreement[i])
        else:
            ax.set_axis_off()  # an odd number of teachers leaves the last row's second panel empty
    return fig


def say_on(ax: Any, text: str) -> None:
    """A panel's note in its middle, where a line would have been."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")


def draw(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> Path:
    """Write run_dir/report.png (atomically: a reader never sees half a picture)."""
    import matplotlib.pyplot as plt

    fig = figure(run_dir.name, rows, summary)
    out = run_dir / "report.png"
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return out


def figure_title(run_name: str, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    """The run's name and what bounds it (the summary's verdict, or the last row's on a run in progress)."""
    title = run_name + ("" if summary else " (in progress)")
    verdict = summary_verdict(summary)
    return f"{title} — {verdict.line() if verdict else rows[-1].get('verdict') or 'no stage timing'}"


def summary_verdict(summary: dict[str, Any] | None) -> Verdict | None:
    """The finished run's verdict, where summary.json has it and its three shares."""
    if not summary or not summary.get("verdict"):
        return None
    data, teacher, student = (summary.get(f"{s}_share") for s in ("data", "teacher", "student"))
    if data is None or teacher is None or student is None:
        return None
    return Verdict(summary["verdict"], data, teacher, student)


def plot_loss(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    """The total; with several teachers each teacher's total in its own colour and its parts dashed in the same
    colour; every other loss part as a thin line."""
    ax.plot(steps, series(rows, "loss"), label="loss", color="black", linewidth=2)
    drawn = set()
    for i, key in enumerate(teacher_losses(rows[-1])):
        colour = f"C{i}"
        ax.plot(steps, series(rows, f"loss_{key}"), label=key, color=colour, linewidth=1.5)
        drawn.add(f"loss_{key}")
        for part in TEACHER_LOSS_PARTS:
            name = f"loss_{part}_{key}"
            if name in rows[-1]:
                ax.plot(
                    steps,
                    series(rows, name),
                    label=f"{key} {part}",
                    color=colour,
                    linewidth=1,
                    linestyle="--",
                )
                drawn.add(name)
    for key in sorted(k for k in rows[-1] if k.startswith("loss_") and k not in drawn):
        ax.plot(steps, series(rows, key), label=key.removeprefix("loss_"), linewidth=1)
    ax.set(title="Loss", xlabel="step")
    ax.legend()


def plot_step_time(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    """Stacked by stage where the rows time them; the y-axis fits the steady state, and a warm-up interval
    (compilation) above it is marked at the top with its own value."""
    step_ms = series(rows, "step_ms")
    if rows[-1].get("data_ms") is not None:
        stages = {s: series(rows, f"{s}_ms") for s in ("data", "teacher", "student")}
        stages["other"] = [
            max(0.0, t - sum(stages[s][i] for s in ("data", "teacher", "student")))
            for i, t in enumerate(step_ms)
        ]
        ax.stackplot(steps, *stages.values(), labels=list(stages), colors=[STAGE_COLOURS[s] for s in stages])
        ax.legend(loc="upper right")
    else:
        ax.plot(steps, step_ms, color="black", label="step")
    title = "Step time by stage (ms, mean per interval)"
    steady = [ms for i, (row, ms) in enumerate(zip(rows, step_ms, strict=True)) if not is_warmup(row, i)]
    top = STEADY_HEADROOM * max((ms for ms in steady if math.isfinite(ms)), default=0.0)
    off_scale = [(s, ms) for i, (s, ms, row) in enumerate(zip(steps, step_ms, rows, strict=True)) if
                 is_warmup(row, i) and top and ms > top]  # fmt: skip
    if off_scale:
        ax.set_ylim(0, top)
        for step, ms in off_scale:
            ax.annotate(
                f"↑ {ms:,.0f} ms (warm-up: compilation)", (step, top), xytext=(4, -14),
                textcoords="offset points", fontsize=8, color="#444444",
            )  # fmt: skip
        title += "; warm-up off the scale"
    ax.set(title=title, xlabel="step", ylabel="ms")


def plot_throughput(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    ax.plot(steps, series(rows, "img_per_s"), color="#9467bd", label="each interval")
    run = run_throughput(rows).images_per_sec
    if run is not None:
        ax.axhline(
            run,
            color="#9467bd",
            linestyle="--",
            linewidth=1,
            label=f"run: {run:.1f} img/s (warm-up left out)",
        )
    ax.set(title="Throughput (images/s)", xlabel="step", ylabel="img/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")


def plot_utilisation(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    """Utilisation and memory on twin axes: the GPU's, or the process's own on a CPU run."""
    title, use, memory = utilisation_keys(rows)
    ax.plot(steps, series(rows, use[0]), color="#ff7f0e", label=use[1])
    ax.set(title=title, xlabel="step", ylabel="%")
    ax.set_ylim(bottom=0, top=105 if use[0] == "gpu_util_pct" else None)
    twin = ax.twinx()
    twin.plot(steps, series(rows, memory[0]), color="#8c564b", label=memory[1])
    twin.set_ylabel("MB")
    twin.set_ylim(bottom=0)
    ax.legend(loc="lower left")
    twin.legend(loc="lower right")


def utilisation_keys(rows: list[dict[str, Any]]) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """The utilisation panel's title and (key, label) of its two lines: the GPU's, or the process's own."""
    if any(r.get("gpu_util_pct") is not None for r in rows):
        return "GPU", ("gpu_util_pct", "GPU utilisation %"), ("gpu_mem_used_mb", "memory used (MB)")
    return (
        "No GPU telemetry (CPU run or no NVML): process CPU and memory",
        ("proc_cpu_pct", "process CPU % (100 = one core)"),
        ("proc_rss_mb", "resident memory (MB)"),
    )


def accuracy_label(key: str) -> str:
    """student_knn_top1 → student k-NN, student_ema_head_top1 → EMA head, …_top5 → … top-5, and a teacher's
    with several teachers: teacher_knn_top1_<key> → teacher k-NN (<key>)."""
    per_teacher = re.fullmatch(r"(teacher_(?:knn|head)_top[15])_(.+)", key)
    if per_teacher:
        return f"{accuracy_label(per_teacher[1])} ({per_teacher[2]})"
    words = {"ema": "EMA", "knn": "k-NN", "top1": ""}
    said = " ".join(words.get(part, part.replace("top", "top-")) for part in key.split("_"))
    return said.strip().replace("student EMA", "EMA")


def plot_accuracy(ax: Any, steps: list[int], summary: dict[str, Any] | None) -> None:
    """The student's k-NN and head accuracy at each evaluation, against the teacher's and chance."""
    ax.set(title="Accuracy on the held-out split (%)", xlabel="step", ylabel="%")
    history = (summary or {}).get("knn_history") or []
    if not history:
        say_on(ax, "no evaluation recorded" if summary else "drawn once the run has finished (summary.json)")
        return
    evaluated = [entry["step"] for entry in history]
    names = sorted(
        {k for entry in history for k in entry if k.startswith("student") and entry[k] is not None}
    )
    for name in names:
        values = [float("nan") if entry.get(name) is None else entry[name] for entry in history]
        ax.plot(evaluated, values, marker="o", label=accuracy_label(name))
    for base, style in (("teacher_knn_top1", "--"), ("teacher_head_top1", ":")):
        # One teacher's result, or each teacher's (teacher_knn_top1_<key>) with several.
        for name in sorted(k for k in summary or {} if k == base or k.startswith(f"{base}_")):
            if summary and summary.get(name) is not None:
                ax.axhline(summary[name], linestyle=style, linewidth=1, label=accuracy_label(name),
                           color="black" if name == base else None)  # fmt: skip
    if summary and summary.get("chance_top1") is not None:
        ax.axhline(summary["chance_top1"], color="#999999", linewidth=1, label="chance")
    ax.set_ylim(0, 102)  # a line at 100% stays in sight
    ax.set_xlim(min(steps[0], *evaluated) - 0.5, max(steps[-1], *evaluated) + 0.5)
    ax.legend(loc="best", fontsize=8)


def plot_learning_rate(ax: Any, steps: list[int], rows: list[dict[str, Any]]) -> None:
    ax.plot(steps, series(rows, "lr"), color="#17becf")
    ax.set(title="Learning rate (the last update's, per interval)", xlabel="step", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def agreement_names(summary: dict[str, Any] | None) -> list[str]:
    """The agreement results the evaluations recorded, in the order first seen: `agreement` (one teacher) or
    `agreement_<key>` (one per teacher)."""
    names: list[str] = []
    for entry in (summary or {}).get("knn_history") or []:
        names += [k for k in entry if (k == "agreement" or k.startswith("agreement_")) and k not in names]
    return names


def plot_agreement(ax: Any, steps: list[int], summary: dict[str, Any], name: str) -> None:
    """One teacher's panel: the student's mean cosine agreement with it at each evaluation, its title naming the
    teacher's own k-NN top-1 where it was measured."""
    key = name.removeprefix("agreement").removeprefix("_")
    teacher_knn = summary.get(f"teacher_knn_top1_{key}" if key else "teacher_knn_top1")
    title = f"Agreement with {key or 'the teacher'} (mean cosine, held-out split)"
    if teacher_knn is not None:
        title += f"; its k-NN top-1 {teacher_knn:.1f}%"
    ax.set(title=title, xlabel="step", ylabel="cosine")
    history = [entry for entry in summary.get("knn_history") or [] if entry.get(name) is not None]
    if not history:
        say_on(ax, f"no finite {name!r} in the evaluations")
        return
    values = [entry[name] for entry in history]
    ax.plot([entry["step"] for entry in history], values, marker="o", color="#1f77b4", label=name)
    ax.set_ylim(min(0.0, *values) - 0.05, 1.05)  # 1 (the teacher's own direction) stays in sight
    ax.set_xlim(min(steps[0], history[0]["step"]) - 0.5, max(steps[-1], history[-1]["step"]) + 0.5)
    ax.legend(loc="lower right", fontsize=8)
