"""One distillation run, as `python -m dali_kd.train` and the Python API (`dali_kd.distill`) both start it: the run
directory claimed, the demo's data and teacher made on first use, the trainer built and run, the results said.

Imported without torch: the heavy imports come inside the run, after its stop-signal handlers are in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dali_kd.config import Config, load_config
from dali_kd.errors import TrainingStopped, UserError

if TYPE_CHECKING:
    import torch

    from dali_kd.console import Console
    from dali_kd.distributed import DistInfo
    from dali_kd.runs.directory import RunDirClaim
    from dali_kd.runs.preemption import StopSignal
    from dali_kd.training.callbacks import Callback
    from dali_kd.training.trainer import Trainer

# How a run shows its progress: a bar on a terminal and plain lines elsewhere (auto), always a bar, a plain line per
# log interval, or only warnings, errors and the final summary; train.log gets every line in every case.
Progress = Literal["auto", "bar", "lines", "quiet"]
CONSOLE_MODES = {"bar": "tty", "lines": "plain", "quiet": "quiet"}


@dataclass(frozen=True)
class Result:
    """A finished run: its directory and its summary (what summary.json holds: k-NN and head top-1 of the student
    and the teacher, steps, wall time, the verdict and advice)."""

    run_dir: Path
    summary: dict[str, Any]

    @property
    def student_weights(self) -> Path:
        """The trained student (a bare timm model, no projector): `timm.create_model(...)` loads it."""
        return self.run_dir / "student.safetensors"

    def report(self) -> Path:
        """Draw the run's report.png (loss, step time by stage, throughput, utilisation), as
        `python -m dali_kd.report RUN_DIR` does; its path."""
        from dali_kd.commands import report

        return report.draw(self.run_dir, report.read_rows(self.run_dir), report.read_summary(self.run_dir))


def distill(
    config: Config | None = None,
    *,
    resume: str | Path = "none",
    progress: Progress = "auto",
    callbacks: Sequence[Callback] = (),
    allow_config_change: bool = False,
) -> Result:
    """Run a distillation in this process, as `python -m dali_kd.train` does (config None: the demo's).

    resume: "none" (a new run), "auto" (the newest checkpoint of the run: train.run_name's, else the newest run's
    under train.output_dir; a new run if there is none) or a checkpoint's path. A mistake in the config or a path
    raises UserError, a NaN loss TrainingStopped. SIGINT, SIGTERM or SIGUSR1 during the run save a checkpoint at the
    next step boundary, then reach this program as if dali_kd had not caught them (Ctrl-C raises KeyboardInterrupt,
    a default SIGTERM ends the process); where this program's own handler returns, Preempted is raised. The run's
    signal and logging handlers are gone again when it returns, whichever way."""
    from dali_kd.runs.preemption import RUN_SIGNALS, Preempted, StopSignal

    cfg = load_config() if config is None else config
    stopped: Preempted | None = None
    # The program gets each signal back once the checkpoint is saved.
    with StopSignal(RUN_SIGNALS) as stop:
        try:
            result = run_distillation(
                cfg, stop, resume=str(resume), progress=progress, callbacks=callbacks,
                allow_config_change=allow_config_change,
            )  # fmt: skip
        except Preempted as e:
            from dali_kd import console

            # Where the checkpoint is, whatever this program's handler does next.
            console.warning(ending_line(e))
            stopped = e  # raised once the signal has reached this program's handler (which may raise instead)
    if stopped is not None:
        raise stopped
    return result


def prepare_demo(config: Config | None = None, progress: Progress = "auto") -> None:
    """Make the demo's dataset (in the folder above data.root: train/ and val/) and train the demo teacher (at
    model.teacher.checkpoint; on the demo data, each demo teacher of model.teachers), each only if missing:
    what `distill` does on first use for the demo's own paths, here for any paths (a folder that holds something
    else is refused, never overwritten)."""
    from dali_kd.commands.demo import prepare_demo as prepare
    from dali_kd.console import Console
    from dali_kd.runtime import resolve_device

    cfg = load_config() if config is None else config
    with Console(console_mode(progress)) as out:
        prepare(cfg, resolve_device(cfg.train.device), out.mode != "quiet")


def console_mode(progress: str) -> str:
    from dali_kd.console import choose_mode

    if progress == "auto":
        return choose_mode()
    if progress not in CONSOLE_MODES:
        raise UserError(f"progress: {progress!r} is not one of auto, {', '.join(CONSOLE_MODES)}")
    return CONSOLE_MODES[progress]


def run_distillation(
    cfg: Config,
    stop: StopSignal,
    *,
    resume: str = "none",
    progress: str = "auto",
    callbacks: Sequence[Callback] = (),
    allow_config_change: bool = False,
    presets: Sequence[Path] = (),
) -> Result:
    """The run, from a valid config. stop: the caller's stop-signal handlers (they end the start-up at once, then
    the loop at a step boundary with a checkpoint: Preempted). presets: said in the run's first lines."""
    mode = console_mode(progress)
    from dali_kd.cpu_budget import CpuSampler

    cpus = CpuSampler()  # what other processes do on our CPUs while the imports below run decides the threads
    # All the heavy imports happen here, while a stop signal is only recorded (an import cut short by an exception
    # leaves a half-made module behind); the first check comes right after.
    import dali_kd.commands.demo  # noqa: F401 - the heavy imports, all here: torch, numpy, timm, DALI
    import dali_kd.training.trainer  # noqa: F401
    from dali_kd import console, distributed
    from dali_kd.console import Console
    from dali_kd.models import check_model_name
    from dali_kd.models.distill import naming_teacher
    from dali_kd.runs.directory import check_writable
    from dali_kd.runtime import cpu_threads

    budget = cpus.budget(cfg.train.cpu_threads)
    threads = {"dali_threads": min(cfg.data.dali_threads, budget.threads)}
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=threads)})
    stop.check()
    for i, spec in enumerate(cfg.model.teacher_specs):
        with naming_teacher(cfg.model, i):
            check_model_name(spec.name, "teacher")
    check_model_name(cfg.model.student.name, "student")
    check_writable(Path(cfg.train.output_dir).expanduser())
    info = distributed.detect()
    # Rank 0 talks for the run and keeps its train.log; the other ranks say only warnings and errors.
    with Console(mode, rank=info.rank, train_log=info.is_main) as out, cpu_threads(budget.threads):
        console.info(budget.line())
        if presets:
            # The resolved config.yaml holds what they set; this line (and train.log) says where it came from.
            said = ", ".join(map(str, presets))
            console.info(f"presets: {said} (over the config files; KEY=VALUE overrides win)")
        try:
            return _train(cfg, info, out, stop, _Options(resume, allow_config_change, list(callbacks)))
        except BaseException as e:
            # The caller says it to the user; train.log keeps why the run ended.
            console.record(ending_line(e))
            raise


