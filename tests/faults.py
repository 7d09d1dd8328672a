"""The fault-injection suite's shared pieces: run the CLI as a user would, and the promise every fault must keep —
exit with the expected code, one `error:` line naming what and where, never a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(image_tree: Path, out: Path) -> list[str]:
    """Overrides for a seconds-long CPU run on the test image tree (no demo, no compilation)."""
    return [
        f"data.root={image_tree / 'train'}", f"data.val_root={image_tree / 'val'}", "data.image_size=32",
        "data.eval_resize=36", "data.dali_threads=1", "model.teacher.name=test_resnet", "model.teacher.checkpoint=null",
        "model.teacher.num_classes=4", "model.student.name=test_vit", "train.batch_size=8", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.compile_student=false", "train.num_workers=0", "train.device=cpu",
        f"train.output_dir={out}", "train.run_name=fault", "--no-progress",
    ]  # fmt: skip


def run_module(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=full_env,
        timeout=timeout,
    )  # fmt: skip


def run_train(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_module("dali_kd.train", args, cwd, env)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, pattern: str) -> str:
    """The run exited with `code`, printed no traceback, and its one `error:` line matches `pattern`."""
    out = result.stderr
    assert "Traceback" not in out, out[-3000:]
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{out[-3000:]}"
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert re.search(pattern, errors[0]), f"{errors[0]!r} does not match {pattern!r}"
    return errors[0]


def fake_scontrol(tmp_path: Path) -> tuple[str, Path]:
    """A `scontrol` that records its arguments: (a PATH that finds it first, the file it writes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", calls


class WarningLines(logging.Handler):
    """The warning lines the run says (the dali_kd logger) while it is attached."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def warning_said(match: str | None):
    """The block says a warning line matching `match` (re.search); None: it says no warning line at all."""
    said = WarningLines()
    logger = logging.getLogger("dali_kd")
    logger.addHandler(said)
    try:
        yield said.lines
    finally:
        logger.removeHandler(said)
    if match is None:
        assert said.lines == [], said.lines
    else:
        assert any(re.search(match, line) for line in said.lines), (
            f"no warning line matching {match!r}: {said.lines}"
        )
