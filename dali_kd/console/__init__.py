"""How a run talks: a tqdm bar on a terminal, plain lines elsewhere (Slurm, nohup, `| tee`), or only warnings, errors
and the final summary (--quiet); every line also goes to the run directory's train.log.

All of it goes through the standard `logging` package, on the `dali_kd` logger: deeper modules say things with
`info()` and `warning()` (or any `dali_kd.*` logger). The command line opens one Console for the run (`with
Console(...)`), which gives the logger its handlers for the run: the terminal (filtered by mode and rank, through
tqdm.contrib.logging under a bar) and train.log. With none open (a test, a notebook building a Trainer) the lines go
to sys.stdout. The logger does not propagate: its lines are the program's output, not diagnostics, and a notebook's
root handler would print each of them twice (set `logging.getLogger("dali_kd").propagate = True` to collect them).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dali_kd.console.losses import loss_words
from dali_kd.console.outside import OutsideLoggers, warnings_said
from dali_kd.console.results import eval_line as eval_line
from dali_kd.io import os_reason

MODES = ("tty", "plain", "quiet")
LOG_NAME = "train.log"
logger = logging.getLogger("dali_kd")
logger.setLevel(logging.INFO)
logger.propagate = False
# Where a record may show on the terminal (its `terminal` attribute; absent: by level and mode): "always" (the final
# summary, also with --quiet), "plain" (an interval line: a terminal has the bar instead), "never" (train.log only).
TERMINAL = "terminal"


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
        f"step {row['step']}/{total_steps} epoch {row['epoch'] + 1}/{num_epochs} {loss_words(row)}",
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
    parts = [loss_words(row, "=")]
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


# ---- saying them -------------------------------------------------------------------------------------------------
def info(line: str) -> None:
    """A message: what the run found, did or measured."""
    logger.info(line)


def warning(line: str) -> None:
    """Something the user should know even with --quiet."""
    logger.warning(line)


def summary(line: str) -> None:
    """The final summary: said in every mode."""
    logger.info(line, extra={TERMINAL: "always"})


def record(line: str) -> None:
    """train.log only: e.g. the error line that main() prints to stderr itself."""
    logger.info(line, extra={TERMINAL: "never"})


# ---- where they go -----------------------------------------------------------------------------------------------
class TerminalFilter(logging.Filter):
    """What the terminal shows in a mode (None: the mode sys.stdout calls for at each line, as with no run open)."""

    def __init__(self, mode: str | None):
        super().__init__()
        self.mode = mode

    def filter(self, record: logging.LogRecord) -> bool:
        mode = self.mode or choose_mode()
        shown = getattr(record, TERMINAL, None)
        if shown is None:
            return mode != "quiet" or record.levelno >= logging.WARNING
        return shown == "always" or (shown == "plain" and mode == "plain")


class RankFilter(logging.Filter):
    """Rank 0 talks for the run; the other ranks say only their warnings and errors."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class Stdout(logging.StreamHandler):
    """sys.stdout as it is at each line (pytest's capsys, a notebook's redirect), a bar kept below on a terminal."""

    def __init__(self):
        super().__init__()
        self.addFilter(TerminalFilter(None))

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass  # always sys.stdout

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)  # with no bar open: a plain line
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


