"""How a run talks: a tqdm bar on a terminal, plain lines elsewhere (Slurm, nohup, `| tee`), or only warnings, errors
and the final summary (--quiet); every line also goes to the run directory's train.log.

The command line opens one Console for the run (`with Console(...)`); deeper modules say things through `info()` and
`warning()`, which reach the open console — like print reaches sys.stdout — or, with none open (a test, a notebook
building a Trainer), plain lines on sys.stdout.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from dali_kd.io import os_reason

MODES = ("tty", "plain", "quiet")
LOG_NAME = "train.log"
# What eval_line calls each result (all of them percentages); a result it does not know is named by its key.
EVAL_NAMES = {
    "student_knn_top1": "student k-NN top-1",
    "student_head_top1": "head top-1",
    "student_ema_knn_top1": "EMA k-NN top-1",
    "student_ema_head_top1": "EMA head top-1",
    "teacher_knn_top1": "teacher k-NN top-1",
    "teacher_head_top1": "head top-1",
}


def choose_mode(quiet: bool = False, no_progress: bool = False, stream: TextIO | None = None) -> str:
    """quiet beats no_progress (plain lines); otherwise a bar only where the output is a terminal."""
    if quiet:
        return "quiet"
    if no_progress:
        return "plain"
    stream = sys.stdout if stream is None else stream
    try:
        return "tty" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "plain"


# ---- the lines ---------------------------------------------------------------------------------------------------
def interval_line(row: dict[str, Any], total_steps: int, num_epochs: int) -> str:
    """One log interval's metrics row as a line, e.g.
    `step 120/1600 epoch 1/4 loss 0.4312 | 812 img/s | data 3.1 ms / step 78.8 ms | gpu 97% | student-bound`
    (the stage times, GPU and verdict appear only when the row has them: train.telemetry, NVML)."""
    parts = [
        f"step {row['step']}/{total_steps} epoch {row['epoch'] + 1}/{num_epochs} loss {row['loss']:.4f}",
        f"{row['img_per_s']:.0f} img/s",
    ]
    if row.get("data_ms") is not None:
        parts.append(f"data {row['data_ms']:.1f} ms / step {row['step_ms']:.1f} ms")
    else:
        parts.append(f"step {row['step_ms']:.1f} ms")
    if row.get("gpu_util_pct") is not None:
        parts.append(f"gpu {row['gpu_util_pct']:.0f}%")
    if row.get("verdict"):
        parts.append(row["verdict"])
    return " | ".join(parts)


def bar_postfix(row: dict[str, Any]) -> str:
    """The same row, short enough for the bar's postfix."""
    parts = [f"loss={row['loss']:.4f}"]
    if row.get("data_ms") is not None:
        parts.append(f"data/step={row['data_ms']:.0f}/{row['step_ms']:.0f}ms")
    else:
        parts.append(f"step={row['step_ms']:.0f}ms")
    parts.append(f"{row['img_per_s']:.0f}img/s")
    if row.get("gpu_util_pct") is not None:
        parts.append(f"gpu={row['gpu_util_pct']:.0f}%")
    if row.get("verdict"):
        parts.append(row["verdict"])
    return " ".join(parts)


def eval_line(epoch: int | None, results: dict[str, float | None]) -> str:
    """One evaluation's results (percentages; None: not measured) as one line, e.g.
    `epoch 3: student k-NN top-1 41.2%, head top-1 47.0%, EMA k-NN top-1 42.5%, EMA head top-1 48.1%`
    (epoch None: the teacher's, before training)."""
    said = [
        f"{EVAL_NAMES.get(name, name)} {value:.1f}%" for name, value in results.items() if value is not None
    ]
    return ", ".join(said) if epoch is None else f"epoch {epoch}: {', '.join(said)}"


