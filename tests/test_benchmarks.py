"""The benchmark scripts run (in --quick mode, on tiny data) and write results with the expected fields.

No timing is asserted: speed is measured by the scripts themselves and recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_paths  # noqa: E402
import gpu_summary  # noqa: E402
from make_dataset import make_dataset  # noqa: E402

from dali_kd.config import load_config  # noqa: E402


def test_make_dataset_is_imagenet_like_and_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", num_images=40, num_classes=4, seed=3, jobs=1)
    b = make_dataset(tmp_path / "b", num_images=40, num_classes=4, seed=3, jobs=2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files_a) == 40 and len({p.parts[0] for p in files_a}) == 4
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.JPEG"))
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files_a), "same seed, same bytes"
    sizes = np.array([Image.open(a / p).size for p in files_a])
    assert 300 <= sizes.max(axis=1).mean() <= 800 and (sizes[:, 0] != sizes[:, 1]).mean() > 0.5
    with Image.open(a / files_a[0]) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    # Natural-image-like: neighbouring pixels are strongly correlated (noise would not be).
    assert np.corrcoef(pixels[:, :-1].ravel(), pixels[:, 1:].ravel())[0, 1] > 0.8
    mtime = (a / files_a[0]).stat().st_mtime_ns
    make_dataset(a, num_images=40, num_classes=4, seed=3)
    assert (a / files_a[0]).stat().st_mtime_ns == mtime, "a complete tree is not rebuilt"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_result(tmp_path):
    """benchmarks/gpu_check.sh at toy sizes on the CPU: every part runs and leaves its result file in the one
    archive that comes back beside the table (at most 8 files), every training path trains, every step is set
    beside its floor, the ablation and the profile are tabulated, and the last thing printed is the table."""
    sent = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(sent), "WORK": str(tmp_path / "work")}
    # The script runs `python3` as the GPU machine has it: here, the interpreter running the tests (a virtual
    # environment's, also when it is not activated).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,  # ~4 minutes on 2 free cores; slower on a busy machine
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in sent.iterdir()} == {"gpu_check.tar.gz", "gpu_check.md", "log.txt"}
    out = tmp_path / "unpacked"
    out.mkdir()
    with tarfile.open(sent / "gpu_check.tar.gz") as archive:
        archive.extractall(out, filter="data")
    for part in gpu_summary.PARTS:
        status = json.loads((out / "parts" / f"{part}.json").read_text())
        assert status["rc"] == 0, (part, (out / f"{part}.log").read_text()[-3000:])
    assert "python" in (out / "versions.txt").read_text()
    assert "skipped" in (out / "gpu_tests.log").read_text()  # no GPU here

    paths = json.loads((out / "paths" / "paths.json").read_text())
    assert [r["path"] for r in paths["paths"]] == [p.name for p in gpu_paths.PATHS]
    for record in paths["paths"]:
        assert record["ok"] and record["compiled"], record
        assert record["steps"] == record["expected_steps"] and record["ms_per_step"] > 0
        assert set(record["batch_devices"].values()) == {"cpu"} and not record["off_device_fields"]
    cache = next(r for r in paths["paths"] if r["path"] == "dali cache fill + replay")
    assert cache["cache_hits"] > 0 and cache["replayed_batches"] > 0
    multi_crop = next(r for r in paths["paths"] if r["path"] == "dali multi-crop")
    assert "local_images" in multi_crop["batch_devices"]

    reference = json.loads((out / "reference_step.json").read_text())
    (ref,) = reference["results"]
    for key in ("step_ms", "img_per_s", "data_stall_pct", "data_ms", "teacher_ms", "student_ms"):
        assert ref[key] is not None and ref[key] >= 0, key
    assert "gpu_jpeg_util_pct" in ref and ref["gpu_jpeg_util_pct"] is None  # no NVML on the CPU
    floor = reference["floor"]
    assert reference["ratios"]["dali_step_vs_floor"] == pytest.approx(ref["step_ms"] / floor["step_ms"])
    split = ref["split"]
    assert split["optimizer_timed_apart"] and split["parts_ms"]["optimizer_ms"] > 0
    assert split["parts_ms"]["student_ms"] + split["parts_ms"]["optimizer_ms"] == pytest.approx(
        ref["student_ms"]
    )
    assert split["vs_floor"]["step"] == pytest.approx(ref["step_ms"] / floor["step_ms"])
    ablation = json.loads((out / "ablation.json").read_text())
    assert [c["name"] for c in ablation["candidates"]][:2] == ["defaults", "train.telemetry=false"]
    assert len(ablation["candidates"][0]["ms"]) == 2  # timed first and last: the noise
    assert "| defaults |" in (out / "ablation.log").read_text()
    profile = json.loads((out / "profile.json").read_text())
    assert profile["steps"] == 2 and profile["top_ops"] and profile["gpu_busy_pct"] is None
    two = json.loads((out / "two_teachers_step.json").read_text())
    assert two["floor"]["teacher"] == "test_resnet,test_convnext" and two["results"][0]["step_ms"] > 0
    assert {"teacher_ms_test_resnet", "teacher_ms_test_convnext"} <= set(two["floor"])
    assert two["ratios"]["dali_step_vs_floor"] == pytest.approx(
        two["results"][0]["step_ms"] / two["floor"]["step_ms"]
    )
    assert "test_resnet + test_convnext → test_vit" in (out / "two_teachers_step.md").read_text()
    tiny = json.loads((out / "tiny_step.json").read_text())
    assert tiny["results"][0]["step_ms"] > 0 and tiny["floor"]["student"] == "test_vit"
    op_costs = json.loads((out / "dali_op_costs.json").read_text())
    assert [r["stage"] for r in op_costs["stages"]][0] == "decode crop window"
    cache_step = json.loads((out / "cache_step.json").read_text())
    by_mode = {r["backend"]: r for r in cache_step["results"]}
    assert set(by_mode) == {"dali+cache", "dali+student-only"}
    assert cache_step["ratios"]["cached_vs_student_only_step"] == pytest.approx(
        by_mode["dali+cache"]["step_ms"] / by_mode["dali+student-only"]["step_ms"]
    )
    assert by_mode["dali+cache"]["teacher_forward_batches"] > 0  # the fill pass
    assert by_mode["dali+student-only"]["teacher_forward_batches"] == 0
    assert cache_step["floor"]["from"].endswith("reference_step.json"), "the visit's floor, measured once"
    assert cache_step["ratios"]["dali+student-only_step_vs_floor"] == pytest.approx(
        by_mode["dali+student-only"]["step_ms"] / floor["student_ms"]
    )

    augment = json.loads((out / "augment.json").read_text())
    assert {r["backend"] for r in augment["results"]} == {"torchvision", "dali_raw", "dali_cpu"}
    for row in augment["results"]:
        assert row["img_per_s"] > 0 and row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"]
    multi = json.loads((out / "multi_crop.json").read_text())
    crops = {(r["backend"], r["crops"]) for r in multi["multi_crop"]}
    assert crops == {
        (backend, setting)
        for backend in ("torchvision", "dali_cpu")
        for setting in ("one view", "2 global", "2 global + 4 local")
    }

    summary = json.loads((out / "gpu_check.json").read_text())
    met = {row["part"].split(" (")[0]: row["met"] for row in summary["targets"]}
    assert met["training paths"] == "yes" and met["gpu tests"] == "n/a (skipped: no GPU)"
    assert len(summary["targets"]) == 16
    assert met["mixing per batch / reference step"] == "n/a (not on a GPU)", (
        "the mix_cost part ran and was read"
    )
    measured = [row for row in summary["targets"][2:] if row["met"] != "info"]
    assert all(row["met"] == "n/a (not on a GPU)" for row in measured), summary["targets"]
    assert [row["part"] for row in summary["targets"] if row["met"] == "info"] == [
        "ablation: fastest overrides", "tiny step: fixed cost per step", "DALI CPU mode: CPU ms per image by stage",
    ]  # fmt: skip
    table = (sent / "gpu_check.md").read_text().strip()
    assert result.stdout.strip().endswith(table) and table.startswith("| part | measured | target | met? |")
    assert not any(p.stat().st_size > 2**20 for p in out.rglob("*")), "nothing big comes back from the visit"


def test_telemetry_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "telemetry_overhead.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["step_ms_telemetry_on"] > 0 and report["step_ms_telemetry_off"] > 0
    assert report["direct_cost"]["per_step_ms"] > 0 and report["direct_overhead_pct"] >= 0
    assert "telemetry calls timed directly" in result.stdout


def write_visit(out: Path, **overrides) -> Path:
    """The result files a GPU visit leaves under $OUT, with made-up figures (each part's file, or None: absent)."""
    files = {
        "gpu_tests.log": "....\n12 passed, 1 warning in 31.02s\nexit 0\n",
        "paths/paths.json": {
            "device": "cuda",
            "paths": [
                {"path": p.name, "ok": True, "error": None, "ms_per_step": 12.5} for p in gpu_paths.PATHS
            ],
        },
        "reference_step.json": {
            "results": [
                {"backend": "dali", "step_ms": 38.0, "img_per_s": 6737.0, "data_stall_pct": 2.5,
                 "gpu_jpeg_util_pct": 41.0, "device": "cuda"}
            ],
            "ratios": {"dali_step_vs_floor": 1.2},
            "floor": {"step_ms": 31.7, "student_ms": 19.0, "teacher_ms": 12.0, "optimizer_ms": 1.0},
        },
        "two_teachers_step.json": {
            "results": [{"backend": "dali", "step_ms": 61.0, "img_per_s": 4197.0, "device": "cuda"}],
            "ratios": {"dali_step_vs_floor": 0.98},
            "floor": {"step_ms": 62.2, "student_ms": 19.0, "teacher_ms": 43.0, "optimizer_ms": 1.0,
                      "teacher_ms_vit_base_patch16_224": 29.0, "teacher_ms_resnet50": 14.0},
        },
        "cache_step.json": {
            "results": [
                {"backend": "dali+cache", "step_ms": 24.0, "device": "cuda"},
                {"backend": "dali+student-only", "step_ms": 20.0, "device": "cuda"},
            ],
            "ratios": {"cached_vs_student_only_step": 1.2, "dali+student-only_step_vs_floor": 1.05},
            "floor": {"step_ms": 31.7, "student_ms": 19.0, "teacher_ms": 12.0, "optimizer_ms": 1.0},
        },
        "mix_cost.json": {
            "device": "cuda", "batch_size": 256, "size": 224, "ms": {"mixup": 0.3, "cutmix": 0.25, "both": 0.4},
        },
        "augment.json": {
            "settings": {"image_size": 224},
            "results": [
                {"backend": "torchvision", "workers": 16, "decode": None, "img_per_s": 3000.0},
                {"backend": "dali_raw_gpu", "workers": 8, "decode": "window", "img_per_s": 14000.0},
                {"backend": "dali_gpu", "workers": 8, "decode": "window", "img_per_s": 13000.0},
                {"backend": "dali_gpu", "workers": 8, "decode": "full", "img_per_s": 11000.0},
            ],
        },
        "multi_crop.json": {
            "multi_crop": [
                {"backend": "dali_gpu", "crops": "2 global", "cost_vs_global_only": 1.0},
                {"backend": "dali_gpu", "crops": "2 global + 8 local", "cost_vs_global_only": 1.6},
                {"backend": "torchvision", "crops": "2 global + 8 local", "cost_vs_global_only": 1.9},
            ]
        },
    }  # fmt: skip
    files.update(overrides)
    (out / "parts").mkdir(parents=True)
    for part in gpu_summary.PARTS:
        (out / "parts" / f"{part}.json").write_text(json.dumps({"part": part, "rc": 0, "timeout_s": 60}))
    for name, content in files.items():
        if content is not None:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return out


def test_summary_says_which_gpu_targets_are_met(tmp_path):
    summary = gpu_summary.summarize(write_visit(tmp_path / "out"))
    met = [(row["part"], row["met"]) for row in summary["targets"]]
    assert met == [
        ("gpu tests", "yes"),
        ("training paths (compiled student)", "yes"),
        ("reference step / same-run floor", "no"),  # 1.2x > 1.0x
        ("reference step ms/step", "yes"),  # 38 ms <= 40
        ("reference step data stall", "no"),  # 2.5% >= 2%
        ("two-teacher step / same-run floor", "yes"),  # 0.98x <= 1.0x
        ("cached step / student-only step", "no"),  # 1.2 > 1.05
        ("student-only step / its floor", "yes"),  # 1.05 <= 1.10
        ("mixing per batch / reference step", "yes"),  # the worst kind, 0.4 ms of 38 ms: 1.05% <= 2%
        ("DALI GPU augmentation, 224 px", "yes"),  # the loader's best, 13,000 >= 12,000
        ("DALI GPU / torchvision 16 workers", "yes"),  # 13,000 / 3,000 = 4.3
        ("multi-crop cost per image vs 2 global (dali_gpu)", "no"),  # 1.6 > 1.5
        ("ablation: fastest overrides", "not measured"),  # parts this visit's files leave out
        ("profile: GPU busy, host syncs per step", "not measured"),
        ("tiny step: fixed cost per step", "not measured"),
        ("DALI CPU mode: CPU ms per image by stage", "not measured"),
    ]
    measured = {row["part"]: row["measured"] for row in summary["targets"]}
    assert "GPU JPEG decoder 41%" in measured["reference step ms/step"]
    assert (
        "floor's teachers: vit_base_patch16_224 29.0, resnet50 14.0 ms"
        in measured["two-teacher step / same-run floor"]
    )
    assert "window/full 1.18×" in measured["DALI GPU augmentation, 224 px"]
    assert measured["mixing per batch / reference step"].startswith(
        "1.05% (mixup 0.30, cutmix 0.25, both 0.40 ms"
    )
    assert (tmp_path / "out" / "gpu_check.md").read_text().count("\n") == 2 + len(met)


def test_summary_names_what_was_not_measured_and_why(tmp_path):
    out = write_visit(
        tmp_path / "out",
        **{
            "gpu_tests.log": "F...\n1 failed, 11 passed in 30.00s\nexit 1\n",
            "reference_step.json": None,
            "two_teachers_step.json": None,
            "augment.json": {
                "settings": {"image_size": 224},
                "results": [
                    {"backend": "torchvision", "workers": 16, "img_per_s": 4000.0},
                    {"backend": "dali_gpu", "workers": 8, "decode": "window", "img_per_s": 11000.0},
                ],
            },
        },
    )
    (out / "parts" / "reference_step.json").write_text(json.dumps({"rc": 124, "timeout_s": 75}))
    (out / "parts" / "multi_crop.json").unlink()
    (out / "parts" / "two_teachers_step.json").unlink()
    (out / "multi_crop.json").unlink()
    paths = json.loads((out / "paths" / "paths.json").read_text())
    paths["paths"][2].update(ok=False, error="the cache path never replayed (cache_hits = 0)")
    (out / "paths" / "paths.json").write_text(json.dumps(paths))

    rows = {row["part"]: row for row in gpu_summary.summarize(out)["targets"]}
    assert rows["gpu tests"]["met"] == "no"
    assert rows["training paths (compiled student)"]["met"] == "no"
    assert "never replayed" in rows["training paths (compiled student)"]["measured"]
    for part in ("reference step ms/step", "reference step data stall"):
        assert rows[part]["measured"] == "not measured: cut off at its 75 s limit"
        assert rows[part]["met"] == "not measured"
    assert rows["DALI GPU augmentation, 224 px"]["met"] == "no"  # 11,000 < 12,000
    assert rows["DALI GPU / torchvision 16 workers"]["met"] == "no"  # 2.75x < 4x
    assert rows["multi-crop cost per image vs 2 global"]["measured"] == "not measured: not started"
    # The mixing step's share needs the reference step it is a share of.
    assert rows["mixing per batch / reference step"]["met"] == "not measured"
    assert rows["two-teacher step / same-run floor"]["measured"] == "not measured: not started"
    assert "no reference step to compare" in rows["mixing per batch / reference step"]["measured"]


def test_throughput_leaves_out_warm_up_and_checkpoint_intervals():
    from train_throughput import interval_steps, measured_rows

    rows = interval_steps([{"step": s} for s in range(4, 49, 4)])
    assert {r["steps"] for r in rows} == {4}
    # 16 steps an epoch: the checkpoints after steps 16 and 32 land in the intervals (16, 20] and (32, 36].
    assert [r["step"] for r in measured_rows(rows, 16)] == [8, 12, 16, 24, 28, 32, 40, 44, 48]
    # 6 steps an epoch, logs every 4: an epoch end inside an interval (after 6, 18, 30, 42) or at its start
    # (after 12, 24, 36) leaves that interval out.
    assert [r["step"] for r in measured_rows(rows, 6)] == [12, 24, 36, 48]


def test_batch_device_check_finds_every_tensor_elsewhere():
    import torch

    from dali_kd.data.batch import Batch, ViewRecord

    view = ViewRecord(
        torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, dtype=torch.int64), torch.ones(2, 4)
    )
    batch = Batch(
        images=torch.zeros(2, 3, 8, 8),
        labels=torch.zeros(2, dtype=torch.int64),
        sample_ids=torch.arange(2),
        view=view,
        local_images=torch.zeros(2, 2, 3, 4, 4),
        host_ids=np.arange(2),
    )
    names = {"images", "labels", "sample_ids", "local_images", "view.crop_anchor", "view.crop_shape"}
    names |= {"view.flip", "view.jitter"}
    assert set(batch.tensors()) == names  # numpy host fields are not tensors
    assert gpu_paths.off_device_fields(batch, torch.device("cpu")) == {}
    assert gpu_paths.off_device_fields(batch, torch.device("meta")) == dict.fromkeys(names, "cpu")
    batch.labels = torch.zeros(2, device="meta")
    assert gpu_paths.off_device_fields(batch, torch.device("cpu")) == {"labels": "meta"}
    assert gpu_paths.on_device(torch.device("cuda", 0), torch.device("cuda"))
    assert not gpu_paths.on_device(torch.device("cuda", 0), torch.device("cuda", 1))


