"""`python -m dali_kd.report` on damaged metrics and summaries: it draws what can be drawn, names in one line what
cannot, and exits 0 wherever it wrote report.png (exit 2, one line, only when nothing at all can be drawn)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dali_kd.commands import report
from dali_kd.commands.report_figure import figure

NAN = math.nan
ROW = {
    "step": 1, "epoch": 0, "loss": 0.5, "lr": 1e-3, "img_per_s": 10.0, "step_ms": 5.0, "data_ms": 1.0,
    "teacher_ms": 1.0, "student_ms": 2.0, "gpu_util_pct": 50.0, "gpu_mem_used_mb": 100.0, "proc_cpu_pct": 90.0,
    "proc_rss_mb": 100.0, "images": 8, "interval_s": 1.0, "warmup": False, "loss_kd": 0.4,
}  # fmt: skip


def write_run(run_dir: Path, rows: list[dict], summary: str | None = None) -> Path:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as JSON's NaN
    if summary is not None:
        (run_dir / "summary.json").write_text(summary)
    return run_dir


def run_report(run_dir: Path, capsys) -> tuple[int, list[str], str]:
    code = report.main([str(run_dir)])
    said = capsys.readouterr()
    return code, said.out.splitlines(), said.err


def not_drawn(lines: list[str]) -> str:
    said = [line for line in lines if line.startswith("not drawn: ")]
    assert len(said) == 1, lines
    return said[0]


def test_metrics_whose_floats_are_all_nan_give_a_figure_and_one_line_naming_every_empty_panel(
    tmp_path, capsys
):
    rows = [{k: NAN if isinstance(v, float) else v for k, v in {**ROW, "step": s}.items()} for s in (1, 2, 3)]
    code, lines, err = run_report(write_run(tmp_path / "run", rows), capsys)
    assert code == 0 and not err, err
    assert (tmp_path / "run" / "report.png").is_file()
    line = not_drawn(lines)
    for panel, key in [("loss", "loss"), ("step time", "step_ms"), ("throughput", "img_per_s"),
                       ("utilisation", "gpu_util_pct"), ("learning rate", "lr")]:  # fmt: skip
        assert f"the {panel} panel (no finite {key!r})" in line
    assert "throughput: not in these rows (no finite images and interval_s)" in lines
    axes = figure("run", report.read_rows(tmp_path / "run"), None).axes
    loss = next(ax for ax in axes if ax.get_title() == "Loss")
    assert any("no finite 'loss'" in text.get_text() for text in loss.texts), "the panel says why it is empty"


def test_a_panel_with_some_finite_values_is_drawn_and_not_named(tmp_path, capsys):
    rows = [{**ROW, "step": 1, "loss": NAN, "step_ms": math.inf, "interval_s": NAN}, {**ROW, "step": 2}]
    code, lines, _ = run_report(write_run(tmp_path / "run", rows), capsys)
    assert code == 0
    assert not any(line.startswith("not drawn") for line in lines), lines
    assert "step 5.0 ms = data 1.0 + teacher 1.0 + student 2.0 ms (+ other)" in lines, (
        "inf is not averaged in"
    )
    assert lines[2].startswith("throughput: 8.0 img/s"), (
        "the interval with a NaN time is left out, not the run's"
    )


@pytest.mark.parametrize(
    ("step", "shown"),
    [(1e30, "1e+30"), (-1, "-1"), (2.5, "2.5"), (NAN, "NaN"), (10**400, "100000000000… (401 characters)")],
    ids=["1e30", "negative", "fraction", "nan", "401-digits"],
)
def test_a_row_whose_step_is_not_a_step_number_is_left_out_and_named(tmp_path, capsys, step, shown):
    rows = [{**ROW, "step": 1}, {**ROW, "step": 2}, {**ROW, "step": step}, {**ROW, "step": 3}]
    code, lines, err = run_report(write_run(tmp_path / "run", rows), capsys)
    assert code == 0 and not err, err
    assert not_drawn(lines) == f"not drawn: metrics.jsonl line 3 ('step' is {shown}, not a step number)"
    assert lines[0].startswith("steps logged: 1..3 ")
    axes = figure("run", report.read_rows(tmp_path / "run"), None).axes
    loss = next(ax for ax in axes if ax.get_title() == "Loss")
    assert list(loss.get_lines()[0].get_xdata()) == [1, 2, 3]
    assert loss.get_xlim()[1] < 10, "the other rows are not squashed into one end of the axis"


def test_a_value_too_large_for_a_float_is_drawn_as_a_gap(tmp_path, capsys):
    rows = [{**ROW, "step": 1, "loss": 10**400, "images": 10**400}, {**ROW, "step": 2}]
    code, lines, err = run_report(write_run(tmp_path / "run", rows), capsys)
    assert code == 0 and not err, err
    assert "loss: inf → 0.5000" in lines
    assert lines[2].startswith("throughput: 8.0 img/s"), "the interval with countless images is left out"


def test_metrics_with_no_row_to_draw_are_one_line_and_exit_2(tmp_path, capsys):
    code, lines, err = run_report(write_run(tmp_path / "run", [{**ROW, "step": 1e30}]), capsys)
    assert code == 2 and not lines
    assert err.strip() == (
        f"error: {tmp_path / 'run' / 'metrics.jsonl'}: no row to draw: line 1 ('step' is 1e+30, not a step number)"
    )


SUMMARIES = [  # (summary.json's text, how the not-drawn line names it)
    ("[1]", "summary.json (the file: not a JSON object)"),
    ("{not json", "summary.json (not JSON text)"),
    (
        '{"verdict": "balanced", "data_share": "x"}',
        "summary.json (data_share: input should be a valid number)",
    ),
    ('{"knn_history": [1]}', "summary.json (knn_history.0: not a JSON object)"),
    ('{"knn_history": [{"step": 1e30, "student_knn_top1": 3}]}', "summary.json (knn_history.0.step: input"),
    (
        '{"knn_history": [{"step": 1, "student_knn_top1": "3"}]}',
        "summary.json (knn_history.0.student_knn_top1: ",
    ),
]


@pytest.mark.parametrize(("text", "named"), SUMMARIES, ids=[s[1].split("(")[1][:20] for s in SUMMARIES])
def test_a_damaged_summary_is_left_out_and_named_and_the_rows_are_drawn(tmp_path, capsys, text, named):
    code, lines, err = run_report(write_run(tmp_path / "run", [ROW, {**ROW, "step": 2}], text), capsys)
    assert code == 0 and not err, err
    assert not_drawn(lines).startswith(f"not drawn: {named}")
    assert "(in progress)" in lines[0]


def test_a_summary_with_a_verdict_but_no_shares_or_only_the_students_accuracy_is_drawn(tmp_path, capsys):
    summary = json.dumps({"verdict": "balanced", "student_knn_top1": 40.0, "knn_history": []})
    code, lines, err = run_report(write_run(tmp_path / "run", [ROW, {**ROW, "step": 2}], summary), capsys)
    assert code == 0 and not err, err
    assert "(finished)" in lines[0]
    assert not any(line.startswith(("not drawn", "k-NN")) for line in lines), lines
