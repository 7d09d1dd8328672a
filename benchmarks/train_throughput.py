"""End-to-end distillation step throughput with each data backend: the full step (teacher + student), measured by
the trainer's own telemetry, side by side in one run.

Reports steps/s, img/s, data stall %, the per-stage breakdown (data / teacher / student ms), the GPU's JPEG decoder
utilisation (NVML; null where there is none, e.g. on the CPU) and peak memory (host RSS, GPU allocated), excluding
the first log interval (compilation, warm-up) and every interval that holds an epoch end's checkpoint write (a data
set smaller than the run makes several epochs; writing the student and optimizer is not step time).

Ratios the targets need (benchmarks/RESULTS.md): a cached step / a student-only step (dali+cache,
dali+student-only), a multi-crop step / a global-only step, and with --floor each one-view step / its floor
measured in the same run (benchmarks/step_floor.py: the same models on synthetic tensors in the leanest loop),
the step split into data / teacher / student / optimizer / rest with each part as a multiple of its floor
(benchmarks/step_parts.py). --compute-floor-ms divides by a given figure instead (kept for older commands).

    python benchmarks/train_throughput.py [--quick] [--teacher vit_base_patch16_224 --student vit_small_patch16_224
        --image-size 224 --batch-size 256 --device cuda] [--backends dali,torchvision] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from dali_kd.config import load_config
from dali_kd.data.batch import Batch
from dali_kd.data.outputs import ModelOutput
from dali_kd.runtime import resolve_device
from dali_kd.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_throughput import machine_info  # noqa: E402
from make_dataset import make_dataset  # noqa: E402
from step_floor import floor_overrides, measure_floor, teacher_overrides  # noqa: E402
from step_floor import markdown as floor_markdown  # noqa: E402
from step_parts import OptimizerClock, split  # noqa: E402
from step_parts import markdown as split_markdown  # noqa: E402

# The modes whose step is the floor's computation (one view); the teacher runs in the first two.
FLOOR_MODES = {"dali": True, "torchvision": True, "dali+cache": False, "dali+student-only": False}


class ConstantTargets:
    """The same targets for every batch: the student's cost alone, as the step benchmark's student-only mode needs."""

    cached = False  # no teacher cache behind these targets (the run's advice reads it)

    def __init__(self, *outputs: ModelOutput):
        self.outputs = list(outputs)  # one per teacher

    def targets(self, batch: Batch, step: int = 0) -> list[ModelOutput]:
        return self.outputs

    def time_teachers(self, mark) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def interval_metrics(self) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {"teacher_forward_batches": 0}


def step_overrides(args, data: Path, out: Path, backend: str, run_name: str) -> list[str]:
    """The config of the benchmark's step: its models, size, batch and precision over `data`, runs under `out`."""
    return [
        f"data.root={data}",
        "data.val_root=null",
        f"data.backend={backend}",
        f"data.image_size={args.image_size}",
        f"data.dali_threads={args.dali_threads}",
        *teacher_overrides(args.teacher, pretrained=None),
        f"model.student.name={args.student}",
        f"train.batch_size={args.batch_size}",
        "data.scan=off",  # generated, known-good images (and no scan cache left in the user's home)
        f"train.log_every_n_steps={args.log_every}",
        f"train.compile_student={str(args.compile).lower()}",
        f"train.num_workers={args.workers}",
        f"train.precision={args.precision}",
        f"train.output_dir={out}",
        f"train.run_name={run_name}",
    ]