def test_gpu_sampler_reads_the_jpeg_decoder_utilisation_as_nvidia_ml_py_gives_it():
    """nvidia-ml-py's nvmlDeviceGetJpgUtilization returns a list [utilisation %, sampling period µs]: read as the
    reference step's gpu_jpeg_util_pct (a list once raised in the sampling thread and ended all GPU telemetry)."""
    from types import SimpleNamespace

    from dali_kd.telemetry.nvml import GpuSampler, jpeg_utilisation

    nvml = SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        NVML_CLOCK_SM=1,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=90, memory=10),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2**30, total=2**37, free=0),
        nvmlDeviceGetPowerUsage=lambda h: 500_000,
        nvmlDeviceGetTemperature=lambda h, sensor: 50,
        nvmlDeviceGetClockInfo=lambda h, clock: 1980,
        nvmlDeviceGetJpgUtilization=lambda h: [37, 166_666],
    )
    sampler = GpuSampler([0], interval_s=3600, nvml=nvml)
    sampler.sample_once()
    folded = sampler.collect()[0]
    sampler.close()
    assert folded["gpu_jpeg_util_pct"] == 37.0 and folded["gpu_util_pct"] == 90.0
    assert [jpeg_utilisation(r) for r in ((12, 5), 7, None, [], "n/a")] == [12.0, 7.0, None, None, None]


