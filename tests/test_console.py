"""How a run talks: plain lines off a terminal (Slurm, nohup, | tee), a bar on one, --quiet, and train.log."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch

from dali_kd import console
from dali_kd.commands.train import main
from dali_kd.config import DEMO_CONFIG_DIR
from dali_kd.console import Console, choose_mode, eval_line, interval_line
from dali_kd.errors import UserError
from dali_kd.training.callbacks import Callback
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")
# One interval's line as a log file shows it: step, epoch, loss, img/s, data/step ms, verdict.
INTERVAL = re.compile(
    r"step (\d+)/(\d+) epoch 1/1 loss \d+\.\d{4} \| \d+ img/s \| data \d+\.\d ms / step \d+\.\d ms \| "
    r"(input-bound|teacher-bound|student-bound|balanced)"
)
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


class Terminal(io.StringIO):
    """What a terminal looks like to the console: a stream whose isatty() is True."""

    def isatty(self) -> bool:
        return True


def cli_args(image_tree: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data_config", str(DEMO_CONFIG_DIR / "data_config.yaml"), "--device", "cpu",
        f"data.root={image_tree / 'train'}", f"data.val_root={image_tree / 'val'}", "data.image_size=32",
        "data.eval_resize=36", "data.dali_threads=1", "model.teacher.name=test_resnet",
        "model.teacher.checkpoint=null", "model.teacher.num_classes=4", "model.student.name=test_vit",
        "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=3", "train.compile_student=false",
        "train.log_every_n_steps=1", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=talk", *extra,
    ]  # fmt: skip


def log_lines(run_dir: Path) -> list[str]:
    """train.log's lines without their time stamps (every line has one)."""
    lines = (run_dir / "train.log").read_text().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    return [STAMP.sub("", line, count=1) for line in lines]


