"""Telemetry: per-stage timing fields, NVML sampling (real absence, a fake NVML), verdicts, report, TensorBoard."""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dali_kd.commands import report
from dali_kd.data import dali_loader
from dali_kd.runtime import autocast_dtype
from dali_kd.teacher_cache import replay_ahead
from dali_kd.teacher_cache.renderer import DaliViewRenderer, view_columns
from dali_kd.teacher_cache.store import TeacherCache
from dali_kd.telemetry.monitor import RunMonitor
from dali_kd.telemetry.nvml import GPU_FIELDS, GpuSampler
from dali_kd.telemetry.throughput import RunThroughput, run_throughput
from dali_kd.telemetry.verdict import RunSetup, advice, judge
from dali_kd.training.callbacks import Callback
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rows_carry_coherent_stage_times_and_null_gpu_fields(tiny_config, tmp_path, capsys):
    summary = Trainer(
        tiny_config("train.epochs=2", "train.max_steps_per_epoch=4"), CPU, show_progress=False
    ).fit(tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    assert len(rows) == 8
    for row in rows:
        for key in ("data_ms", "teacher_ms", "student_ms", "step_ms", "img_per_s", "data_stall_pct"):
            assert row[key] is not None and row[key] >= 0, key
        # The stages add up to no more than the step.
        assert row["data_ms"] + row["teacher_ms"] + row["student_ms"] <= row["step_ms"] * 1.001
        assert 0 <= row["data_stall_pct"] <= 100
        assert row["data_stall_pct"] == pytest.approx(100 * row["data_ms"] / row["step_ms"])
        assert all(field in row and row[field] is None for field in GPU_FIELDS)
        assert row["proc_rss_mb"] > 10 and row["proc_cpu_pct"] >= 0
        assert row["verdict"] in {"input-bound", "teacher-bound", "student-bound", "balanced"}
    assert summary["verdict"] in {"input-bound", "teacher-bound", "student-bound", "balanced"}
    assert summary["data_share"] + summary["teacher_share"] + summary["student_share"] <= 1.001
    assert summary["advice"]
    out = capsys.readouterr().out
    assert "info: GPU telemetry off: no GPU in use; gpu_* fields will be null" in out
    assert re.search(r"epoch 2: (input|teacher|student)-bound|epoch 2: balanced", out), out
    assert re.search(r"epoch 1: \S+ \(data \d+%, teacher \d+%, student \d+% of step time\)", out), out


def test_telemetry_off_keeps_rows_but_no_stage_times(tiny_config, tmp_path):
    Trainer(tiny_config("train.telemetry=false"), CPU, show_progress=False).fit(tmp_path / "run")
    row = rows_of(tmp_path / "run")[0]
    assert row["step_ms"] > 0 and row["data_ms"] is None and row["verdict"] is None


def monitored_run(
    tmp_path, monkeypatch, first_ms: tuple, then_ms: tuple, steps: int = 6, every: int = 2
) -> dict:
    """The run summary of a monitor whose clock says each step took these stage times (data, teacher, student,
    the rest): what a run measures, without depending on how fast or loaded this machine is."""
    from dali_kd.telemetry import monitor as monitor_module
    from dali_kd.telemetry import timing

    clock = SimpleNamespace(now=0.0)
    clock.perf_counter = lambda: clock.now
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(monitor_module, "time", clock)
    monitor = RunMonitor(tmp_path, CPU)
    for step in range(1, steps + 1):
        monitor.timer.start_step()
        *stages, rest = first_ms if step <= every else then_ms
        for ms in stages:
            clock.now += ms / 1000
            monitor.timer.mark()
        clock.now += rest / 1000
        monitor.timer.end_step()
        if step % every == 0:
            monitor.log(step, 0, {"loss": 1.0}, every, 4 * every, 1e-3)
    monitor.close()
    return monitor.summary()


def test_a_starved_loader_is_input_bound(tmp_path, monkeypatch):
    """The original's CPU path with no workers and big JPEGs: each step waits for its batch far longer than the
    models take (the first interval, with its warm-up, is left out of the run's verdict)."""
    summary = monitored_run(tmp_path, monkeypatch, first_ms=(60, 5, 900, 5), then_ms=(240, 8, 20, 4))
    assert summary["verdict"] == "input-bound", summary
    assert "dali" in summary["advice"]
    assert summary["data_ms"] == pytest.approx(240)


def test_a_huge_teacher_on_small_inputs_is_teacher_bound(tmp_path, monkeypatch):
    summary = monitored_run(tmp_path, monkeypatch, first_ms=(5, 60, 900, 5), then_ms=(4, 180, 30, 6))
    assert summary["verdict"] == "teacher-bound", summary
    assert "cache teacher features" in summary["advice"]
    assert summary["teacher_ms"] == pytest.approx(180)


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ((50, 10, 30, 100), "input-bound"),
        ((5, 70, 20, 100), "teacher-bound"),
        ((5, 20, 70, 100), "student-bound"),
        ((10, 40, 45, 100), "balanced"),
    ],
)
def test_verdict_rules(stages, expected):
    assert judge(*stages).name == expected