def test_open_count_takes_opens_of_dataset_paths_from_an_strace_log(tmp_path):
    """augment_throughput's file-open count: setup and reading apart, by the call's time; a thread's interrupted
    call counted once; paths outside the dataset folder (libraries, a sibling folder sharing its name's prefix)
    left out."""
    from augment_throughput import parse_open_log

    root = (tmp_path / "data").resolve()
    log = "\n".join([
        f'101 10.000001 openat(AT_FDCWD, "{root}/a/1.JPEG", O_RDONLY|O_CLOEXEC) = 3',
        f'101 11.000001 openat(AT_FDCWD, "{root}/a/2.JPEG", O_RDONLY) = 3',
        f'102 11.500001 openat(AT_FDCWD, "{root}/a/2.JPEG", O_RDONLY <unfinished ...>',
        "102 11.600001 <... openat resumed>) = 4",
        f'101 11.700001 openat(AT_FDCWD, "{root}2/x.JPEG", O_RDONLY) = 3',
        '101 11.800001 openat(AT_FDCWD, "/usr/lib/libc.so.6", O_RDONLY) = 3',
        f'101 11.900001 open("{root}/b/3.JPEG", O_RDONLY) = 3',
        f'101 13.000001 openat(AT_FDCWD, "{root}/b/4.JPEG", O_RDONLY) = 3',
    ])  # fmt: skip
    assert parse_open_log(log, root, start=10.5, end=12.0) == {
        "setup": 1,
        "reading": 3,
        "distinct_files": 2,
        "setup_by_kind": {".JPEG": 1},
    }


