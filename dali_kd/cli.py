"""What every `python -m dali_kd.*` command shares: an argument parser whose mistakes are one line and exit 2."""

from __future__ import annotations

import argparse


class CommandLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other user error
        self.exit(2, f"error: {message} (see --help)\n")
