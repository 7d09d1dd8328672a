"""What other code says while a run talks: Python warnings and other packages' log records become the run's own
lines (through the `dali_kd` logger: on the terminal above the bar, never through it, and in train.log)."""

from __future__ import annotations

import contextlib
import logging
import sys
import sysconfig
import warnings
from pathlib import Path

logger = logging.getLogger("dali_kd")


@contextlib.contextmanager
def warnings_said():
    """Other packages' Python warnings become warning lines of the run, on the terminal (above a bar, never through
    it) and in train.log, with their category and where they were raised (dali_kd says its own through the logger)."""
    show = warnings.showwarning

    def said(message, category, filename, lineno, file=None, line=None):
        logger.warning(f"warning: {category.__name__} ({_short(filename)}:{lineno}): {message}")

    warnings.showwarning = said
    try:
        yield
    finally:
        warnings.showwarning = show


def _short(filename: str) -> str:
    """A file inside an installed package by its path there (torch/_inductor/...), others as given."""
    path = Path(filename)
    for base in {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}:
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return filename


class ThirdPartyLines(logging.Handler):
    """Other packages' log records that would print themselves on the terminal (torch's own stderr handlers,
    Python's handler of last resort), said as the run's lines instead: e.g. `warning: torch.utils.cpp_extension:
    No CUDA runtime is found, using CUDA_HOME='/usr/local'`, which torch logs at the first compiled step on a
    machine without a GPU."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))  # with the traceback of a record that has one

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        logger.log(record.levelno, f"{record.levelname.lower()}: {record.name}: {text}")


def _prints_to_terminal(handler: logging.Handler) -> bool:
    terminals = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    # Not only StreamHandlers: torch's own handler is a Handler with a `stream` property that follows sys.stderr.
    stream = getattr(handler, "stream", None)
    return stream is not None and any(stream is t for t in terminals)


class OutsideLoggers:
    """While a run talks, other packages' loggers say their lines through ThirdPartyLines: it stands in for Python's
    handler of last resort (a logger with no handler of its own) and for the terminal handlers of the loggers that
    exist when adopt() is called (torch's, once torch is imported: the run calls it again as it goes); the root
    logger's handlers, which the user configures, stay. close() gives each handler back."""

    def __init__(self):
        self.forward = ThirdPartyLines()
        self.swapped: list[tuple[logging.Logger, int, logging.Handler]] = []  # each where it was
        self.last_resort = logging.lastResort
        logging.lastResort = self.forward

    def adopt(self) -> None:
        for other in list(logging.Logger.manager.loggerDict.values()):
            if not isinstance(other, logging.Logger) or other.name.split(".")[0] == logger.name:
                continue
            terminal = [(i, h) for i, h in enumerate(other.handlers) if _prints_to_terminal(h)]
            for index, handler in terminal:
                self.swapped.append((other, index, handler))
            for _, handler in terminal:
                other.removeHandler(handler)
            if terminal:
                other.addHandler(self.forward)

    def close(self) -> None:
        logging.lastResort = self.last_resort
        for owner, _, _ in self.swapped:
            owner.removeHandler(self.forward)
        for owner, index, handler in self.swapped:  # in the order they were taken: each index holds again
            owner.handlers.insert(index, handler)
        self.swapped = []