def run_backend(mode: str, data: Path, out: Path, args, device: torch.device) -> dict:
    """mode: a backend (dali, torchvision), or dali+cache (teacher cache: one fill pass, then replay),
    dali+student-only (constant targets: what a step costs without any teacher), <backend>+globals (multi-crop with
    the 2 global crops only) or <backend>+multicrop (2 global + --local-crops local crops)."""
    backend, _, variant = mode.partition("+")
    per_pass = sum(1 for _ in data.rglob("*.JPEG")) // args.batch_size
    # The step count spans as many (step-capped) epochs as the data needs.
    extra = [
        f"train.epochs={math.ceil(args.steps / per_pass)}",
        f"train.max_steps_per_epoch={min(per_pass, args.steps)}",
    ]
    if variant in ("globals", "multicrop"):
        extra += [
            "train.use_local_crops=true", f"data.local_crop_size={args.local_size}",
            f"data.num_local_crops={args.local_crops if variant == 'multicrop' else 0}",
        ]  # fmt: skip
    if variant == "cache":
        extra += [
            "train.cache_teacher_features=true", f"train.teacher_feature_dir={out / 'cache'}",
            "train.cache_views_per_image=1", "train.cache_probe_every_n_steps=null",
        ]  # fmt: skip
    cfg = load_config(overrides=step_overrides(args, data, out, backend, mode) + extra)
    optimizer_clock = OptimizerClock()
    trainer = Trainer(cfg, device, show_progress=False, callbacks=[optimizer_clock])
    if variant == "student-only":
        size = cfg.view_size
        views = torch.zeros(args.batch_size, 3, size, size, device=device)
        # The step reads trainer.parts.targets, checkpoints save the parts' progress.
        trainer.parts.targets = ConstantTargets(*(teacher(views) for teacher in trainer.parts.teachers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    summary = trainer.fit(out / mode)
    all_rows = interval_steps(
        [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    )
    # Too short a run to leave any interval out: every interval but the first, then every one.
    rows = measured_rows(all_rows, summary["steps_per_epoch"]) or all_rows[1:] or all_rows
    if variant == "cache":  # only the replayed steps, after the fill pass and the interval that switches over
        rows = [r for r in rows if r["step"] > per_pass + args.log_every]
        if not rows:
            raise SystemExit(
                f"dali+cache: no replayed interval to measure: --steps must exceed the fill pass "
                f"({per_pass} steps) by more than two log intervals"
            )

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.mean(values) if values else None

    step_ms = mean("step_ms")
    return {
        "backend": mode,
        "teacher_forward_batches": summary["teacher_forward_batches"],
        "cache_read_mb_s": summary.get("cache_read_mb_s"),
        "steps_per_s": 1000 / step_ms,
        "img_per_s": mean("img_per_s"),
        "step_ms": step_ms,
        "data_ms": mean("data_ms"),
        "teacher_ms": mean("teacher_ms"),
        "student_ms": mean("student_ms"),
        "data_stall_pct": mean("data_stall_pct"),
        "gpu_util_pct": mean("gpu_util_pct"),
        "gpu_jpeg_util_pct": mean("gpu_jpeg_util_pct"),
        "verdict": summary["verdict"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "device": str(device),
        "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "peak_gpu_used_mb": summary["peak_gpu_mem_mb"],
        "measured_steps": sum(r["steps"] for r in rows),
        # The optimiser step, timed apart (part of student_ms): see step_parts.OptimizerClock.
        "optimizer_ms": optimizer_clock.mean_over([r["step"] for r in rows]),
    }


def interval_steps(rows: list[dict]) -> list[dict]:
    """The metrics rows, each with `steps`: how many steps its interval holds."""
    previous, out = 0, []
    for row in rows:
        out.append({**row, "steps": row["step"] - previous})
        previous = row["step"]
    return out


def measured_rows(rows: list[dict], steps_per_epoch: int) -> list[dict]:
    """The rows that time training steps only: not the first interval (compilation, warm-up), nor one that holds
    an epoch end, whose checkpoint is written inside it (after that step's own row)."""
    kept = []
    for row in rows:
        start = row["step"] - row["steps"]
        if start == 0 or any(end >= start for end in range(steps_per_epoch, row["step"], steps_per_epoch)):
            continue
        kept.append(row)
    return kept


def run_in_subprocess(backend: str, data: Path) -> dict:
    """This script again with --backends <backend> on `data`, same other arguments; returns its one result row."""
    argv = list(sys.argv[1:])
    for flag in ("--backends", "--json", "--data"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    argv = [a for a in argv if a != "--floor"]  # measured once, by the parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            *argv,
            "--backends",
            backend,
            "--data",
            str(data),
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())["results"][0]


def markdown(report: dict) -> str:
    lines = [
        "| backend | steps/s | img/s | step ms | data ms | teacher ms | student ms | data stall | GPU JPEG decoder | verdict | peak RSS | peak GPU alloc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | failed: {r['error']} |" + " |" * 10)
            continue
        gpu = f"{r['peak_gpu_allocated_mb']:.0f} MB" if r["peak_gpu_allocated_mb"] else "—"
        jpeg = f"{r['gpu_jpeg_util_pct']:.0f}%" if r.get("gpu_jpeg_util_pct") is not None else "—"
        lines.append(
            f"| {r['backend']} | {r['steps_per_s']:.2f} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | "
            f"{r['data_ms']:.1f} | {r['teacher_ms']:.1f} | {r['student_ms']:.1f} | {r['data_stall_pct']:.1f}% | "
            f"{jpeg} | {r['verdict']} | {r['peak_rss_mb']:.0f} MB | {gpu} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and data: checks the script in seconds"
    )
    parser.add_argument("--data", type=Path, help="an existing image tree (default: a generated one)")
    parser.add_argument(
        "--num-images", type=int, default=0, help="generated images (default: enough for the run)"
    )
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument(
        "--backends",
        default="dali,torchvision",
        help="comma-separated: dali, torchvision, dali+cache (teacher cache, replayed), dali+student-only, "
        "dali+globals / torchvision+globals (2 global crops), dali+multicrop / torchvision+multicrop (2 + N local)",
    )
    parser.add_argument("--local-crops", type=int, default=8, help="multi-crop modes: local crops per image")
    parser.add_argument(
        "--local-size", type=int, default=96, help="multi-crop modes: local crop side, pixels"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the student (as the trainer does)"
    )
    parser.add_argument("--workers", type=int, default=4, help="torchvision DataLoader workers (original: 4)")
    parser.add_argument("--dali-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run the backends one after another in this process: no start-up or recompilation per backend, "
        "but peak host memory then covers all of them",
    )
    parser.add_argument(
        "--compute-floor-ms",
        type=float,
        help="the step's compute floor (the issue's: 20 ms for ViT-B/16 -> ViT-S/16, 224 px, bf16, batch 256); "
        "adds <backend>_step_vs_compute_floor",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="measure the step's floor first, in this run (benchmarks/step_floor.py), and report every one-view "
        "step as a multiple of it, split into data / teacher / student / optimizer / rest",
    )
    parser.add_argument(
        "--floor-backend",
        default="inductor",
        help="the floor's torch.compile backend (eager: no code generation)",
    )
    parser.add_argument("--floor-steps", type=int, default=20, help="timed calls of each part of the floor")
    parser.add_argument(
        "--floor-from",
        type=Path,
        help="with --floor: take the floor from this earlier report of the same visit (its 'floor') when it has one",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.teacher, args.student, args.image_size, args.batch_size = "test_resnet", "test_vit", 64, 8
        args.steps, args.log_every, args.workers = 6, 2, 2
        args.local_crops, args.local_size = 4, 32
    backends = args.backends.split(",")
    results: list[dict] = []
    args.measured_floor = None
    if args.floor and any(b in FLOOR_MODES for b in backends):
        args.measured_floor = run_floor(args)
        print(floor_markdown(args.measured_floor), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        num_images = args.num_images or args.steps * args.batch_size
        data = args.data or make_dataset(Path(tmp) / "data", num_images=num_images, num_classes=10)
        if len(backends) > 1 and not args.one_process:
            # One process per backend, so that peak memory (host and GPU) belongs to that backend alone. The
            # report is rewritten after each one: a run cut off at a time limit keeps the backends it finished.
            for backend in backends:
                try:
                    results.append(run_in_subprocess(backend, data))
                except subprocess.CalledProcessError as e:
                    results.append(
                        {"backend": backend, "error": f"exit {e.returncode} (its output is above)"}
                    )
                write_report(results, args)
        else:
            device = resolve_device(args.device)
            for backend in backends:
                results.append(run_backend(backend, data, Path(tmp) / "runs", args, device))
                gc.collect()  # the finished run's trainer, its pipelines and device memory
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                write_report(results, args)
    report = write_report(results, args)
    print(markdown(report))
    print(split_markdown(report["results"]))
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.3f}")
    if any("error" in r for r in results):
        sys.exit(1)


def run_floor(args) -> dict:
    """The floor of this run's step (its models, size, batch and precision), measured here and now (or read from
    --floor-from when that report measured one for the same models); the device memory it held is given back
    before the training runs."""
    if args.floor_from is not None and args.floor_from.is_file():
        earlier = json.loads(args.floor_from.read_text()).get("floor")
        same = earlier and (earlier["teacher"], earlier["student"], earlier["batch_size"]) == (
            args.teacher, args.student, args.batch_size,
        )  # fmt: skip
        if same:
            return {**earlier, "from": str(args.floor_from)}
    cfg = load_config(overrides=floor_overrides(args))
    device = resolve_device(args.device)
    floor = measure_floor(cfg, device, steps=args.floor_steps, warmup=5, compile_backend=args.floor_backend)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return floor


def with_splits(results: list[dict], floor: dict | None) -> list[dict]:
    """Each result with its step split (step_parts.split): against the floor for the one-view modes."""
    out = []
    for r in results:
        if "error" in r:
            out.append(r)
            continue
        mode_floor = floor if r["backend"] in FLOOR_MODES else None
        out.append({**r, "split": split(r, mode_floor, FLOOR_MODES.get(r["backend"], True))})
    return out


def ratios_of(
    results: list[dict], compute_floor_ms: float | None, floor: dict | None = None
) -> dict[str, float]:
    """The side-by-side ratios the targets need, among the backends that ran."""
    by_mode = {r["backend"]: r for r in results if "error" not in r}
    ratios = {}
    if "dali+cache" in by_mode and "dali+student-only" in by_mode:
        ratios["cached_vs_student_only_step"] = (
            by_mode["dali+cache"]["step_ms"] / by_mode["dali+student-only"]["step_ms"]
        )
    for backend in ("dali", "torchvision"):
        if f"{backend}+multicrop" in by_mode and f"{backend}+globals" in by_mode:
            ratios[f"{backend}_multicrop_vs_globals_step"] = (
                by_mode[f"{backend}+multicrop"]["step_ms"] / by_mode[f"{backend}+globals"]["step_ms"]
            )
            ratios[f"{backend}_multicrop_vs_globals_data"] = (
                by_mode[f"{backend}+multicrop"]["data_ms"] / by_mode[f"{backend}+globals"]["data_ms"]
            )
    if "dali+cache" in by_mode and "dali" in by_mode:
        ratios["cached_vs_online_step"] = by_mode["dali+cache"]["step_ms"] / by_mode["dali"]["step_ms"]
    if compute_floor_ms:
        for mode, r in by_mode.items():
            ratios[f"{mode}_step_vs_compute_floor"] = r["step_ms"] / compute_floor_ms
    if floor is not None:
        for mode, with_teacher in FLOOR_MODES.items():
            if mode in by_mode:
                base = floor["step_ms"] if with_teacher else floor["student_ms"]
                ratios[f"{mode}_step_vs_floor"] = by_mode[mode]["step_ms"] / base
    return ratios


def write_report(results: list[dict], args) -> dict:
    floor = getattr(args, "measured_floor", None)
    report = {
        "results": with_splits(results, floor),
        "floor": floor,
        "ratios": ratios_of(results, args.compute_floor_ms, floor),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("json", "measured_floor")},
        "machine": machine_info(),
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        tables = [markdown(report), split_markdown(report["results"])]
        if floor is not None:
            tables.insert(0, floor_markdown(floor))
        args.json.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    return report


if __name__ == "__main__":
    main()
