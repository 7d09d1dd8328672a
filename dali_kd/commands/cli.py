"""What every `python -m dali_kd.*` command shares: an argument parser whose mistakes are one line and exit 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn


class CommandLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, like every other user error
        self.exit(2, f"error: {message} (see --help)\n")


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from low to high (high None: no upper end); out of range is a usage
    error naming the flag, as a wrong type is."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
            shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {shown}")
        return value

    return parse


def finite_at_least(low: float) -> Callable[[str], float]:
    """An argparse type: a finite number no smaller than low. NaN and infinity are usage errors, not values that
    every later comparison silently gets wrong."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number of at least {low:g}, got {text}")
        return value

    return parse