# ---- where they go -----------------------------------------------------------------------------------------------
class RunLog:
    """<run_dir>/train.log, appended to (a resumed run continues it), each line stamped with the time it was said.

    Lines said before the run directory exists wait here until open_in(). Losing the log must never stop training:
    a write that fails (a full disk) is reported once by the caller and the log is given up."""

    def __init__(self):
        self.path: Path | None = None
        self.failed = False
        self._waiting: list[str] = []
        self._file: TextIO | None = None

    def open_in(self, run_dir: Path) -> str | None:
        """Start writing to run_dir/train.log (the waiting lines first); the reason if that failed."""
        if self._file is not None or self.failed:
            return None
        self.path = run_dir / LOG_NAME
        try:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as e:
            return self._give_up(e)
        waiting, self._waiting = self._waiting, []
        return self._write("".join(waiting))

    def write(self, line: str) -> str | None:
        """Append (or keep until open_in) one line; the reason the first time a write fails, else None."""
        if self.failed:
            return None
        stamp = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
        text = "".join(f"{stamp} {part}\n" for part in line.splitlines() or [""])
        if self._file is None:
            self._waiting.append(text)
            return None
        return self._write(text)

    def _write(self, text: str) -> str | None:
        assert self._file is not None  # called once open_in opened it
        try:
            self._file.write(text)
            self._file.flush()  # a `tail -f train.log` sees each line as it is said
        except OSError as e:
            return self._give_up(e)
        return None

    def _give_up(self, error: OSError) -> str:
        self.failed = True
        self._waiting = []
        self.close()
        return f"cannot write {self.path}: {os_reason(error) or error}; training goes on without train.log"

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: reported by the write that failed first
                self._file.close()
            self._file = None


class Console:
    """One run's output. mode: tty (a tqdm bar, lines written above it), plain (no bar: a flushed line per log
    interval and per message), quiet (only warnings, errors and the final summary). stream: the terminal side
    (sys.stdout at the time of each write by default); log: the run's train.log, which gets every line in every mode."""

    def __init__(self, mode: str, stream: TextIO | None = None, log: RunLog | None = None):
        if mode not in MODES:
            raise ValueError(f"console mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.log = log
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return sys.stdout if self._stream is None else self._stream

    def info(self, line: str) -> None:
        """A message: what the run found, did or measured."""
        self._say(line, terminal=self.mode != "quiet")

    def warning(self, line: str) -> None:
        """Something the user should know even with --quiet."""
        self._say(line, terminal=True)

    def summary(self, line: str) -> None:
        """The final summary: said in every mode."""
        self._say(line, terminal=True)

    def interval(self, line: str, show: bool = True) -> None:
        """A log interval's line: on the terminal in plain mode only (a terminal has the bar instead)."""
        self._say(line, terminal=show and self.mode == "plain")

    def record(self, line: str) -> None:
        """train.log only: e.g. the error line that main() prints to stderr itself."""
        self._say(line, terminal=False)

    def keep_log_in(self, run_dir: Path) -> None:
        """The run directory exists: train.log starts there, with the lines said so far."""
        if self.log is not None and (failure := self.log.open_in(run_dir)):
            self._to_terminal(f"warning: {failure}")

    def progress(self, total_steps: int, initial: int, num_epochs: int, show: bool = True) -> Progress:
        return Progress(self, total_steps, initial, num_epochs, show)

    def _say(self, line: str, terminal: bool) -> None:
        if terminal:
            self._to_terminal(line)
        if self.log is not None and (failure := self.log.write(line)):
            self._to_terminal(f"warning: {failure}")

    def _to_terminal(self, line: str) -> None:
        if self.mode == "tty":
            tqdm.write(line, file=self.stream)  # clears the bar, writes the line, redraws the bar below it
        else:
            self.stream.write(line + "\n")
        self.stream.flush()  # a Slurm .out file shows each line when it is said

    # The console the process talks through while the `with` lasts.
    def __enter__(self) -> Console:
        _open.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _open.remove(self)
        if self.log is not None:
            self.log.close()


class Progress:
    """A run's progress: on a terminal a bar whose postfix shows the last interval; in plain mode one line per
    interval; train.log gets the line in every mode (also with show=False, which keeps the terminal silent)."""

    def __init__(self, console: Console, total_steps: int, initial: int, num_epochs: int, show: bool = True):
        self.console, self.total_steps, self.num_epochs, self.show = console, total_steps, num_epochs, show
        self.bar = tqdm(
            total=total_steps,
            initial=initial,
            desc="distill",
            unit="step",
            file=console.stream,
            disable=not (show and console.mode == "tty"),
        )

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def report(self, row: dict[str, Any]) -> None:
        """One log interval's metrics row (RunMonitor.log)."""
        self.console.interval(interval_line(row, self.total_steps, self.num_epochs), self.show)
        if not self.bar.disable:
            self.bar.set_postfix_str(bar_postfix(row), refresh=False)

    def close(self) -> None:
        self.bar.close()


_open: list[Console] = []


def current() -> Console:
    """The open console, or plain lines on sys.stdout (a bar on a terminal) when none is open."""
    return _open[-1] if _open else Console(choose_mode())


def info(line: str) -> None:
    current().info(line)


def warning(line: str) -> None:
    current().warning(line)