class FakeNvml:
    """The pynvml calls GpuSampler makes, with fixed readings; one counter unsupported, like on some GPUs."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self):
        self.calls = 0
        self.shut_down = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.calls += 1
        return SimpleNamespace(gpu=40 + 20 * (self.calls % 2), memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=(1 + self.calls) * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 300_000  # mW

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 60 + self.calls

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980

    def nvmlDeviceGetJpgUtilization(self, handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")


def test_gpu_sampler_folds_fake_nvml_samples():
    fake = FakeNvml()
    sampler = GpuSampler([0], interval_s=3600, nvml=fake)  # the thread samples once; we add more by hand
    sampler.sample_once()
    sampler.sample_once()
    folded = sampler.collect()[0]
    sampler.close()
    assert fake.shut_down
    assert folded["gpu_util_pct"] == pytest.approx(50.0, abs=10)  # mean of 40s and 60s
    assert folded["gpu_mem_total_mb"] == 80 * 1024
    assert folded["gpu_mem_used_mb"] == (1 + fake.calls) * 1024  # the peak of the interval
    assert folded["gpu_power_w"] == 300.0 and folded["gpu_sm_clock_mhz"] == 1980
    assert folded["gpu_temp_c"] == 60 + fake.calls
    assert folded["gpu_jpeg_util_pct"] is None  # not exposed by this "GPU": null, not a failure


def test_monitor_rows_carry_fake_gpu_fields(tmp_path):
    monitor = RunMonitor(tmp_path, CPU, gpu=GpuSampler([0], nvml=FakeNvml()))
    monitor.gpu.sample_once()
    row = monitor.log(step=1, epoch=0, losses={"loss": 1.0}, steps=1, images=8, lr=0.1)
    monitor.close()
    assert row["gpu_util_pct"] is not None and row["gpu_power_w"] == 300.0
    assert monitor.summary()["peak_gpu_mem_mb"] == row["gpu_mem_used_mb"]


def test_without_nvml_fields_are_null_and_reason_given(tmp_path):
    class Broken:
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    sampler = GpuSampler([0], nvml=Broken())
    assert not sampler.available and "NVML Shared Library Not Found" in sampler.unavailable_reason
    sampler.close()
    monitor = RunMonitor(tmp_path, CPU, gpu=GpuSampler([0], nvml=Broken()))
    row = monitor.log(step=1, epoch=0, losses={"loss": 1.0}, steps=1, images=8, lr=0.1)
    monitor.close()
    assert all(row[field] is None for field in GPU_FIELDS)


# Every training path the spy runs: each touches its own part of the step (stream, targets, mixing, EMA).
HOT_LOOP_PATHS = {
    "dali": (),
    # Its PIL work runs in a DataLoader worker, as in a real run (train.num_workers defaults to 4).
    "torchvision": ("data.backend=torchvision", "train.num_workers=1"),
    "teacher-cache": ("train.cache_teacher_features=true", "train.cache_views_per_image=1"),
    "multi-crop": ("train.use_local_crops=true", "data.local_crop_size=16", "data.num_local_crops=2"),
    "mixup": ("data.augment.mix=mixup",),
    "ema": ("train.ema_decay=0.9",),
    # Each teacher in turn, its time split per teacher, one standardised.
    "two-teachers": (
        "model.teacher=null",
        "train.loss.patch_weight=0.5",
        "model.teachers=[{name: test_resnet, num_classes: 4}, {name: test_vit, num_classes: 3, standardise: true}]",
    ),
}
# The host reads of a tensor: each waits for the device on a GPU.
HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")


@pytest.mark.parametrize("path", list(HOT_LOOP_PATHS))
def test_hot_loop_reads_no_device_values_outside_log_steps(tiny_config, tmp_path, monkeypatch, path):
    """Every host read of a tensor (item, float, int, bool, tolist, numpy, cpu) and every torch.cuda.synchronize
    happens in a log step, a checkpoint or an evaluation — never in an ordinary step — on every training path.
    The teacher-cache path fills the cache in its first 6 steps and replays it in the next 6."""
    state = {"allowed": 0, "violations": [], "logged": []}

    def allow(method):
        def wrapped(*args, **kwargs):
            state["allowed"] += 1
            try:
                return method(*args, **kwargs)
            finally:
                state["allowed"] -= 1

        return wrapped

    def caller() -> str:
        """The innermost frame of this project's code (or of the library it called) that made the read."""
        frames = [f for f in traceback.extract_stack()[:-2] if "/tests/" not in f.filename]
        ours = [f for f in frames if "/dali_kd/" in f.filename or "/pipelines/" in f.filename]
        frame = (ours or frames)[-1]
        return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"

    def spy(owner, name):
        original = getattr(owner, name)

        def read(*args, **kwargs):
            if not state["allowed"]:
                state["violations"].append(f"{name} in {caller()}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, read)

    # Unfused AdamW (the CPU's default) keeps its step counter in a host-side tensor by design: no device read.
    monkeypatch.setattr(torch.optim.AdamW, "step", allow(torch.optim.AdamW.step))
    cache = (f"train.teacher_feature_dir={tmp_path / 'cache'}",) if path == "teacher-cache" else ()
    trainer = Trainer(
        tiny_config(
            "train.epochs=2", "train.max_steps_per_epoch=6", "train.log_every_n_steps=3",
            *HOT_LOOP_PATHS[path], *cache,
        ),
        CPU,
        show_progress=False,
    )  # fmt: skip

    class Logged(Callback):
        def on_log(self, trainer, row):
            state["logged"].append(row["step"])

    trainer.callbacks.append(Logged())
    trainer.log_interval = allow(trainer.log_interval)
    trainer.parts.evaluator.evaluate = allow(trainer.parts.evaluator.evaluate)
    # A checkpoint is a sync point by nature (the NaN guard's check before it included).
    monkeypatch.setattr(Trainer, "_save_if_due", allow(Trainer._save_if_due))
    # DALI's reader hands its sample ids out as host data on every pipeline: reading them waits for nothing.
    monkeypatch.setattr(dali_loader, "host_array", allow(dali_loader.host_array))
    # A pass of a DataLoader starts by drawing its seed on the host (torch's sampler): once a pass, not a step.
    monkeypatch.setattr(DataLoader, "__iter__", allow(DataLoader.__iter__))
    # The cache's fill pass copies each batch's targets to the host to store them: the one read a fill step makes
    # by nature (its replay pass must make none). Replay renders views from records read from the cache file.
    monkeypatch.setattr(TeacherCache, "write", allow(TeacherCache.write))
    monkeypatch.setattr(DaliViewRenderer, "render", allow(DaliViewRenderer.render))
    # The replay rendered ahead feeds DALI the planned records, read from the cache file into host tensors.
    monkeypatch.setattr(replay_ahead, "view_columns", allow(view_columns))
    for name in HOST_READS:
        spy(torch.Tensor, name)
    # Without CUDA the real one would raise: a call is what counts.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    spy(torch.cuda, "synchronize")
    summary = trainer.fit(tmp_path / "run")
    assert state["logged"] == [3, 6, 9, 12]
    if path == "teacher-cache":
        assert summary["cache_hits"] > 0
    assert not state["violations"], "\n".join(sorted(set(state["violations"])))


def test_report_draws_a_finished_and_a_live_run(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    Trainer(tiny_config(), CPU, show_progress=False).fit(run_dir)
    assert report.main([str(run_dir)]) == 0
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        assert img.size[0] > 800 and img.size[1] > 500
    text = capsys.readouterr().out
    assert "verdict:" in text and "finished" in text and "k-NN top-1" in text
    # A run in progress: no summary yet, and a half-written last line.
    (run_dir / "summary.json").unlink()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    png.unlink()
    assert report.main([str(run_dir)]) == 0
    assert png.is_file() and "in progress" in capsys.readouterr().out
    assert report.main([str(tmp_path / "nowhere")]) == 2


def test_tensorboard_gets_the_same_scalars(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny_config("train.tensorboard=true"), CPU, show_progress=False).fit(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "img_per_s", "data_ms", "step_ms"} <= tags
    losses = [e.value for e in events.Scalars("loss")]
    jsonl = [r["loss"] for r in rows_of(tmp_path / "run")]
    assert losses == pytest.approx(jsonl)


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        # data / teacher / student / step ms: the thresholds themselves, from both sides.
        ((30, 10, 60, 100), "input-bound"),  # data >= 25% wins whatever else dominates
        ((25, 10, 65, 100), "input-bound"),
        ((24, 10, 66, 100), "student-bound"),
        ((5, 30, 15, 100), "balanced"),  # nothing takes half the step
        ((5, 50, 33, 100), "teacher-bound"),  # half the step and 1.5x the student
        ((5, 50, 34, 100), "balanced"),  # half the step but not 1.5x the student
        ((5, 49, 20, 100), "balanced"),
        ((5, 30, 50, 100), "student-bound"),
    ],
)
def test_verdict_thresholds_at_their_boundaries(stages, expected):
    assert judge(*stages).name == expected