@pytest.mark.slow
def test_augment_throughput_measures_folder_and_shards_of_the_same_images(tmp_path):
    """--format folder,shards (about 30 s on 2 cores: DALI pipelines and two traced child processes): every path
    from both formats of the same images, each shards row with its rate relative to its folder row, and the dataset
    files the loader opens per 1,000 images: one per image from the folder, far fewer from shards."""
    out = tmp_path / "augment.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "augment_throughput.py"), "--format", "folder,shards",
        "--work", str(tmp_path / "work"), "--shard-size", "400KB", "--num-images", "24", "--image-size", "32",
        "--batch-size", "8", "--workers", "0", "--dali-threads", "1", "--warmup", "1", "--batches", "1",
        "--repeats", "1", "--open-count-images", "48", "--no-gpu", "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["num_images_per_format"] == {"folder": 24, "shards": 24}
    assert report["settings"]["num_shards"] > 1
    rows = {(r["backend"], r["format"]): r for r in report["results"]}
    assert set(rows) == {
        (b, f) for b in ("torchvision", "dali_raw", "dali_cpu") for f in ("folder", "shards")
    }
    for backend in ("torchvision", "dali_raw", "dali_cpu"):
        shards, folder = rows[backend, "shards"], rows[backend, "folder"]
        assert shards["ratio_vs_folder"] == pytest.approx(shards["img_per_s"] / folder["img_per_s"])
        assert "ratio_vs_folder" not in folder
    opened = {r["format"]: r for r in report["files_opened"]}
    assert opened["folder"]["images_read"] == opened["shards"]["images_read"] == 48
    # The folder reader opens each image it reads (give or take the batches it prepares ahead).
    assert 500 <= opened["folder"]["per_1000_images"] <= 1500, opened
    assert opened["shards"]["per_1000_images"] <= opened["folder"]["per_1000_images"] / 4, opened
    assert "× folder" in (tmp_path / "augment.md").read_text()


