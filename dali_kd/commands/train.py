"""`python -m dali_kd.train`: parse flags, load the three configs, prepare the demo if asked, train, report.

Also the entry point of every rank under `torchrun` or `srun`; exit codes: 0 done, 1 the run stopped itself
(e.g. NaN loss), 2 a user error, 75 preempted (checkpoint saved; requeued under Slurm).
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m dali_kd.train`: before anything else is imported, a stop signal is recorded rather than fatal;
    # main() acts on it once the imports are done.
    from dali_kd.runs.preemption import StopSignal

    _SIGNALS_DURING_IMPORTS = StopSignal()

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dali_kd.commands.cli import CommandLineParser
from dali_kd.config import CONFIG_DIR, DEMO_CONFIG_DIR, Config, load_config
from dali_kd.config.presets import find_preset
from dali_kd.errors import TrainingStopped, UserError

if TYPE_CHECKING:
    import torch

    from dali_kd.console import Console
    from dali_kd.distributed import DistInfo
    from dali_kd.runs.directory import RunDirClaim
    from dali_kd.runs.preemption import StopSignal
    from dali_kd.training.trainer import Trainer

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


def _on_main(info: DistInfo, decide: Callable[[], Any]) -> Any:
    """decide() on rank 0, its result on every rank; its UserError is raised on every rank (none waits)."""
    from dali_kd import distributed

    outcome: tuple[Any, str | None] | None = None
    if info.is_main:
        try:
            outcome = (decide(), None)
        except UserError as e:
            outcome = (None, str(e))
    result, error = distributed.broadcast_object(outcome)
    if error is not None:
        raise UserError(error)
    return result


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


def run(argv: list[str] | None = None, callbacks: list | None = None, stop: StopSignal | None = None) -> dict:
    """Train as the command line says; callbacks (dali_kd.training.callbacks.Callback) watch the run. stop: the signal
    handlers main() installed (SIGUSR1/SIGTERM end the start-up at once, then the loop at a step boundary)."""
    # Intermixed: KEY=VALUE overrides may come before, between and after the flags.
    args = build_parser().parse_intermixed_args(argv)
    cfg, presets = config_from_args(args)
    from dali_kd.cpu_budget import CpuSampler

    cpus = CpuSampler()  # what other processes do on our CPUs while the imports below run decides the threads

    # Imported after the config is valid: a typo is reported in a fraction of a second, before torch loads. All
    # the heavy imports happen here, while a stop signal is only recorded (an import cut short by an exception
    # leaves a half-made module behind); the first check comes right after.
    import dali_kd.commands.demo  # noqa: F401 - the heavy imports, all here: torch, numpy, timm, DALI
    import dali_kd.training.trainer  # noqa: F401
    from dali_kd import console, distributed
    from dali_kd.console import Console, choose_mode
    from dali_kd.models import check_model_name
    from dali_kd.runs.directory import check_writable
    from dali_kd.runs.preemption import StopSignal
    from dali_kd.runtime import cpu_threads

    budget = cpus.budget(cfg.train.cpu_threads)
    threads = {"dali_threads": min(cfg.data.dali_threads, budget.threads)}
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=threads)})
    own_stop = stop is None
    stop = stop or StopSignal()
    try:
        stop.check()
        check_model_name(cfg.model.teacher.name, "teacher")
        check_model_name(cfg.model.student.name, "student")
        check_writable(Path(cfg.train.output_dir).expanduser())
        info = distributed.detect()
        # Rank 0 talks for the run and keeps its train.log; the other ranks say only warnings and errors.
        mode = choose_mode(args.quiet, args.no_progress)
        with Console(mode, rank=info.rank, train_log=info.is_main) as out, cpu_threads(budget.threads):
            console.info(budget.line())
            if presets:
                # The resolved config.yaml holds what they set; this line (and train.log) says where it came from.
                console.info(
                    f"presets: {', '.join(map(str, presets))} (over the config files; KEY=VALUE overrides win)"
                )
            try:
                return _train(args, cfg, info, out, callbacks, stop)
            except BaseException as e:
                console.record(
                    ending_line(e)
                )  # main() prints it to stderr; train.log keeps why the run ended
                raise
    finally:
        if own_stop:
            stop.restore()


def _train(
    args: argparse.Namespace,
    cfg: Config,
    info: DistInfo,
    out: Console,
    callbacks: list | None,
    stop: StopSignal,
) -> dict:
    from dali_kd import distributed
    from dali_kd.runtime import resolve_device

    # Rank 0's hold on the run directory, from before any work until the run ends.
    claims: list[RunDirClaim] = []
    device = resolve_device(cfg.train.device, info.local_rank)
    try:
        # Start-up: nothing to save yet, and a cold scan outlasts Slurm's grace time, so a stop signal ends it
        # at once (exit 75, requeued).
        with stop.interrupting():
            run_dir, resume_from, trainer = _start_up(args, cfg, info, out, callbacks, device, claims)
        if info.is_main:
            out.keep_log_in(run_dir)
            _say_what_runs(cfg, info, device, run_dir, resume_from, trainer)
        distributed.barrier()
        summary = trainer.fit(run_dir)
    finally:
        distributed.shutdown()
        for held in claims:
            held.release()  # a directory it made for a run that wrote nothing is removed again
    if info.is_main:
        _say_results(summary, run_dir)
    return summary


def _start_up(
    args: argparse.Namespace,
    cfg: Config,
    info: DistInfo,
    out: Console,
    callbacks: list | None,
    device: torch.device,
    claims: list[RunDirClaim],
) -> tuple[Path, Path | None, Trainer]:
    """The run directory claimed, pretrained weights and the demo's data made ready, and the trainer built (its
    checkpoint loaded when resuming); `claims` gets rank 0's hold on the run directory."""
    from dali_kd import distributed
    from dali_kd.commands.demo import demo_parts, prepare_demo
    from dali_kd.models import fetch_pretrained
    from dali_kd.runs.directory import choose_run
    from dali_kd.training.trainer import Trainer

    def claim_run() -> tuple[Path, Path | None]:
        held, resume_from = choose_run(cfg, args.resume)
        claims.append(held)
        return held.path, resume_from

    distributed.init(info, device.type)
    # Claimed before the demo's first-use preparation, so a refused run directory costs nothing.
    run_dir, resume_from = _on_main(info, claim_run)
    # Pretrained weights not cached yet are downloaded by rank 0 alone (unless HF_HUB_OFFLINE is set);
    # every rank then loads them from the cache when it builds its models.
    _on_main(info, lambda: fetch_pretrained(cfg.model))
    # The demo's own dataset and teacher are made on first use; paths the user chose are only ever read.
    if any(parts := demo_parts(cfg)):
        _on_main(info, lambda: prepare_demo(cfg, device, out.mode != "quiet", *parts))
    # Everything that can be wrong with the data, models or checkpoint fails here, before any run file.
    trainer = Trainer(
        cfg,
        device,
        show_progress=True,  # a bar or plain lines, as the console's mode says
        dist_info=info,
        resume_from=resume_from,
        allow_config_change=args.allow_config_change,
        callbacks=callbacks,
    )
    return run_dir, resume_from, trainer


