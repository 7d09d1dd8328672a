"""A GPU visit's first check: every training path for a few real steps, on the device.

Trains each path of the trainer through `dali_kd.training.trainer.Trainer` (the student compiled) on small random-init
models and generated images, one after another in this process: DALI and torchvision online, the DALI teacher cache
(a fill pass, then replay), DALI and torchvision multi-crop. Per path it records whether it ran, its steps, ms/step
after the first step (which holds compilation) and where the batch tensors were, and writes that path's JSON as
soon as it finishes, so a run cut off at its time limit keeps what it measured. `gpu_summary.py` turns the whole
visit's results into its table of targets.

    python benchmarks/gpu_paths.py --device cuda --out OUT/paths
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any


# ---- paths --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainingPath:
    """One training path: its data backend, and whether it trains multi-crop or from the teacher cache."""

    name: str
    backend: str
    multi_crop: bool = False
    cache: bool = False


PATHS = (
    TrainingPath("dali online", "dali"),
    TrainingPath("torchvision online", "torchvision"),
    TrainingPath("dali cache fill + replay", "dali", cache=True),
    TrainingPath("dali multi-crop", "dali", multi_crop=True),
    TrainingPath("torchvision multi-crop", "torchvision", multi_crop=True),
)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def on_device(tensor_device, device) -> bool:
    """`cuda` (no index) matches any cuda:N tensor; `cuda:1` only cuda:1."""
    return tensor_device.type == device.type and (device.index is None or tensor_device.index == device.index)


def off_device_fields(batch, device) -> dict[str, str]:
    """The batch's tensors that are not on `device`, with where they are."""
    return {name: str(t.device) for name, t in batch.tensors().items() if not on_device(t.device, device)}


def make_watcher():
    """A Callback that notes, for every batch the trainer is about to train on, which tensors are elsewhere than
    the trainer's device, and the time between steps (the device synchronised first, so each interval is one
    whole step: data wait, teacher, student)."""
    import torch

    from dali_kd.training.callbacks import Callback

    class StepWatcher(Callback):
        def __init__(self):
            self.times: list[float] = []
            self.batches = 0
            self.off_device: dict[str, str] = {}
            self.devices: dict[str, str] = {}
            self.from_cache = 0

        def on_step(self, trainer, batch) -> None:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            self.times.append(time.perf_counter())
            self.batches += 1
            self.from_cache += batch.cache is not None and batch.cache.from_cache
            if not self.devices:
                self.devices = {name: str(t.device) for name, t in batch.tensors().items()}
            self.off_device.update(off_device_fields(batch, trainer.device))

        def on_finish(self, trainer, summary) -> None:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            self.times.append(time.perf_counter())

        def ms_per_step(self) -> float | None:
            """Median step time after the first step (compilation, warm-up)."""
            # times: one per step as it starts, then the end; the gaps between starts from the second step on.
            gaps = [1000 * (b - a) for a, b in itertools.pairwise(self.times[1:-1])]
            return statistics.median(gaps) if gaps else None

    return StepWatcher()


def path_config(path: TrainingPath, data: Path, work: Path, args, per_pass: int):
    """The run's config and its number of steps. The cache path runs its fill pass (one view per image, K=1) and
    then `args.steps` replayed steps; the others `args.steps` steps in one epoch."""
    from dali_kd.config import load_config

    steps = per_pass + args.steps if path.cache else args.steps
    epochs = math.ceil(steps / per_pass)
    extra = [f"train.epochs={epochs}", f"train.max_steps_per_epoch={math.ceil(steps / epochs)}"]
    if path.multi_crop:
        extra += [
            "train.use_local_crops=true",
            f"data.local_crop_size={args.local_size}",
            f"data.num_local_crops={args.local_crops}",
        ]
    if path.cache:
        extra += [
            "train.cache_teacher_features=true",
            f"train.teacher_feature_dir={work / 'cache'}",
            "train.cache_views_per_image=1",
            "train.cache_probe_every_n_steps=null",
        ]
    cfg = load_config(
        overrides=[
            f"data.root={data}",
            "data.val_root=null",
            f"data.backend={path.backend}",
            f"data.image_size={args.image_size}",
            f"data.dali_threads={args.dali_threads}",
            "data.scan=off",  # generated, known-good images (and no scan cache left in the user's home)
            f"model.teacher.name={args.teacher}",
            "model.teacher.checkpoint=null",
            f"model.student.name={args.student}",
            f"train.batch_size={args.batch_size}",
            "train.compile_student=true",
            f"train.num_workers={args.workers}",
            f"train.device={args.device}",
            f"train.log_every_n_steps={steps}",
            f"train.output_dir={work}",
            f"train.run_name={slug(path.name)}",
            *extra,
        ]
    )
    return cfg, epochs * math.ceil(steps / epochs)