@pytest.mark.slow
def test_function_matching_quick_runs_each_arm_and_tabulates_the_difference(tmp_path):
    """benchmarks/function_matching.py --quick: a tiny fine set and its teacher are made, each arm is a real
    dali_kd.train run whose mixing setting reached its config, and the report pairs every mixed arm with the
    unmixed run of the same dataset and schedule."""
    out = tmp_path / "fm"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "function_matching.py"),
            "--quick",
            "--datasets",
            "fine",
            "--arms",
            "off,on+cache",
            "--cache-views",
            "2",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "fm.json"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "fm.json").read_text())["results"]
    assert [r["mix"] for r in rows] == ["none", "mixup+cache2"]
    assert all(r["steps"] == 2 and r["student_knn_top1"] is not None for r in rows)
    mixed = (out / "fine-x1-mixup+cache2" / "config.yaml").read_text()
    assert "mix: mixup" in mixed and "cache_views_per_image: 2" in mixed
    assert "mix: none" in (out / "fine-x1-none" / "config.yaml").read_text()
    assert "| fine | 1× | mixup+cache2 |" in result.stdout


def test_the_floor_of_two_teachers_times_each_teacher_and_names_both():
    """step_floor.py --teacher A,B: both teachers built (model.teachers), each one's forward timed apart."""
    import argparse

    import torch
    from step_floor import floor_overrides, markdown, measure_floor

    args = argparse.Namespace(
        teacher="test_resnet,test_convnext", student="test_vit", image_size=32, batch_size=4, precision="fp32"
    )
    cfg = load_config(overrides=[*floor_overrides(args), "train.device=cpu"])
    assert cfg.model.teacher_keys == ["test_resnet", "test_convnext"]
    floor = measure_floor(cfg, torch.device("cpu"), steps=1, warmup=0, compile_backend=None)
    assert floor["teacher"] == "test_resnet,test_convnext"
    assert floor["teacher_ms_test_resnet"] > 0 and floor["teacher_ms_test_convnext"] > 0
    assert "| test_resnet + test_convnext → test_vit, 32 px" in markdown(floor)
    one = measure_floor(
        load_config(
            overrides=floor_overrides(argparse.Namespace(**{**vars(args), "teacher": "test_resnet"}))
        ),
        torch.device("cpu"),
        steps=1,
        warmup=0,
        compile_backend=None,
    )
    assert one["teacher"] == "test_resnet" and not any(k.startswith("teacher_ms_") for k in one)


