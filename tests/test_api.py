"""The Python API (`import dali_kd`): light to import, one distillation as the command line runs it, and a run that
leaves the program as it found it: its signal and logging handlers, and a stop signal that reaches the program once
the checkpoint is saved."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import dali_kd
from tests.conftest import tiny_overrides
from tests.faults import ROOT

DRIVER = ROOT / "tests" / "drivers" / "distill_with_signal.py"
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


def program_state() -> dict:
    """What a run must leave as it found it: the stop signals' handlers, every logger's handlers, level and
    propagation (the root's and dali_kd's included), and the warnings hooks."""
    loggers = {"": logging.getLogger()} | {
        name: logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    return {
        "signals": {name: signal.getsignal(getattr(signal, name)) for name in STOP_SIGNALS},
        "loggers": {
            name: (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
            for name, logger in loggers.items()
        },
        # The hooks, not the filters: a library imported for the first time during the run adds its own filters.
        "warnings": (warnings.showwarning, warnings.formatwarning),
    }


def assert_left_as_found(before: dict) -> None:
    after = program_state()
    assert after["signals"] == before["signals"]
    assert after["warnings"] == before["warnings"]
    changed = {
        name: (was, after["loggers"].get(name))
        for name, was in before["loggers"].items()
        if after["loggers"].get(name) != was
    }
    assert not changed, changed


class SignalBeforeStep(dali_kd.Callback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step(self, trainer, batch):
        if trainer.step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("step_*.pt"))


def test_import_dali_kd_loads_no_torch_and_the_api_names_resolve():
    probe = (
        "import sys, dali_kd\n"
        "light = 'torch' not in sys.modules\n"
        "dali_kd.load_config, dali_kd.distill, dali_kd.Result, dali_kd.UserError\n"
        "print(light, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.stdout.split() == ["True", "False"], result.stderr[-2000:]
    assert set(dali_kd.__all__) <= set(dir(dali_kd))
    assert all(getattr(dali_kd, name) is not None for name in dali_kd.__all__)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        dali_kd.no_such_name  # noqa: B018


def test_load_config_is_the_command_lines(tmp_path):
    overrides = ["train.epochs=3", f"train.teacher_feature_dir={tmp_path}"]
    config = dali_kd.load_config(overrides=overrides, presets=["function_matching"])
    assert config.train.epochs == 3 and config.data.augment.mix == "mixup"
    assert config.data.root == dali_kd.load_config().data.root, "no files: the demo's"
    with pytest.raises(dali_kd.UserError, match=r"train\.seed"):
        dali_kd.load_config(overrides=["train.seed=-1"])


def test_distill_runs_claims_its_run_directory_and_leaves_the_program_as_it_found_it(tiny_config, tmp_path):
    config = tiny_config()  # train.run_name=test
    before = program_state()
    result = dali_kd.distill(config, progress="quiet")
    assert_left_as_found(before)
    assert result.run_dir == tmp_path / "runs" / "test"
    assert result.summary == json.loads((result.run_dir / "summary.json").read_text())
    assert result.summary["steps"] == 6
    assert result.student_weights.is_file()
    assert not (result.run_dir / ".run.lock").exists(), "the claim is let go when the run ends"
    assert result.report().is_file()
    # The run directory is the run's own, as on the command line.
    with pytest.raises(dali_kd.UserError, match="already holds a run"):
        dali_kd.distill(config, progress="quiet")
    assert_left_as_found(before)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.root=/no/such/folder", "data folder not found: /no/such/folder"),  # while the Console is open
        ("model.student.name=no_such_model", "no_such_model"),  # before it opens
    ],
)
def test_a_failing_run_leaves_the_program_as_it_found_it(tiny_config, override, says):
    before = program_state()
    with pytest.raises(dali_kd.UserError, match=says):
        dali_kd.distill(tiny_config(override), progress="lines")
    assert_left_as_found(before)


def test_a_wrong_progress_is_one_line(tiny_config):
    with pytest.raises(dali_kd.UserError, match=r"^progress: 'fancy' is not one of auto, bar, lines, quiet$"):
        dali_kd.distill(tiny_config(), progress="fancy")  # type: ignore[arg-type]


def test_ctrl_c_during_a_run_saves_a_checkpoint_then_raises_keyboard_interrupt(tiny_config, tmp_path):
    config = tiny_config()
    # Python's own SIGINT handler, as in a notebook cell (a shell may start a background job with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = program_state()
        with pytest.raises(KeyboardInterrupt):
            dali_kd.distill(config, progress="lines", callbacks=[SignalBeforeStep(2, signal.SIGINT)])
        assert_left_as_found(before)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert checkpoints(tmp_path / "runs") == ["step_000000002.pt"]
    # And the run goes on from there.
    resumed = dali_kd.distill(config, resume="auto", progress="quiet")
    assert resumed.summary["steps"] == 6


def test_an_ignored_signal_stays_ignored(tiny_config, tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        result = dali_kd.distill(
            tiny_config(), progress="quiet", callbacks=[SignalBeforeStep(2, signal.SIGTERM)]
        )
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.summary["steps"] == 6, "the run was not stopped"


def run_driver(disposition: str, image_tree: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    overrides = [
        *tiny_overrides(image_tree, tmp_path), f"data.val_root={image_tree / 'val'}", "train.epochs=2",
        "train.max_steps_per_epoch=3",
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(DRIVER), disposition, "--", *overrides], capture_output=True, text=True,
        cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_sigterm_during_a_run_saves_a_checkpoint_then_runs_the_programs_handler(image_tree, tmp_path):
    result = run_driver("handler", image_tree, tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert checkpoints(tmp_path / "runs") == ["step_000000002.pt"]
    said = result.stdout.splitlines()
    ran, raised = (
        said.index("the program's handler ran"),
        next(i for i, s in enumerate(said) if "raised" in s),
    )
    assert ran < raised, "the handler runs first, then distill raises"
    assert said[raised].startswith("distill raised Preempted: SIGTERM received: checkpoint saved to ")
    assert said[raised].endswith("step_000000002.pt")


def test_sigterm_during_a_run_ends_a_program_without_a_handler_by_sigterm(image_tree, tmp_path):
    result = run_driver("default", image_tree, tmp_path)
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr[-3000:])
    assert checkpoints(tmp_path / "runs") == ["step_000000002.pt"]
    assert "preempted: SIGTERM received: checkpoint saved to" in result.stdout, (
        "said before the process ended"
    )
    assert "distill" not in result.stdout


# The demo with timm's tiny test models and a random teacher (none to train): the page's example, in seconds.
TINY_DEMO = [
    "model.teacher.name=test_resnet", "model.teacher.checkpoint=null", "model.student.name=test_vit",
    "data.image_size=32", "data.eval_resize=36", "data.dali_threads=1", "train.num_workers=0",
    "train.compile_student=false", "train.batch_size=16", "train.max_steps_per_epoch=2", "train.device=cpu",
]  # fmt: skip


def test_the_api_pages_first_run_works_from_an_empty_home(tmp_path):
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    example = page.partition("## A first run")[2].partition("```python\n")[2].partition("```")[0]
    assert "dali_kd.distill(" in example
    # The example as written, its overrides followed by the tiny ones.
    smaller = (
        "import dali_kd\n"
        "_load = dali_kd.load_config\n"
        f"dali_kd.load_config = lambda *a, overrides=(), **k: _load(*a, overrides=[*overrides, *{TINY_DEMO!r}], **k)\n"
    )
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", smaller + example], capture_output=True, text=True, cwd=work, timeout=600,
        env={**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (work / "runs" / "api").iterdir()
    assert result.stdout.splitlines()[-1].endswith(f"% in runs/api/{run_dir.name}"), result.stdout[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12, "the demo's 6 epochs × 2 steps"
    assert (home / ".cache" / "dali_kd" / "demo-v1" / "data" / "train").is_dir(), (
        "the demo's data, made on first use"
    )