def test_off_a_terminal_a_run_prints_plain_lines_and_train_log_keeps_them(image_tree, tmp_path, capsys):
    assert main(cli_args(image_tree, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "\r" not in out, "no carriage-return bar in a log file"
    lines = out.splitlines()
    intervals = [m for line in lines if (m := INTERVAL.fullmatch(line))]
    assert [(m[1], m[2]) for m in intervals] == [("1", "3"), ("2", "3"), ("3", "3")], out
    assert any(line.startswith("epoch 1: student k-NN top-1 ") for line in lines), out
    assert lines[-1].startswith("3 steps in "), "the final summary comes last"
    assert log_lines(tmp_path / "runs" / "talk") == lines, "train.log holds what the terminal got"


def test_train_log_gets_every_line_the_library_says_warnings_and_the_lr_line_included(
    image_tree, tmp_path, capsys
):
    args = cli_args(
        image_tree, tmp_path, "train.optimizer.lr=0.001", "train.optimizer.lr_scale_batch=4",
        "train.cache_teacher_features=true", "train.cache_mode=fixed", "train.cache_probe_every_n_steps=null",
        f"train.teacher_feature_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "lr 0.002: train.optimizer.lr 0.001 scaled (linear) from a batch of 4 to 8" in lines
    fixed = [line for line in lines if "train.cache_mode=fixed" in line]
    assert len(fixed) == 1 and fixed[0].startswith("warning: train.cache_mode=fixed: the student sees"), lines
    assert "cache_mode=fixed" not in captured.err, (
        "said once, as a line of the run, not as a Python warning too"
    )
    assert log_lines(tmp_path / "runs" / "talk") == lines, "train.log holds what the terminal got"


def test_ranks_other_than_0_say_only_their_warnings_and_keep_no_train_log(tmp_path, capsys):
    with Console("plain", rank=1) as out:
        console.info("data: 3 files set aside")
        console.summary("3 steps in 4 s")
        console.warning("warning: non-finite loss at step 2: step skipped (1 so far)")
        out.keep_log_in(tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "warning: non-finite loss at step 2: step skipped (1 so far)"
    ]
    assert not (tmp_path / "train.log").exists()


def test_quiet_prints_only_the_final_summary_and_train_log_keeps_everything(image_tree, tmp_path, capsys):
    assert main(cli_args(image_tree, tmp_path, "--quiet")) == 0
    captured = capsys.readouterr()
    run_dir = tmp_path / "runs" / "talk"
    lines = captured.out.splitlines()
    assert len(lines) == 3, captured.out
    assert re.fullmatch(r"student k-NN top-1 \d+\.\d% \(teacher \d+\.\d%, chance 25\.0%\)", lines[0])
    # The student's head has the data's 4 classes: its top-1 is reported too.
    assert re.fullmatch(r"student head top-1 \d+\.\d% \(teacher \d+\.\d%\)", lines[1])
    assert re.fullmatch(rf"3 steps in \d+ s; run directory: {re.escape(str(run_dir))}", lines[2])
    kept = log_lines(run_dir)
    assert kept[0].startswith("cpu: ") and kept[1].startswith("data: "), (
        "lines said before the run directory existed are kept too"
    )
    assert f"run directory: {run_dir}" in kept
    assert sum(bool(INTERVAL.fullmatch(line)) for line in kept) == 3
    assert kept[-3:] == lines


class Fails(Callback):
    def on_step(self, trainer, batch):
        if trainer.step == 1:
            raise UserError("the disk went away")


def test_an_error_goes_to_stderr_and_ends_train_log(image_tree, tmp_path, capsys):
    assert main(cli_args(image_tree, tmp_path, "--quiet"), callbacks=[Fails()]) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "quiet: no summary for a run that failed"
    assert captured.err.splitlines() == ["error: the disk went away"]
    kept = log_lines(tmp_path / "runs" / "talk")
    assert INTERVAL.fullmatch(kept[-2]) and kept[-1] == "error: the disk went away"


def test_a_resumed_run_appends_to_train_log(image_tree, tmp_path, capsys):
    assert main(cli_args(image_tree, tmp_path, "train.save_every_n_steps=1")) == 0
    run_dir = tmp_path / "runs" / "talk"
    first = log_lines(run_dir)
    checkpoint = run_dir / "checkpoints" / "step_000000002.pt"
    assert main(cli_args(image_tree, tmp_path, f"--resume={checkpoint}")) == 0
    both = log_lines(run_dir)
    assert both[: len(first)] == first, "the first run's lines stay"
    again = both[len(first) :]
    assert any(line.endswith(f"; resuming from {checkpoint} at step 2") for line in again), again
    assert [m[1] for line in again if (m := INTERVAL.fullmatch(line))] == ["3"]


def test_a_full_disk_under_train_log_warns_once_and_training_goes_on(image_tree, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "talk"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").symlink_to("/dev/full")  # every write: "No space left on device"
    assert main(cli_args(image_tree, tmp_path)) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "train.log" in line]
    assert warnings == [
        f"warning: cannot write {run_dir / 'train.log'}: no space left on device; training goes on without "
        "train.log"
    ]
    assert "3 steps in " in out.splitlines()[-1]
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 3


def test_the_mode_follows_the_terminal_unless_a_flag_says_otherwise():
    terminal, log_file = Terminal(), io.StringIO()
    assert choose_mode(stream=terminal) == "tty"
    assert choose_mode(stream=log_file) == "plain"
    assert choose_mode(no_progress=True, stream=terminal) == "plain"
    assert choose_mode(quiet=True, stream=terminal) == "quiet"
    assert choose_mode(quiet=True, no_progress=True, stream=log_file) == "quiet"


def test_a_terminal_keeps_the_bar_with_messages_above_it(tiny_config, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Console(choose_mode(), train_log=True) as out:
        trainer = Trainer(tiny_config("train.epochs=1"), CPU)  # show_progress defaults to True
        out.keep_log_in(run_dir)
        trainer.fit(run_dir)
    shown = terminal.getvalue()
    assert "\rdistill: " in shown and "3/3" in shown and "loss=" in shown, "the bar, its postfix"
    assert "epoch 1: student k-NN top-1 " in shown
    assert "step 1/3 epoch" not in shown, "on a terminal the bar shows the interval"
    assert sum(bool(INTERVAL.fullmatch(line)) for line in log_lines(run_dir)) == 3


def test_a_trainer_without_progress_keeps_the_terminal_free_of_intervals(tiny_config, tmp_path, capsys):
    Trainer(tiny_config("train.epochs=1"), CPU, show_progress=False).fit(tmp_path / "run")
    out = capsys.readouterr().out
    assert "epoch 1: student k-NN top-1" in out and "step 1/3" not in out and "\r" not in out


@pytest.mark.parametrize(
    ("row", "line"),
    [
        (
            {"step": 7, "epoch": 1, "loss": 0.5, "img_per_s": 812.4, "step_ms": 78.84, "data_ms": 3.14,
             "gpu_util_pct": 97.2, "verdict": "student-bound"},
            "step 7/20 epoch 2/2 loss 0.5000 | 812 img/s | data 3.1 ms / step 78.8 ms | gpu 97% | student-bound",
        ),
        # train.telemetry: false: no stage times, no verdict.
        (
            {"step": 7, "epoch": 1, "loss": 0.5, "img_per_s": 812.4, "step_ms": 78.84, "data_ms": None,
             "gpu_util_pct": None, "verdict": None},
            "step 7/20 epoch 2/2 loss 0.5000 | 812 img/s | step 78.8 ms",
        ),
    ],
)  # fmt: skip
def test_an_interval_line_says_what_the_row_has(row, line):
    assert interval_line(row, total_steps=20, num_epochs=2) == line


def test_an_eval_line_names_each_result():
    assert eval_line(3, {"student_knn_top1": 41.23}) == "epoch 3: student k-NN top-1 41.2%"
    assert eval_line(3, {"student_knn_top1": 41.23, "head_top1": None, "ema_top1": 40.0}) == (
        "epoch 3: student k-NN top-1 41.2%, ema_top1 40.0%"
    )


class OnStep(Callback):
    def __init__(self, act):
        self.act = act

    def on_step(self, trainer, batch) -> None:
        self.act(trainer.step)


def test_other_packages_warnings_become_run_lines_in_train_log_never_raw_through_the_bar(
    tiny_config, tmp_path, monkeypatch, capsys
):
    """torch logs `No CUDA runtime is found, using CUDA_HOME=...` through its own stderr handler at the first
    compiled step on a CPU; a library's warnings.warn goes to stderr too. On a terminal both would cut the bar."""
    import logging
    import warnings

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    torch_handlers = list(logging.getLogger("torch").handlers)
    said = "No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'"

    def at_step(step: int) -> None:
        if step == 1:  # the step before the first, as torch.compile does it
            logging.getLogger("torch.utils.cpp_extension").warning(said)
            warnings.warn("a library's caveat", UserWarning, stacklevel=1)
            # A library logger with no handler anywhere: Python's handler of last resort would print it.
            logging.getLogger("some_library").warning("a library's own log line")

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as outside pytest: no root handler

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Console(choose_mode(), train_log=True) as out:
        trainer = Trainer(tiny_config("train.epochs=1"), CPU, callbacks=[OnStep(at_step)])
        out.keep_log_in(run_dir)
        trainer.fit(run_dir)
    logged = log_lines(run_dir)
    assert f"warning: torch.utils.cpp_extension: {said}" in logged
    assert any(line.startswith("warning: UserWarning (") and "a library's caveat" in line for line in logged)
    assert "warning: some_library: a library's own log line" in logged
    shown, errors = terminal.getvalue(), capsys.readouterr().err
    assert said not in errors and "a library's" not in errors, "nothing on stderr, under the bar"
    # On the terminal: the same line, written above the bar (a line of its own), not into it.
    assert f"\nwarning: torch.utils.cpp_extension: {said}\n" in shown.replace("\r", "\n")
    assert logging.getLogger("torch").handlers == torch_handlers, "torch's own handlers are given back"


def test_the_bars_eta_leaves_out_the_first_compiled_step(monkeypatch):
    """The first step of a compiled student takes a minute on a CPU; the next ones half a second. The bar's rate,
    and so its time left, counts from the end of the first step."""
    from types import SimpleNamespace

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sys, "stdout", Terminal())
    with Console("tty") as out:
        progress = console.Progress(out, total_steps=101, initial=0, num_epochs=1, clock=lambda: clock.now)
        clock.now += 60.0  # the compiled step
        progress.advance()
        for _ in range(10):
            clock.now += 0.5
            progress.advance()
        assert progress.bar.format_dict["rate"] == pytest.approx(2.0)  # 10 steps in 5 s
        assert "<00:45" in str(progress.bar), "90 steps left at 2 steps/s"
        progress.close()