def test_step_profile_summary_counts_device_time_idle_gaps_and_host_syncs():
    """step_profile's summary from profiler events (made up here, as the GPU profiler gives them): busy share of the
    step window, idle gaps with the host op running then, the kernels by device time, host syncs and value reads
    counted within the profiled steps only."""
    from types import SimpleNamespace

    from step_profile import summarize
    from torch.autograd import DeviceType

    def event(name, start, end, device=DeviceType.CPU):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(
            name=name, time_range=span, device_type=device, self_cpu_time_total=end - start
        )

    gpu = DeviceType.CUDA
    events = [
        event("ProfilerStep*", 0, 1000), event("ProfilerStep*", 1000, 2000),
        event("ProfilerStep*", 2000, 3000),  # the extra step (the final drain): left out
        event("cudaStreamSynchronize", 500, 510), event("aten::_local_scalar_dense", 600, 601),
        event("cudaStreamSynchronize", 2500, 2600),
        event("aten::copy_", 1000, 1050), event("aten::to", 990, 1060),
        event("k1", 100, 400, gpu), event("k2", 450, 900, gpu), event("Memcpy DtoH (Device -> Pinned)", 950, 960, gpu),
        event("k1", 1100, 1900, gpu), event("k3", 2100, 2900, gpu),
    ]  # fmt: skip
    summary = summarize(events, steps=2)
    assert summary["steps"] == 2 and summary["window_ms"] == 2.0
    assert summary["gpu_busy_pct"] == pytest.approx(100 * (300 + 450 + 10 + 800) / 2000)
    assert summary["host_syncs"] == {"cudaStreamSynchronize": 1, "Memcpy DtoH": 1}
    assert summary["host_syncs_per_step"] == 1.0 and summary["value_reads_per_step"] == 0.5
    largest = summary["idle"]["largest_gaps"][0]
    assert largest["ms"] == pytest.approx(0.14) and largest["host_was_in"] == "aten::copy_"
    assert [(k["name"], k["calls"]) for k in summary["top_kernels"]] == [("k1", 2), ("k2", 1)]
    assert summary["top_kernels"][0]["ms_per_step"] == pytest.approx(1.1 / 2)