class Stamped(logging.Formatter):
    """train.log's lines: each stamped with the time it was said."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = f"{datetime.fromtimestamp(record.created):%Y-%m-%d %H:%M:%S}"
        return "\n".join(f"{stamp} {part}" for part in record.getMessage().splitlines() or [""])


class RunLog(logging.Handler):
    """<run_dir>/train.log, appended to (a resumed run continues it): every line in every mode.

    Lines said before the run directory exists wait here until open_in(). Losing the log must never stop training:
    a write that fails (a full disk) is one warning on the terminal, and the log is given up."""

    def __init__(self):
        super().__init__()
        self.setFormatter(Stamped())
        self.path: Path | None = None
        self.failed = False
        self._waiting: list[str] = []
        self._file: TextIO | None = None

    def open_in(self, run_dir: Path) -> None:
        """Start writing to run_dir/train.log, the waiting lines first."""
        if self._file is not None or self.failed:
            return
        self.path = run_dir / LOG_NAME
        try:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as e:
            self._give_up(e)
            return
        waiting, self._waiting = self._waiting, []
        self._write("".join(waiting))

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        text = self.format(record) + "\n"
        if self._file is None:
            self._waiting.append(text)
        else:
            self._write(text)

    def _write(self, text: str) -> None:
        assert self._file is not None  # called once open_in opened it
        try:
            self._file.write(text)
            self._file.flush()  # a `tail -f train.log` sees each line as it is said
        except OSError as e:
            self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        self.failed = True
        self._waiting = []
        self.close()
        why = os_reason(error) or error
        logger.warning(f"warning: cannot write {self.path}: {why}; training goes on without train.log")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: reported by the write that failed first
                self._file.close()
            self._file = None
        super().close()


class Console:
    """One run's output, while the `with` lasts. mode: tty (a tqdm bar, lines written above it), plain (no bar: a
    flushed line per log interval and per message), quiet (only warnings, errors and the final summary). rank: the
    process's rank (the others say only warnings and errors). train_log: keep train.log (rank 0 of a run), which
    gets every line in every mode once keep_log_in() says where."""

    def __init__(self, mode: str, rank: int = 0, train_log: bool = False):
        if mode not in MODES:
            raise ValueError(f"console mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.stream: TextIO = sys.stdout
        self.log = RunLog() if train_log else None
        self.terminal = logging.StreamHandler(self.stream)
        self.terminal.addFilter(RankFilter(rank))
        self.terminal.addFilter(TerminalFilter(mode))
        self._set_aside: list[logging.Handler] = []
        self._before: list[logging.Handler] = []
        self._stack = contextlib.ExitStack()
        self.outside: OutsideLoggers | None = None  # while the `with` lasts

    def keep_log_in(self, run_dir: Path) -> None:
        """The run directory exists: train.log starts there, with the lines said so far."""
        if self.log is not None:
            self.log.open_in(run_dir)
        self._adopt_outside()

    def progress(self, total_steps: int, initial: int, num_epochs: int, show: bool = True) -> Progress:
        self._adopt_outside()  # the loggers that the libraries a run imported have made by now
        return Progress(self, total_steps, initial, num_epochs, show)

    def _adopt_outside(self) -> None:
        if self.outside is not None:
            self.outside.adopt()

    def __enter__(self) -> Console:
        self.stream = self.terminal.stream = sys.stdout
        # This run's handlers stand in for those of no run (or of an outer Console); others' (pytest's) stay.
        self._before = list(logger.handlers)
        self._set_aside = [h for h in logger.handlers if _ours(h)]
        for handler in self._set_aside:
            logger.removeHandler(handler)
        for handler in self._handlers():
            logger.addHandler(handler)
        if self.mode == "tty":
            # The terminal's lines go through tqdm.write: it clears the bar, writes the line, redraws the bar.
            self._stack.enter_context(logging_redirect_tqdm([logger]))
        self._stack.enter_context(warnings_said())
        self.outside = OutsideLoggers()
        self.outside.adopt()
        self._stack.callback(self.outside.close)
        _open.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _open.remove(self)
        self._stack.close()
        # The handlers as they were, in their order; what others added or removed meanwhile stays so.
        kept = [h for h in logger.handlers if h not in self._handlers()]
        logger.handlers = [h for h in self._before if h in kept or h in self._set_aside] + [
            h for h in kept if h not in self._before
        ]
        if self.log is not None:
            self.log.close()

    def _handlers(self) -> list[logging.Handler]:
        return [self.terminal] + ([self.log] if self.log is not None else [])


def _ours(handler: logging.Handler) -> bool:
    """A handler a Console or the no-run default put there (tqdm's stand-in for a terminal copies its filters)."""
    return isinstance(handler, RunLog) or any(isinstance(f, TerminalFilter) for f in handler.filters)


class StepBar(tqdm):
    """A tqdm bar whose rate, and so its ETA, counts only the steps after the first one this process takes: that
    step holds torch.compile's compilation (a minute on a CPU), which would turn tqdm's estimate into hours.
    clock: seconds, as tqdm's own time.time (a test's stand-in)."""

    def __init__(self, *args: Any, clock: Callable[[], float] | None = None, **kwargs: Any):
        self.rate_from: tuple[float, float] | None = None  # (steps, time) the rate counts from
        super().__init__(*args, **kwargs)  # draws the bar once: rate_from must exist
        if clock is not None:
            self._time = clock
            self.start_t = self.last_print_t = clock()

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if self.rate_from is None and not self.disable:
            self.rate_from = (self.n, self._time())
        return shown

    @property
    def format_dict(self) -> dict[str, Any]:
        said = super().format_dict
        if self.rate_from is not None:
            steps, since = self.rate_from
            elapsed = self._time() - since
            # 0 until a step after the first is done: tqdm shows "?" (None would make it average from the start).
            said["rate"] = (self.n - steps) / elapsed if elapsed > 0 else 0.0
        return said


class Progress:
    """A run's progress: on a terminal a bar whose postfix shows the last interval; in plain mode one line per
    interval; train.log gets the line in every mode (also with show=False, which keeps the terminal silent)."""

    def __init__(
        self,
        console: Console,
        total_steps: int,
        initial: int,
        num_epochs: int,
        show: bool = True,
        clock: Callable[[], float] | None = None,
    ):
        self.total_steps, self.num_epochs, self.show = total_steps, num_epochs, show
        self.bar = StepBar(
            total=total_steps,
            initial=initial,
            desc="distill",
            unit="step",
            file=console.stream,
            disable=not (show and console.mode == "tty"),
            clock=clock,
        )

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def report(self, row: dict[str, Any]) -> None:
        """One log interval's metrics row (RunMonitor.log)."""
        line = interval_line(row, self.total_steps, self.num_epochs)
        logger.info(line, extra={TERMINAL: "plain" if self.show else "never"})
        if not self.bar.disable:
            self.bar.set_postfix_str(bar_postfix(row), refresh=False)

    def close(self) -> None:
        self.bar.close()


_open: list[Console] = []
if not logger.handlers:  # the lines said with no run open
    logger.addHandler(Stdout())


def current() -> Console:
    """The open console, or one in the mode sys.stdout calls for (a bar on a terminal) when none is open."""
    return _open[-1] if _open else Console(choose_mode())
