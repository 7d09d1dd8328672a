"""The distillation loop: step-capped epochs over one data stream; each step is targets → task → backward (over
train.grad_accum_steps batches), clip, step.

The parts it drives, each in its own module: the data stream (dali_kd.data.loaders), the teacher targets
(dali_kd.teacher_cache.targets), the distillation task (dali_kd.training.task), the run state (dali_kd.training.run_state), the checkpointer
(dali_kd.training.checkpointer), the NaN guard (dali_kd.training.nonfinite), telemetry (dali_kd.telemetry) and the run files
(dali_kd.training.run_files).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from dali_kd import console, distributed
from dali_kd.config import Config
from dali_kd.console import eval_line
from dali_kd.data import Batch
from dali_kd.distributed import DistInfo
from dali_kd.evaluation.agreement import teacher_metric
from dali_kd.evaluation.evaluator import EvalResult, evaluate_student, evaluate_teachers
from dali_kd.models import FrozenTeacher
from dali_kd.runs.preemption import Preempted, StopSignal
from dali_kd.telemetry.interval import IntervalLosses
from dali_kd.telemetry.monitor import RunMonitor
from dali_kd.telemetry.timing import StepTimer
from dali_kd.training.build import build_run
from dali_kd.training.callbacks import Callback
from dali_kd.training.checkpointer import Checkpointer
from dali_kd.training.optim import current_lr
from dali_kd.training.run_files import run_summary, start_run_dir, write_final

__all__ = ["Trainer"]


def mean_losses(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A step's losses from its batches' (each the mean over its images): their mean, or the one batch's own."""
    if len(batches) == 1:
        return batches[0]
    return {name: torch.stack([losses[name] for losses in batches]).mean() for name in batches[0]}


