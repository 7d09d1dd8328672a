"""`python -m dali_kd.train`: parse flags, load the three configs, and run (dali_kd/commands/distill.py, the code the
Python API runs too); the outcome as an exit code.

Also the entry point of every rank under `torchrun` or `srun`; exit codes: 0 done, 1 the run stopped itself
(e.g. NaN loss), 2 a user error, 75 preempted (checkpoint saved; requeued under Slurm), 130 Ctrl-C (checkpoint
saved; not requeued).
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m dali_kd.train`: before anything else is imported, a stop signal is recorded rather than fatal;
    # main() acts on it once the imports are done. The program's own handler: main() passes a stop signal back to
    # it, and the process exits with main()'s code.
    from dali_kd.runs.preemption import RUN_SIGNALS, StopSignal

    _SIGNALS_DURING_IMPORTS = StopSignal(RUN_SIGNALS)

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dali_kd.commands.cli import CommandLineParser
from dali_kd.config import CONFIG_DIR, DEMO_CONFIG_DIR, Config, load_config
from dali_kd.config.presets import find_preset
from dali_kd.errors import TrainingStopped, UserError

if TYPE_CHECKING:
    from dali_kd.commands.distill import Result
    from dali_kd.runs.preemption import StopSignal

EXIT_STOPPED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m dali_kd.train",
        description="Distil a frozen teacher into a student with DALI input pipelines. With no config flags it "
        f"runs the embedded demo ({DEMO_CONFIG_DIR}); real-use configs to edit are in {CONFIG_DIR}.",
    )
    parser.add_argument("--data_config", type=Path, help="data YAML (default: the demo's)")
    parser.add_argument("--train_config", type=Path, help="train YAML (default: the demo's)")
    parser.add_argument("--model_config", type=Path, help="model YAML (default: the demo's)")
    parser.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="NAME|PATH",
        help="a preset YAML (or the name of one in configs/presets, e.g. function_matching) applied over the three "
        "files; repeatable, in order; KEY=VALUE overrides still win",
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="overrides train.device")
    parser.add_argument("--max_steps_per_epoch", type=int, help="overrides train.max_steps_per_epoch")
    parser.add_argument(
        "--resume",
        default="auto" if os.environ.get("SLURM_JOB_ID") else "none",
        metavar="auto|none|PATH",
        help="auto: the newest complete checkpoint of the run (fresh start if none); PATH: that checkpoint; "
        "none: start fresh (default: auto under Slurm, else none)",
    )
    parser.add_argument(
        "--allow-config-change", action="store_true", help="resume even if the config or the teacher changed"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: a plain line per train.log_every_n_steps and per message (the default when stdout "
        "is not a terminal: Slurm, nohup, | tee)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only warnings, errors and the final summary (train.log has all)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="any dotted config key, e.g. train.batch_size=64"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[Config, list[Path]]:
    """The run's config as the parsed command line gives it (files < presets < flags and KEY=VALUE), and the
    preset files that went into it."""
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.max_steps_per_epoch is not None:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps_per_epoch}")
    presets = [find_preset(p) for p in args.preset]
    cfg = load_config(args.data_config, args.train_config, args.model_config, overrides, presets=presets)
    return cfg, presets


def run(argv: list[str] | None, callbacks: list | None, stop: StopSignal) -> Result:
    """Train as the command line says; callbacks (dali_kd.training.callbacks.Callback) watch the run. stop: the signal
    handlers main() installed (SIGINT/SIGUSR1/SIGTERM end the start-up at once, then the loop at a step boundary)."""
    from dali_kd.commands.distill import run_distillation

    # Intermixed: KEY=VALUE overrides may come before, between and after the flags.
    args = build_parser().parse_intermixed_args(argv)
    # A typo is reported in a fraction of a second, before torch loads.
    cfg, presets = config_from_args(args)
    progress = "quiet" if args.quiet else "lines" if args.no_progress else "auto"
    return run_distillation(
        cfg, stop, resume=args.resume, progress=progress, callbacks=callbacks or [],
        allow_config_change=args.allow_config_change, presets=presets,
    )  # fmt: skip


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """The command; its exit code. A stop signal is passed on when it returns, to the handler that was there before:
    a Python program calling main() gets it back (pytest under `timeout` stops), and the command line's own
    handler (program(), `python -m dali_kd.train`) makes the process exit with this code, 75 (130 for Ctrl-C)."""
    from dali_kd.runs.preemption import RUN_SIGNALS, StopSignal

    # First thing: a job signalled during start-up is requeued, not dropped (a signal the module's own handler
    # recorded while it was imported is taken over).
    with StopSignal(RUN_SIGNALS) as stop:
        code = _exit_code(argv, callbacks, stop)
        if code == 0 and stop.received is not None:
            # After the last step (the final evaluation, the final weights): the run is complete, nothing to requeue.
            print(
                f"{stop.received} received after the last step: the run finished and wrote its final weights",
                file=sys.stderr,
            )
    return code


def _exit_code(argv: list[str] | None, callbacks: list | None, stop: StopSignal) -> int:
    from dali_kd.commands.distill import ending_line
    from dali_kd.runs.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, requeue

    try:
        run(argv, callbacks, stop)
    except UserError as e:
        print(ending_line(e), file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(ending_line(e), file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt as e:
        print(ending_line(e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Preempted as e:
        rank0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
        if rank0:
            print(ending_line(e), file=sys.stderr, flush=True)
            if not e.interrupted:  # the user's Ctrl-C stops the job; a scheduler's signal asks for it again
                requeue()
        return EXIT_INTERRUPTED if e.interrupted else EXIT_PREEMPTED
    return 0


def program(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """`dali-kd-train`: main() as the whole program. Its own stop-signal handler goes in first and stays: main() passes
    a stop signal on to it, so the process exits with main()'s code (75, 130) instead of ending by the signal."""
    from dali_kd.runs.preemption import RUN_SIGNALS, StopSignal

    StopSignal(RUN_SIGNALS)
    return main(argv, callbacks)


if __name__ == "__main__":
    sys.exit(main())