def _say_what_runs(
    cfg: Config,
    info: DistInfo,
    device: torch.device,
    run_dir: Path,
    resume_from: Path | None,
    trainer: Trainer,
) -> None:
    """The run's first lines: where it writes, and what it distils on what, for how long."""
    from dali_kd import console

    console.info(f"run directory: {run_dir}")
    what = f"resuming from {resume_from} at step {trainer.step}" if resume_from else "starting"
    d = cfg.data
    crops = (
        f", crops {d.num_global_crops}×{d.image_size} px + {d.num_local_crops}×{d.local_crop_size} px"
        if cfg.train.use_local_crops
        else ""
    )
    console.info(
        f"{cfg.model.teacher.name} → {cfg.model.student.name} on {device} × {info.world_size}, backend "
        f"{cfg.data.backend}, batch {cfg.train.batch_size}{crops}{_accumulated(cfg)}, {cfg.train.epochs} epochs × "
        f"{trainer.steps_per_epoch} steps; {what}"
    )


def _accumulated(cfg: Config) -> str:
    n = cfg.train.grad_accum_steps
    return "" if n == 1 else f" × {n} accumulated ({cfg.train.batch_size * n} per step)"


def _say_results(summary: dict, run_dir: Path) -> None:
    """The run's last lines: the student's top-1 against the teacher's, and the steps and time it took."""
    from dali_kd import console

    knn, teacher = summary["student_knn_top1"], summary["teacher_knn_top1"]
    if knn is not None:
        console.summary(
            f"student k-NN top-1 {knn:.1f}% (teacher {teacher:.1f}%, chance {summary['chance_top1']:.1f}%)"
        )
    if summary["student_head_top1"] is not None:
        teacher_head = summary["teacher_head_top1"]
        against = "" if teacher_head is None else f" (teacher {teacher_head:.1f}%)"
        console.summary(f"student head top-1 {summary['student_head_top1']:.1f}%{against}")
    for key, kind in (("knn", "k-NN"), ("head", "head")):
        top5, teacher5 = summary.get(f"student_{key}_top5"), summary.get(f"teacher_{key}_top5")
        if top5 is not None:  # 5 classes or more
            against = "" if teacher5 is None else f" (teacher {teacher5:.1f}%)"
            console.summary(f"student {kind} top-5 {top5:.1f}%{against}")
    if summary["student_ema_knn_top1"] is not None:
        ema_head = summary["student_ema_head_top1"]
        console.summary(
            f"student EMA k-NN top-1 {summary['student_ema_knn_top1']:.1f}%"
            + ("" if ema_head is None else f", head top-1 {ema_head:.1f}%")
        )
    console.summary(f"{summary['steps']} steps in {summary['wall_s']:.0f} s; run directory: {run_dir}")


def ending_line(e: BaseException) -> str:
    """The line that says why a run ended early: main() prints it to stderr, train.log records it."""
    from dali_kd.runs.preemption import Preempted

    if isinstance(e, UserError | TrainingStopped):
        return f"error: {e}"
    if isinstance(e, Preempted):
        return f"preempted: {e}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"error: {type(e).__name__}: {e} (a bug; the traceback is on stderr)"


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    from dali_kd.runs.preemption import EXIT_PREEMPTED, Preempted, StopSignal, requeue

    # First thing: a job signalled during start-up is requeued, not dropped (a signal the module's own handler
    # recorded while it was imported is taken over).
    stop = StopSignal()
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
        return 130
    except Preempted as e:
        rank0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
        if rank0:
            print(ending_line(e), file=sys.stderr, flush=True)
            requeue()
        return EXIT_PREEMPTED
    finally:
        stop.restore()
    if stop.received is not None:
        # After the last step (the final evaluation, the final weights): the run is complete, nothing to requeue.
        print(
            f"{stop.received} received after the last step: the run finished and wrote its final weights",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