class Trainer:
    """Builds the data stream, the teacher and the student for one process (one rank), then `fit()` trains."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        show_progress: bool = True,
        dist_info: DistInfo | None = None,
        resume_from: Path | None = None,
        allow_config_change: bool = False,
        callbacks: list[Callback] | None = None,
    ):
        self.cfg = cfg
        self.device = device
        self.dist = dist_info or DistInfo()
        # A bar or a line per log interval, as the open console's mode says (dali_kd.console); rank 0 only.
        self.show_progress = show_progress and self.dist.is_main
        self.callbacks = list(callbacks or [])
        # The run's parts (build.RunParts), used where they are: the loop keeps only its own clocks and files.
        self.parts = build_run(cfg, device, self.dist, resume_from, allow_config_change)
        self.total_steps = self.parts.steps_per_epoch * cfg.train.epochs
        self.resumed_from = resume_from
        # Made for a run directory by fit(); a disabled timer lets train_step run on its own.
        self.timer = StepTimer(device, enabled=False)
        self.monitor: RunMonitor | None = None
        self.checkpointer: Checkpointer | None = None
        self.run_dir: Path | None = None
        self.interval = IntervalLosses(self.dist.world_size)
        # Made by fit(): a bar on a terminal, else a line per log interval (show_progress=False: train.log only).
        self.progress = console.current().progress(self.total_steps, 0, cfg.train.epochs, show=False)
        self._micro_losses: list[dict[str, torch.Tensor]] = []  # the step under way's batches so far

    @property
    def step(self) -> int:
        return self.parts.state.step

    # ---- what fit() makes for its run directory --------------------------------------------------------------
    @property
    def _checkpointer(self) -> Checkpointer:
        if self.checkpointer is None:
            raise RuntimeError("no checkpointer outside fit()")
        return self.checkpointer

    @property
    def _monitor(self) -> RunMonitor:
        if self.monitor is None:
            raise RuntimeError("no run monitor outside fit()")
        return self.monitor

    # ---- one step --------------------------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        """Which batch of step `step + 1` trains next (0-based; always 0 with train.grad_accum_steps=1)."""
        return len(self._micro_losses)

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Teacher targets and the student's forward/backward on one batch; after a step's last batch (every batch
        with train.grad_accum_steps=1) the clipped AdamW update. Losses stay on the device: the batch's own, and
        after a step's last batch the step's (the mean over its batches)."""
        accum = self.cfg.train.grad_accum_steps
        last = self.micro_batch == accum - 1
        targets = self.parts.targets.targets(batch, self.parts.state.step + 1)
        self.timer.mark()  # teacher
        # The batches before a step's last one add to the gradients without DDP's all-reduce.
        with nullcontext() if last else self.parts.task.no_sync():
            losses = self.parts.task(batch, targets)
            if self.micro_batch == 0:
                self.parts.optimizer.zero_grad(set_to_none=True)
            # Each batch's mean loss weighs 1/N: the summed gradient is that of the mean loss over the N batches.
            (losses["loss"] / accum if accum > 1 else losses["loss"]).backward()
        losses = {k: v.detach() for k, v in losses.items()}
        if not last:
            self._micro_losses.append(losses)
            self.timer.mark()  # student
            return losses
        losses = mean_losses([*self._micro_losses, losses])
        self._micro_losses = []
        self._update(losses["loss"])
        self.timer.mark()  # student
        self.parts.state.step += 1
        return losses

    def _update(self, loss: torch.Tensor) -> None:
        """The optimizer update of step `step + 1` from its gradients (skipped on a non-finite loss, as the guard
        says); `loss`: the step's mean loss."""
        step = self.parts.state.step + 1
        # The lr of update n is a function of n alone (timm's step_update): a resumed run sets the same lr.
        self.parts.scheduler.step_update(step)
        last = self.checkpointer.last if self.checkpointer else self.resumed_from
        if self.parts.guard.should_skip(loss, step, last):
            self.parts.optimizer.zero_grad(set_to_none=True)
            return
        if self.cfg.train.optimizer.grad_clip is not None:
            # Once per update, on the summed gradient. The norm and the scaling stay on the device (torch's
            # multi-tensor kernels on CPU and CUDA); no error_if_nonfinite, which reads the norm: the guard above
            # flags a non-finite loss.
            torch.nn.utils.clip_grad_norm_(
                self.parts.student.parameters(), self.cfg.train.optimizer.grad_clip
            )
        self.parts.optimizer.step()
        if self.parts.ema is not None:
            self.parts.ema.update(self.parts.student, step)

    def _next_step(self, stream: Iterator[Batch]) -> tuple[dict[str, torch.Tensor], int]:
        """One step: train.grad_accum_steps batches from the stream, each shown to the callbacks and trained on;
        the step's losses and how many images it trained on."""
        self.timer.start_step()
        images = 0
        for _ in range(self.cfg.train.grad_accum_steps):
            batch = next(stream)
            self.timer.mark()  # data
            for callback in self.callbacks:
                callback.on_step(self, batch)
            losses = self.train_step(batch)
            images += len(batch)
        self.timer.end_step()
        return losses, images

    # ---- the run ---------------------------------------------------------------------------------------------
    def fit(self, run_dir: Path) -> dict[str, Any]:
        """Train to cfg.train.epochs step-capped epochs from wherever the run stands; rank 0 writes run_dir.

        Raises Preempted (after a checkpoint) when SIGUSR1/SIGTERM arrives, TrainingStopped on a NaN loss.
        """
        cfg, state = self.cfg, self.parts.state
        self.run_dir = run_dir
        state.start_clocks()
        self.checkpointer = Checkpointer(
            run_dir,
            cfg,
            dist=self.dist,
            steps_per_epoch=self.parts.steps_per_epoch,
            states=self.parts.checkpoint_states(),
            stream=self.parts.stream,
            identity=self.parts.checkpoint_identity(),
            resumed_from=self.resumed_from,
        )
        if self.dist.is_main:
            start_run_dir(run_dir, cfg, state.step)
            self.parts.quarantine.start(run_dir)
        self.monitor = RunMonitor(
            run_dir,
            self.device,
            # Rank 0 measures and writes; the other ranks' rows would only repeat it.
            enabled=cfg.train.telemetry and self.dist.is_main,
            tensorboard=cfg.train.tensorboard and self.dist.is_main,
            main_rank=self.dist.is_main,
            training_clock=state.training_seconds,
            setup=self.parts.run_setup(cfg, self.device),
        )
        self.timer = self.monitor.timer
        self.parts.targets.time_teachers(self.timer.split)
        stop = StopSignal()
        self.progress = console.current().progress(
            self.total_steps, state.step, cfg.train.epochs, show=self.show_progress
        )
        try:
            keys = cfg.model.teacher_keys
            if state.result(teacher_metric("teacher_knn_top1", keys[0], len(keys))) is None:
                teacher = evaluate_teachers(self.parts.evaluator, self.teachers)
                if teacher is not None:
                    for key, value in teacher.items():
                        state.record(key, value)
                    if self.dist.is_main:
                        console.info(eval_line(None, teacher))
                self.parts.quarantine.gather()  # what evaluation set aside
            stream = iter(self.parts.stream)
            self.parts.student.train()
            self.monitor.restart_interval()
            while state.epoch < cfg.train.epochs:
                state.resume_training_clock()
                self._run_epoch(stream, stop)
                state.pause_training_clock()
                self._end_epoch()
        finally:
            stop.restore()
            self.progress.close()
            self.monitor.close()
            self.parts.stream.close()
        return self._finish(run_dir)

    def _run_epoch(self, stream: Iterator[Batch], stop: StopSignal) -> None:
        """The rest of the current step-capped epoch: the next batches of the continuing stream."""
        cfg, state = self.cfg.train, self.parts.state
        # Ranks agree on a stop signal at these steps (every step in a single process: reading a flag is free). A
        # signal that arrives between a step's batches is acted on once the step is done: checkpoints hold whole
        # updates.
        agree_every = 1 if not self.dist.is_distributed else min(cfg.log_every_n_steps, 10)
        while state.step_in_epoch < self.parts.steps_per_epoch:
            losses, images = self._next_step(stream)
            state.step_in_epoch += 1
            self.interval.add(losses, images, counted=self.parts.guard.counts(losses["loss"]))
            self.progress.advance()
            if state.step % cfg.log_every_n_steps == 0 or state.step == self.total_steps:
                self.log_interval()
            if state.step % agree_every == 0 and distributed.any_rank(stop.received is not None, self.device):
                self._save_if_due(state.step, preempted=True)
                raise Preempted(self._checkpointer.last, stop.received or "stop signal on another rank")
            self._save_if_due(state.step)

    def _end_epoch(self) -> None:
        cfg, state = self.cfg.train, self.parts.state
        verdict = self._monitor.end_epoch()
        if verdict is not None and self.dist.is_main:
            console.info(f"epoch {state.epoch + 1}: {verdict.line()}")
        if state.epoch == cfg.epochs - 1 or (state.epoch + 1) % cfg.eval_every_n_epochs == 0:
            for callback in self.callbacks:
                callback.on_evaluate(self)
            results = self.evaluate_student()
            if results:
                for name, result in results.items():
                    for key, value in result.as_dict(name).items():
                        state.record(key, value)
                said = {k: v for name, r in results.items() for k, v in r.as_dict(name).items()}
                state.knn_history.append({"epoch": state.epoch + 1, "step": state.step, **said})
                if self.dist.is_main:
                    console.info(eval_line(state.epoch + 1, said))
            self.parts.quarantine.gather()  # what evaluation set aside
            self._monitor.restart_interval()
        state.epoch += 1
        state.step_in_epoch = 0
        self._save_if_due(state.step, epoch_end=True)

    @property
    def teachers(self) -> dict[str, FrozenTeacher]:
        """The frozen teachers by key, in config order."""
        return dict(zip(self.parts.teacher_keys, self.parts.teachers, strict=True))

    def evaluate_student(self) -> dict[str, EvalResult]:
        """{"student": ..., "student_ema": ...} (the EMA's when kept); empty without held-out images."""
        results = {
            "student": evaluate_student(
                self.parts.evaluator,
                self.parts.student,
                self.parts.amp_dtype,
                teachers=self.teachers,
                unstandardise=self.parts.standardiser.unstandardise if self.parts.standardiser else None,
            )
        }
        if self.parts.ema is not None:
            results["student_ema"] = evaluate_student(
                self.parts.evaluator, self.parts.student, self.parts.amp_dtype, self.parts.ema.backbone
            )
        return {name: r for name, r in results.items() if r is not None}

    def log_interval(self) -> None:
        """The only host reads of the loop: loss sums (averaged over ranks) and stage events, once per interval."""
        state = self.parts.state
        self.parts.guard.check(state.step, self._checkpointer.last)
        means = {**self.interval.means(), **self.parts.targets.interval_metrics()}
        images = self.interval.images * self.dist.world_size
        lr = current_lr(self.parts.optimizer)  # the last update's
        row = self._monitor.log(state.step, state.epoch, means, self.interval.steps, images, lr)
        self.interval.reset()
        state.final_loss = row["loss"]
        self.progress.report(row)
        for callback in self.callbacks:
            callback.on_log(self, row)

    # ---- checkpoints and the end -----------------------------------------------------------------------------
    def _save_if_due(self, step: int, epoch_end: bool = False, preempted: bool = False) -> None:
        """Checkpoint when the checkpointer says it is due (every rank calls it). Never save a NaN-poisoned state;
        checkpoint time is not training time; files set aside go in too."""
        if not self._checkpointer.due(step, epoch_end, preempted):
            return
        state = self.parts.state
        self.parts.guard.check(state.step, self._checkpointer.last)
        clock_was_running = state.pause_training_clock()
        self.parts.quarantine.gather()
        path = self._checkpointer.save(step)
        if clock_was_running:
            state.resume_training_clock()
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)

    def _finish(self, run_dir: Path) -> dict[str, Any]:
        self.parts.quarantine.gather()
        cfg, state = self.cfg, self.parts.state
        state.update_wall()
        summary = {
            **run_summary(cfg, state, self.parts, self.dist.world_size, str(self.device)),
            **self.parts.targets.summary(),
            "skipped_steps": self.parts.guard.skipped_steps,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "last_checkpoint": str(self._checkpointer.last) if self._checkpointer.last else None,
            **self._monitor.summary(),
            "wall_s": state.wall_s,
        }
        for callback in self.callbacks:
            callback.on_finish(self, summary)
        if self.dist.is_main:
            write_final(
                run_dir,
                self.parts.student,
                summary,
                self.parts.ema.backbone if self.parts.ema is not None else None,
                self.parts.standardiser,
            )
            if summary["verdict"]:
                console.info(f"run: {self._monitor.summary_line(summary)}")
        distributed.barrier()
        return summary