def run_path(path: TrainingPath, data: Path, work: Path, args) -> dict[str, Any]:
    """Train one path; never raises: a failure is the record's `error` (its first line) and `traceback`."""
    import torch

    from dali_kd.training.trainer import Trainer

    device = torch.device(args.device)
    per_pass = sum(1 for _ in data.rglob("*.JPEG")) // args.batch_size
    record: dict[str, Any] = {"path": path.name, "backend": path.backend, "device": str(device), "ok": False}
    watcher = make_watcher()
    started = time.perf_counter()
    trainer = None
    try:
        cfg, expected_steps = path_config(path, data, work / slug(path.name), args, per_pass)
        record["expected_steps"] = expected_steps
        trainer = Trainer(cfg, device, show_progress=False, callbacks=[watcher])
        summary = trainer.fit(work / slug(path.name) / "run")
        record.update(
            steps=summary["steps"],
            precision=summary.get("precision"),
            # torch.compile wraps the module it compiles (the trainer's compiled student step).
            compiled=hasattr(trainer.parts.task.student_step, "_orig_mod"),
            teacher_forward_batches=summary.get("teacher_forward_batches"),
            cache_hits=summary.get("cache_hits"),
        )
        problems = []
        if summary["steps"] != expected_steps:
            problems.append(f"ran {summary['steps']} steps, expected {expected_steps}")
        if not record["compiled"]:
            problems.append("the student was not compiled")
        if watcher.off_device:
            problems.append(f"batch tensors not on {device}: {watcher.off_device}")
        if path.cache and not summary.get("cache_hits"):
            problems.append("the cache path never replayed (cache_hits = 0)")
        record["ok"] = not problems
        record["error"] = "; ".join(problems) or None
    except Exception as e:  # noqa: BLE001 - a failing path is a result of this check, not the end of the visit
        record["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    finally:
        trainer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record.update(
        batches=watcher.batches,
        replayed_batches=watcher.from_cache if path.cache else None,
        ms_per_step=watcher.ms_per_step(),
        batch_devices=watcher.devices,
        off_device_fields=watcher.off_device,
        wall_s=time.perf_counter() - started,
    )
    return record


def paths_markdown(records: list[dict[str, Any]]) -> str:
    lines = [
        "| path | ok | steps | ms/step (after the first) | batch tensors on | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        ms = f"{r['ms_per_step']:.1f}" if r.get("ms_per_step") is not None else "—"
        where = ", ".join(sorted(set(r.get("batch_devices", {}).values()))) or "—"
        lines.append(
            f"| {r['path']} | {'yes' if r['ok'] else 'NO'} | {r.get('steps', '—')} | {ms} | {where} | "
            f"{(r.get('error') or '').replace('|', '/')} |"
        )
    return "\n".join(lines)


def run_paths(args) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_dataset import make_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    if args.compile_backend != "inductor":
        import functools

        import torch

        # The trainer compiles with torch.compile's default backend (inductor); a CPU dry run only needs to know
        # that every path traces and trains compiled, not to wait for C++ code generation.
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    wanted = [p for p in PATHS if not args.only or slug(p.name) in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_dataset(Path(tmp) / "data", num_images=args.num_images, num_classes=10)
        records = []
        for path in wanted:
            print(f"[gpu_paths] {path.name} ...", flush=True)
            record = run_path(path, data, Path(tmp) / "runs", args)
            records.append(record)
            (args.out / f"{slug(path.name)}.json").write_text(json.dumps(record, indent=2, default=str))
            report = {"device": args.device, "settings": settings(args), "paths": records}
            (args.out / "paths.json").write_text(json.dumps(report, indent=2, default=str))
            (args.out / "paths.md").write_text(paths_markdown(records) + "\n")
            status = "ok" if record["ok"] else f"FAILED: {record['error']}"
            print(f"[gpu_paths] {path.name}: {status} ({record['wall_s']:.1f} s)", flush=True)
    print(paths_markdown(records))
    return records


def settings(args) -> dict[str, str]:
    return {k: str(v) for k, v in vars(args).items() if k not in ("func", "out")}


# ---- command line -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    paths = parser
    paths.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    paths.add_argument("--out", type=Path, required=True, help="folder for <path>.json, paths.json, paths.md")
    paths.add_argument("--data", type=Path, help="an image tree (default: --num-images generated ones)")
    paths.add_argument("--num-images", type=int, default=256)
    paths.add_argument("--batch-size", type=int, default=32)
    paths.add_argument("--steps", type=int, default=6, help="steps per path (the cache path: after its fill)")
    paths.add_argument("--image-size", type=int, default=64)
    paths.add_argument("--local-size", type=int, default=32)
    paths.add_argument("--local-crops", type=int, default=8)
    paths.add_argument("--teacher", default="test_resnet")
    paths.add_argument("--student", default="test_vit")
    paths.add_argument("--workers", type=int, default=4, help="torchvision DataLoader workers")
    paths.add_argument("--dali-threads", type=int, default=4)
    paths.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="torch.compile backend for the student (the trainer's is inductor; aot_eager makes a CPU dry run fast)",
    )
    paths.add_argument("--only", help="comma-separated path slugs (default: every path)")
    args = parser.parse_args(argv)
    records = run_paths(args)
    sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
    main()