def test_constant_targets_are_the_same_whatever_the_batch():
    import torch
    from train_throughput import ConstantTargets

    from dali_kd.data.batch import Batch
    from dali_kd.data.outputs import ModelOutput

    out = ModelOutput(torch.randn(2, 4), None, None)
    constant = ConstantTargets(out)
    batch = Batch(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64), torch.arange(2))
    assert constant.targets(batch)[0] is out
    assert constant.summary() == {"teacher_forward_batches": 0}


def test_first_use_reads_the_lines_a_demo_prints():
    """benchmarks/first_use.py times a demo by its output: the lines it looks for are the ones a run prints."""
    import first_use

    from dali_kd.console import interval_line
    from dali_kd.cpu_budget import CpuBudget

    row = {"step": 1, "epoch": 0, "loss": 2.5, "img_per_s": 40.0, "step_ms": 1600.0}
    assert first_use.STEP_LINE.match(interval_line(row, 120, 8))
    assert first_use.THREADS_LINE.match(CpuBudget(2, 1.8, 1, "auto").line()).group(1) == "1"
    knn = first_use.KNN_LINE.search("student k-NN top-1 91.0% (teacher 92.5%, chance 10.0%)")
    assert knn is not None and knn.groups() == ("91.0", "92.5")
    rows = [
        {"busy_loops": 0, "threads": 2, "first_step_s": 40.0, "total_s": 80.0, "knn": None, "returncode": 0},
        {"busy_loops": 2, "threads": 1, "first_step_s": 90.0, "total_s": 200.0, "knn": None, "returncode": 0},
    ]
    assert "| 2 | 1 | 90.0 | 200.0 | 2.50 |" in first_use.markdown(rows)