def test_a_metrics_file_that_times_only_some_stages_reports_without_the_breakdown():
    """Rows that time the data stage but not the teacher and student (another tool's file, or a hand-cut one):
    the report still reads them, leaving out the step breakdown and the verdict it cannot compute."""
    rows = [{"step": s, "loss": 0.5, "img_per_s": 10.0, "step_ms": 5.0, "data_ms": 2.0} for s in (1, 2)]
    text = report.text_summary(rows, None)
    assert "loss: 0.5000 → 0.5000" in text
    assert "verdict" not in text and "teacher" not in text


# ---- the advice: never what is already on, never what the device cannot do --------------------------------------
@pytest.mark.parametrize("kind", ["input-bound", "teacher-bound", "student-bound"])
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_advice_suggests_only_what_is_off_and_the_device_can_do(device, compiled, precision, kind):
    bf16 = autocast_dtype(precision, torch.device(device)) == torch.bfloat16
    setup = RunSetup(device=device, bf16=bf16, compiled_student=compiled, compiled_teacher=compiled)
    said = advice(kind, setup)
    # A suggestion names the key to set; "already compiled, in bf16" may be said, but not asked for again.
    if compiled:
        assert "train.compile_student: true" not in said and "model.teacher.compile: true" not in said, said
    if bf16:
        assert "train.precision: bf16" not in said, said
    if (
        device == "cpu"
    ):  # `auto` is fp32 there, and bf16 is no help on most CPUs; there is no GPU to decode on
        assert "bf16" not in said and "GPU" not in said, said
    # What is off and possible is suggested (else the checks above would pass on an advice that says nothing).
    if kind == "student-bound" and not compiled:
        assert "train.compile_student: true" in said, said
    if kind in ("teacher-bound", "student-bound") and device == "cuda" and not bf16:
        assert "train.precision: bf16" in said, said


