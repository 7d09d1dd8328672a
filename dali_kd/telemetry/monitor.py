"""One metrics row per log interval: losses, per-stage timing, GPU and process telemetry, and the verdict."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dali_kd import console
from dali_kd.telemetry.nvml import GPU_FIELDS, GpuSampler
from dali_kd.telemetry.process import ProcessSampler, peak_resident_mb
from dali_kd.telemetry.sinks import MetricsSink
from dali_kd.telemetry.throughput import images_per_second, run_throughput
from dali_kd.telemetry.timing import STAGES, StepTimer
from dali_kd.telemetry.verdict import RunSetup, Verdict, judge


class _StageTotals:
    """Step-weighted sums of stage and step times, for verdicts over an epoch or the whole run."""

    def __init__(self):
        self.steps = 0
        self.ms = dict.fromkeys(("data", "teacher", "student", "step"), 0.0)

    def add(self, row: dict[str, Any], steps: int) -> None:
        if row.get("data_ms") is None:
            return
        self.steps += steps
        for stage in self.ms:
            self.ms[stage] += row[f"{stage}_ms"] * steps

    def verdict(self) -> Verdict | None:
        if not self.steps:
            return None
        return judge(*(self.ms[s] / self.steps for s in ("data", "teacher", "student", "step")))

    def means(self) -> dict[str, float | None]:
        return {f"{s}_ms": (self.ms[s] / self.steps if self.steps else None) for s in self.ms}


class RunMonitor:
    """Owns the step timer and the samplers; `log()` turns an interval into a row and writes it."""

    def __init__(
        self,
        run_dir: Path,
        device: torch.device,
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        main_rank: bool = True,
        gpu: GpuSampler | None = None,
        training_clock: Callable[[], float] | None = None,
        setup: RunSetup | None = None,
    ):
        """enabled: measure (timers, samplers); main_rank: this process says what it cannot measure and writes the
        rows (the other ranks' would only repeat rank 0's). gpu: the GPU sampler; by default one for the
        training device, none on CPU. training_clock: the run's training seconds so far (evaluation and
        checkpoints not counted), which each interval's `interval_s` is measured on; by default the wall clock
        since the last log or restart_interval(). setup: what the run has switched on, so that the advice
        suggests only the rest."""
        self.enabled = enabled
        self.setup = setup or RunSetup(device=device.type)
        self.timer = StepTimer(device, enabled=enabled)
        if gpu is None and enabled:
            gpu = GpuSampler([device.index or 0] if device.type == "cuda" else [])
        self.gpu = gpu if enabled else None
        indices = self.gpu.device_indices if self.gpu is not None else []
        self.gpu_index = indices[0] if indices else None
        if self.gpu is not None and not self.gpu.available and main_rank:
            console.info(f"info: GPU telemetry off: {self.gpu.unavailable_reason}; gpu_* fields will be null")
        self.process = ProcessSampler() if enabled else None
        self.sink = MetricsSink(run_dir, tensorboard=tensorboard) if main_rank else None
        self.epoch_totals = _StageTotals()
        self.run_totals = _StageTotals()  # every interval but the first
        self.all_totals = _StageTotals()
        self._first_interval = True
        self.peak_gpu_mem_mb: float | None = None
        self._rows: list[dict[str, Any]] = []  # what run_throughput reads, where no metrics file is written
        self._clock = training_clock
        self._interval_start = self._now()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.perf_counter()

    def restart_interval(self) -> None:
        """Exclude time spent outside training steps (evaluation) from the next interval (a training clock
        already leaves it out)."""
        if self._clock is None:
            self._interval_start = self._now()
        if self.process is not None:
            self.process.collect()

    def log(
        self, step: int, epoch: int, losses: dict[str, float], steps: int, images: int, lr: float
    ) -> dict:
        now = self._now()
        elapsed, self._interval_start = now - self._interval_start, now
        row: dict[str, Any] = {"step": step, "epoch": epoch, **losses, "lr": lr}
        row["img_per_s"] = images_per_second(images, elapsed) or 0.0
        row["images"] = images
        row["interval_s"] = elapsed
        # The first interval holds compilation and warm-up: img/s and the verdict of the run leave it out.
        row["warmup"] = self._first_interval
        row["step_ms"] = 1000 * elapsed / max(1, steps)
        stages = self.timer.collect() if self.enabled else {f"{s}_ms": None for s in STAGES}
        row.update(stages)
        row["data_stall_pct"] = (
            100 * min(1.0, row["data_ms"] / row["step_ms"])
            if row["data_ms"] is not None and row["step_ms"]
            else None
        )
        gpu = (
            self.gpu.collect().get(self.gpu_index, {})
            if self.gpu is not None and self.gpu.available and self.gpu_index is not None
            else {}
        )
        row.update({field: gpu.get(field) for field in GPU_FIELDS})
        if row["gpu_mem_used_mb"] is not None:
            self.peak_gpu_mem_mb = max(self.peak_gpu_mem_mb or 0.0, row["gpu_mem_used_mb"])
        row.update(
            self.process.collect()
            if self.process is not None
            else {"proc_cpu_pct": None, "proc_rss_mb": None}
        )
        verdict = None
        if row["data_ms"] is not None:
            verdict = judge(row["data_ms"], row["teacher_ms"], row["student_ms"], row["step_ms"])
        row["verdict"] = verdict.name if verdict else None
        self.epoch_totals.add(row, steps)
        self.all_totals.add(row, steps)
        # The first interval would also mislabel the run as student-bound.
        if not self._first_interval:
            self.run_totals.add(row, steps)
        self._first_interval = False
        if self.sink is not None:
            self.sink.write(row)
        else:
            self._rows.append(row)
        return row

    def end_epoch(self) -> Verdict | None:
        verdict = self.epoch_totals.verdict()
        self.epoch_totals = _StageTotals()
        return verdict

    def summary(self) -> dict[str, Any]:
        """Run-level verdict and mean stage times (all intervals if there was only the first one)."""
        totals = self.run_totals if self.run_totals.steps else self.all_totals
        verdict = totals.verdict()
        out: dict[str, Any] = verdict.as_dict(self.setup) if verdict else {"verdict": None}
        out.update(totals.means())
        # The metrics file holds a resumed run's earlier intervals too: the figure covers the whole run.
        out.update(run_throughput(self.sink.rows() if self.sink is not None else self._rows).as_dict())
        out["peak_gpu_mem_mb"] = self.peak_gpu_mem_mb
        out["peak_rss_mb"] = peak_resident_mb()
        return out

    @staticmethod
    def summary_line(summary: dict[str, Any]) -> str:
        shares = Verdict(
            summary["verdict"], summary["data_share"], summary["teacher_share"], summary["student_share"]
        ).line()
        return f"{shares}: {summary['advice']}"

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
        if self.sink is not None:
            self.sink.close()