@dataclass(frozen=True)
class _Options:
    resume: str
    allow_config_change: bool
    callbacks: list[Callback]


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


def _train(cfg: Config, info: DistInfo, out: Console, stop: StopSignal, options: _Options) -> Result:
    from dali_kd import distributed
    from dali_kd.runtime import resolve_device

    # Rank 0's hold on the run directory, from before any work until the run ends.
    claims: list[RunDirClaim] = []
    device = resolve_device(cfg.train.device, info.local_rank)
    try:
        # Start-up: nothing to save yet, and a cold scan outlasts Slurm's grace time, so a stop signal ends it
        # at once (exit 75, requeued).
        with stop.interrupting():
            run_dir, resume_from, trainer = _start_up(cfg, info, out, options, device, claims)
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
    return Result(run_dir, summary)


def _start_up(
    cfg: Config,
    info: DistInfo,
    out: Console,
    options: _Options,
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
        held, resume_from = choose_run(cfg, options.resume)
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
        allow_config_change=options.allow_config_change,
        callbacks=options.callbacks,
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
        f"{cfg.model.primary_teacher.name} → {cfg.model.student.name} on {device} × {info.world_size}, backend "
        f"{cfg.data.backend}, batch {cfg.train.batch_size}{crops}{_accumulated(cfg)}, {cfg.train.epochs} epochs × "
        f"{trainer.parts.steps_per_epoch} steps; {what}"
    )


def _accumulated(cfg: Config) -> str:
    n = cfg.train.grad_accum_steps
    return "" if n == 1 else f" × {n} accumulated ({cfg.train.batch_size * n} per step)"


def _say_results(summary: dict, run_dir: Path) -> None:
    """The run's last lines: the student's top-1 against the teacher's, and the steps and time it took."""
    from dali_kd import console
    from dali_kd.console.results import teachers_said

    knn = summary["student_knn_top1"]
    if knn is not None:
        beside = [
            teachers_said(summary, "teacher_knn_top1", "{:.1f}%"),
            f"chance {summary['chance_top1']:.1f}%",
        ]
        console.summary(f"student k-NN top-1 {knn:.1f}% ({', '.join(b for b in beside if b)})")
    # With one teacher the agreement is in the evaluation lines and summary.json; the last lines stay as they were.
    agreement = teachers_said(summary, "agreement", "{:.3f}") if summary.get("agreement") is None else ""
    if agreement:
        console.summary(f"student agreement with each teacher (mean cosine): {agreement}")
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
    """The line that says why a run ended early: the command line prints it to stderr, train.log records it."""
    from dali_kd.runs.preemption import Preempted

    if isinstance(e, UserError | TrainingStopped):
        return f"error: {e}"
    if isinstance(e, Preempted):
        return f"interrupted: {e}" if e.interrupted else f"preempted: {e}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"error: {type(e).__name__}: {e} (a bug; the traceback is on stderr)"