def test_the_run_says_what_it_has_on_to_its_advice(tiny_config):
    cfg = tiny_config("train.compile_student=true", "train.precision=bf16", "data.backend=torchvision")
    setup = Trainer(cfg, CPU, show_progress=False).parts.run_setup(cfg, CPU)
    assert setup == RunSetup(device="cpu", bf16=True, compiled_student=True, backend="torchvision")


# ---- img/s: one definition for the progress line, summary.json and the report --------------------------------
def test_a_runs_img_per_s_leaves_out_the_warmup_interval_and_says_the_overall_apart():
    rows = [
        {"images": 8, "interval_s": 60.0, "warmup": True},  # compilation
        {"images": 16, "interval_s": 2.0, "warmup": False},
        {"images": 16, "interval_s": 2.0, "warmup": False},
        {"images": 8, "interval_s": 30.0, "warmup": True},  # a resumed process compiles again
        {"images": 16, "interval_s": 4.0, "warmup": False},
    ]
    assert run_throughput(rows) == RunThroughput(images_per_sec=48 / 8.0, images_per_sec_overall=64 / 98.0)
    assert run_throughput(rows[:1]) == RunThroughput(images_per_sec=None, images_per_sec_overall=8 / 60.0)


def test_report_and_summary_say_the_same_img_per_s_and_the_png_has_every_panel(tiny_config, tmp_path, capsys):
    from dali_kd.commands.report_figure import figure

    run_dir = tmp_path / "run"
    summary = Trainer(tiny_config(), CPU, show_progress=False).fit(run_dir)
    rows = rows_of(run_dir)
    assert [r["warmup"] for r in rows] == [True] + [False] * (len(rows) - 1)
    for row in rows:  # the progress line's figure is the same ratio, per interval
        assert row["img_per_s"] == pytest.approx(row["images"] / row["interval_s"])
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["images_per_sec"] == summary["images_per_sec"]
    steady = sum(r["images"] for r in rows[1:]) / sum(r["interval_s"] for r in rows[1:])
    assert written["images_per_sec"] == pytest.approx(steady)
    assert report.main([str(run_dir)]) == 0
    said = re.search(r"throughput: (\S+) img/s .*; (\S+) with it\)", capsys.readouterr().out)
    assert said is not None
    assert said.groups() == (f"{written['images_per_sec']:.1f}", f"{written['images_per_sec_overall']:.1f}")
    assert (run_dir / "report.png").is_file()
    fig = figure("run", rows, written)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("Accuracy") for t in titles) and any(
        t.startswith("Learning rate") for t in titles
    )
    accuracy = next(ax for ax in fig.axes if ax.get_title().startswith("Accuracy"))
    assert {"student k-NN", "teacher k-NN", "chance"} <= {line.get_label() for line in accuracy.get_lines()}
    lr = next(ax for ax in fig.axes if ax.get_title().startswith("Learning rate"))
    assert list(lr.get_lines()[0].get_ydata()) == pytest.approx([r["lr"] for r in rows])


def test_the_step_time_panel_fits_the_steady_state_and_marks_the_compile_interval():
    from dali_kd.commands.report_figure import figure

    rows = [
        {"step": s, "loss": 1.0, "img_per_s": 1.0, "step_ms": ms, "lr": 1e-3, "warmup": s == 1}
        for s, ms in ((1, 60_000.0), (2, 100.0), (3, 110.0), (4, 90.0))
    ]
    axes = figure("run", rows, None).axes
    step_time = next(ax for ax in axes if ax.get_title().startswith("Step time"))
    assert step_time.get_ylim()[1] < 200, "the y-axis fits the steady state"
    assert any("60,000 ms" in text.get_text() for text in step_time.texts), "the compile interval is marked"
    accuracy = next(ax for ax in axes if ax.get_title().startswith("Accuracy"))
    assert any("once the run has finished" in text.get_text() for text in accuracy.texts)