def test_demo_teacher_trains_each_case_and_reports_accuracy_and_cpu_seconds(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "demo_teacher.py"), "test_resnet:32:2", "test_resnet:24:1",
         "--home", str(tmp_path / "home"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["image_size"], r["steps"]) for r in rows] == [(32, 2), (24, 1)]
    assert all(0 <= r["val_top1"] <= 100 and r["cpu_s"] > 0 for r in rows)
    assert (tmp_path / "home" / "teacher_test_resnet_32px_2.safetensors").is_file()


@pytest.mark.slow
def test_teachers_compare_quick_runs_each_arm_and_reads_each_teachers_results(tmp_path):
    """benchmarks/teachers_compare.py --quick: each teacher alone and both, each a real dali_kd.train run on tiny
    generated data with few-step teachers kept in --home (never the real demo cache); the table gives the two-teacher
    student an agreement with each teacher and each one-teacher student an agreement with its own only."""
    out = tmp_path / "tc.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "teachers_compare.py"), "--quick", "--seeds", "0",
         "--home", str(tmp_path / "home"), "--out", str(tmp_path / "runs"), "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["arm"]: r for r in json.loads(out.read_text())["results"]}
    first, second = [arm for arm in rows if arm != "both"]
    assert list(rows) == [first, second, "both"]
    assert all(r["student_knn_top1"] is not None for r in rows.values())
    assert all(rows["both"][f"agreement_{k}"] is not None for k in (first, second))
    assert rows[first][f"agreement_{first}"] is not None and rows[first][f"agreement_{second}"] is None
    assert rows[second][f"agreement_{second}"] is not None and rows[second][f"agreement_{first}"] is None
    assert all(rows["both"][f"teacher_knn_top1_{k}"] is not None for k in (first, second))
    both = (tmp_path / "runs" / "both-s0" / "config.yaml").read_text()
    assert all(f"name: {t.name}" in both for t in load_config(presets=["two_teachers"]).model.teacher_specs)
    assert (tmp_path / "home" / ".cache" / "dali_kd" / "demo-v1").is_dir()
    assert "| **both** | mean of 1 |" in result.stdout
