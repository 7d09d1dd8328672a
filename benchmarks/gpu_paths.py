"""A GPU visit's checks in Python: every training path for a few real steps, and the visit's table of targets.

`paths` trains each path of the trainer through `dali_kd.trainer.Trainer` (the student compiled) on small
random-init models and generated images, one after another in this process: DALI and torchvision online, the
DALI teacher cache (a fill pass, then replay), DALI and torchvision multi-crop. Per path it records whether it
ran, its steps, ms/step after the first step (which holds compilation) and where the batch tensors were, and
writes that path's JSON as soon as it finishes, so a run cut off at its time limit keeps what it measured.

`summary` reads the result files `benchmarks/gpu_check.sh` left under its output folder and writes one JSON and
one markdown table: each part's key figure against the issue's target (14, parts 5 and 6), measured or not.

    python benchmarks/gpu_paths.py paths --device cuda --out OUT/paths
    python benchmarks/gpu_paths.py summary OUT          # writes OUT/gpu_check.json and OUT/gpu_check.md
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

# The targets of issue 14 on one H200 (benchmarks/RESULTS.md, "GPU figures").
AUGMENT_MIN_IMG_S = 12_000
AUGMENT_MIN_VS_TORCHVISION = 4.0
TORCHVISION_WORKERS = 16
REFERENCE_MAX_STEP_MS = 40.0  # 2x the 20 ms compute floor of ViT-B/16 -> ViT-S/16, 224 px, bf16, batch 256
REFERENCE_MAX_STALL_PCT = 3.0
CACHED_MAX_VS_STUDENT_ONLY = 1.15
MULTI_CROP_MAX_COST = 1.5


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


def batch_tensors(batch) -> dict[str, Any]:
    """Every torch tensor a Batch holds, by field name (a view record's fields as view.<field>)."""
    import torch

    found = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            found[field.name] = value
        elif dataclasses.is_dataclass(value):
            for inner in dataclasses.fields(value):
                if isinstance(getattr(value, inner.name), torch.Tensor):
                    found[f"{field.name}.{inner.name}"] = getattr(value, inner.name)
    return found


def on_device(tensor_device, device) -> bool:
    """`cuda` (no index) matches any cuda:N tensor; `cuda:1` only cuda:1."""
    return tensor_device.type == device.type and (device.index is None or tensor_device.index == device.index)


def off_device_fields(batch, device) -> dict[str, str]:
    """The batch's tensors that are not on `device`, with where they are."""
    return {
        name: str(t.device) for name, t in batch_tensors(batch).items() if not on_device(t.device, device)
    }


def make_watcher():
    """A Callback that notes, for every batch the trainer is about to train on, which tensors are elsewhere than
    the trainer's device, and the time between steps (the device synchronised first, so each interval is one
    whole step: data wait, teacher, student)."""
    import torch

    from dali_kd.callbacks import Callback

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
            self.from_cache += bool(batch.from_cache)
            if not self.devices:
                self.devices = {name: str(t.device) for name, t in batch_tensors(batch).items()}
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

    from dali_kd.trainer import Trainer

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
            compiled=hasattr(trainer.task.student_step, "_orig_mod"),
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


# ---- summary ------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def part_status(out: Path, part: str) -> dict[str, Any]:
    """What gpu_check.sh noted about a part (exit code, seconds, its limit), or that it never started."""
    return read_json(out / "parts" / f"{part}.json") or {"part": part, "rc": None, "note": "not started"}


def why_missing(out: Path, part: str) -> str:
    status = part_status(out, part)
    if status.get("note"):
        return f"not measured: {status['note']}"
    if status.get("rc") in (124, 137):
        return f"not measured: cut off at its {status.get('timeout_s')} s limit"
    return f"not measured: exit {status.get('rc')} (see {part}.log)"


def verdict(value: float | None, limit: float, at_most: bool, device: str | None) -> str:
    if value is None:
        return "not measured"
    if device is None or not str(device).startswith("cuda"):
        return "n/a (not on a GPU)"
    return "yes" if (value <= limit if at_most else value >= limit) else "no"


def pytest_counts(text: str) -> dict[str, int]:
    """{'passed': 12, 'skipped': 1, ...} from pytest's last summary line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def augment_figures(report: dict) -> dict[str, Any]:
    """DALI on the GPU, dali_kd's loader and the raw pipeline, per decode mode, vs torchvision with 16 workers, from
    augment_throughput.py's JSON. Without GPU rows (the dry run) the CPU rows stand in, so the arithmetic runs."""
    rows = report.get("results", [])
    torchvision = {r["workers"]: r["img_per_s"] for r in rows if r["backend"] == "torchvision"}
    baseline_workers = (
        TORCHVISION_WORKERS if TORCHVISION_WORKERS in torchvision else max(torchvision, default=None)
    )
    device = "cuda" if any(r["backend"] in ("dali_gpu", "dali_raw_gpu") for r in rows) else "cpu"
    loader, raw = ("dali_gpu", "dali_raw_gpu") if device == "cuda" else ("dali_cpu", "dali_raw")

    def rates(backend: str) -> dict[str, float]:
        by_decode: dict[str, float] = {}
        for r in rows:
            if r["backend"] == backend:
                decode = r.get("decode") or "window"
                by_decode[decode] = max(by_decode.get(decode, 0.0), r["img_per_s"])
        return by_decode

    loader_rates, raw_rates = rates(loader), rates(raw)
    # What training gets is the loader; the raw pipeline only where the loader has no row.
    measured = loader_rates or raw_rates
    best = max(measured.values(), default=None)
    baseline = torchvision.get(baseline_workers)
    return {
        "device": device,
        "loader": loader,
        "loader_img_per_s": loader_rates,
        "raw_pipeline_img_per_s": raw_rates,
        "best_img_per_s": best,
        "torchvision_workers": baseline_workers,
        "torchvision_img_per_s": baseline,
        "dali_vs_torchvision": best / baseline if best and baseline else None,
        "window_vs_full": measured["window"] / measured["full"]
        if measured.get("window") and measured.get("full")
        else None,
    }


def multi_crop_figures(report: dict) -> dict[str, Any]:
    rows = report.get("multi_crop", [])
    backend = "dali_gpu" if any(r["backend"] == "dali_gpu" for r in rows) else "dali_cpu"
    costs = {
        r["backend"]: r["cost_vs_global_only"]
        for r in rows
        if "local" in r["crops"] and r.get("cost_vs_global_only") is not None
    }
    return {
        "device": "cuda" if backend == "dali_gpu" else "cpu",
        "backend": backend,
        "crops": next((r["crops"] for r in rows if "local" in r["crops"]), None),
        "cost_vs_global_only": costs.get(backend),
        "cost_by_backend": costs,
    }


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def summarize(out: Path) -> dict[str, Any]:
    """Every part's key figures and each target of the issue, measured or not, from the files under `out`."""
    rows: list[dict[str, str]] = []
    parts: dict[str, Any] = {}

    def row(part: str, figure: str, target: str, met: str) -> None:
        rows.append({"part": part, "measured": figure, "target": target, "met": met})

    # gpu tests
    text = (out / "gpu_tests.log").read_text() if (out / "gpu_tests.log").exists() else None
    status = part_status(out, "gpu_tests")
    if text is None or status.get("rc") is None:
        row("gpu tests", why_missing(out, "gpu_tests"), "all pass", "not measured")
    else:
        counts = pytest_counts(text)
        parts["gpu_tests"] = {"rc": status["rc"], **counts}
        passed = status["rc"] == 0 and counts.get("passed", 0) > 0 and not counts.get("failed")
        if not counts.get("passed") and counts.get("skipped"):
            met = "n/a (skipped: no GPU)"
        else:
            met = "yes" if passed else "no"
        row(
            "gpu tests",
            ", ".join(f"{n} {w}" for w, n in counts.items()) or f"exit {status['rc']}",
            "all pass",
            met,
        )

    # training paths
    report = read_json(out / "paths" / "paths.json")
    if report is None:
        row(
            "training paths (compiled student)",
            why_missing(out, "paths"),
            "every path trains",
            "not measured",
        )
    else:
        records = report["paths"]
        parts["paths"] = records
        ok = [r for r in records if r["ok"]]
        failed = [f"{r['path']}: {r['error']}" for r in records if not r["ok"]]
        missing = [p.name for p in PATHS if p.name not in {r["path"] for r in records}]
        ms = [r["ms_per_step"] for r in records if r.get("ms_per_step") is not None]
        figure = f"{len(ok)}/{len(PATHS)} ok on {report['device']}"
        if ms:
            figure += f", {min(ms):.1f}–{max(ms):.1f} ms/step"
        if failed:
            figure += "; " + "; ".join(failed)
        if missing:
            figure += "; not run: " + ", ".join(missing)
        met = "yes" if len(ok) == len(PATHS) else "no"
        row("training paths (compiled student)", figure, "every path trains, batches on the device", met)

    # the reference step
    report = read_json(out / "reference_step.json")
    ref = next((r for r in (report or {}).get("results", []) if "step_ms" in r), None)
    if ref is None:
        reason = why_missing(out, "reference_step")
        row("reference step ms/step", reason, f"≤ {REFERENCE_MAX_STEP_MS:.0f} ms", "not measured")
        row("reference step data stall", reason, f"< {REFERENCE_MAX_STALL_PCT:.0f}%", "not measured")
    else:
        parts["reference_step"] = ref
        device = ref.get("device")
        row(
            "reference step ms/step",
            f"{ref['step_ms']:.1f} ms ({fmt(ref.get('img_per_s'), '.0f', ' img/s')}, "
            f"GPU JPEG decoder {fmt(ref.get('gpu_jpeg_util_pct'), '.0f', '%')}, {device})",
            f"≤ {REFERENCE_MAX_STEP_MS:.0f} ms (2× the 20 ms compute floor)",
            verdict(ref["step_ms"], REFERENCE_MAX_STEP_MS, True, device),
        )
        stall = ref.get("data_stall_pct")
        row(
            "reference step data stall",
            fmt(stall, ".2f", "%"),
            f"< {REFERENCE_MAX_STALL_PCT:.0f}%",
            verdict(stall, REFERENCE_MAX_STALL_PCT, True, device),
        )

    # cached step vs student-only step
    report = read_json(out / "cache_step.json")
    ratio = (report or {}).get("ratios", {}).get("cached_vs_student_only_step")
    if ratio is None:
        reason = why_missing(out, "cache_step") if report is None else "not measured: a backend failed"
        row("cached step / student-only step", reason, f"≤ {CACHED_MAX_VS_STUDENT_ONLY}×", "not measured")
    else:
        by_mode = {r["backend"]: r for r in report["results"]}
        parts["cache_step"] = {"ratio": ratio, "results": report["results"]}
        device = by_mode["dali+cache"].get("device")
        row(
            "cached step / student-only step",
            f"{ratio:.3f}× ({by_mode['dali+cache']['step_ms']:.1f} vs "
            f"{by_mode['dali+student-only']['step_ms']:.1f} ms, {device})",
            f"≤ {CACHED_MAX_VS_STUDENT_ONLY}×",
            verdict(ratio, CACHED_MAX_VS_STUDENT_ONLY, True, device),
        )

    # augmentation
    report = read_json(out / "augment.json")
    if report is None:
        reason = why_missing(out, "augment")
        row("DALI GPU augmentation, 224 px", reason, f"≥ {AUGMENT_MIN_IMG_S:,} img/s", "not measured")
        row(
            "DALI GPU / torchvision 16 workers",
            reason,
            f"≥ {AUGMENT_MIN_VS_TORCHVISION:.0f}×",
            "not measured",
        )
    else:
        aug = augment_figures(report)
        parts["augment"] = aug
        size = report.get("settings", {}).get("image_size")

        def listed(rates: dict[str, float]) -> str:
            return ", ".join(f"{mode} decode {rate:,.0f}" for mode, rate in rates.items()) or "—"

        stand_in = "" if aug["device"] == "cuda" else " (DALI CPU stands in: no GPU)"
        window_full = f"; window/full {aug['window_vs_full']:.2f}×" if aug["window_vs_full"] else ""
        row(
            f"DALI GPU augmentation, {size} px",
            f"loader {listed(aug['loader_img_per_s'])} img/s (raw pipeline {listed(aug['raw_pipeline_img_per_s'])})"
            f"{window_full}{stand_in}",
            f"≥ {AUGMENT_MIN_IMG_S:,} img/s at 224 px",
            verdict(aug["best_img_per_s"], AUGMENT_MIN_IMG_S, False, aug["device"])
            if size == 224 or aug["device"] != "cuda"
            else f"n/a ({size} px)",
        )
        row(
            f"DALI GPU / torchvision {aug['torchvision_workers']} workers",
            f"{fmt(aug['dali_vs_torchvision'], '.2f', '×')} (torchvision "
            f"{fmt(aug['torchvision_img_per_s'], ',.0f', ' img/s')}){stand_in}",
            f"≥ {AUGMENT_MIN_VS_TORCHVISION:.0f}× torchvision with {TORCHVISION_WORKERS} workers",
            verdict(aug["dali_vs_torchvision"], AUGMENT_MIN_VS_TORCHVISION, False, aug["device"])
            if aug["torchvision_workers"] == TORCHVISION_WORKERS or aug["device"] != "cuda"
            else f"n/a ({aug['torchvision_workers']} workers)",
        )

    # multi-crop
    report = read_json(out / "multi_crop.json")
    mc = multi_crop_figures(report) if report else None
    if mc is None or mc["cost_vs_global_only"] is None:
        reason = why_missing(out, "multi_crop") if report is None else "not measured: no multi-crop rows"
        row("multi-crop cost per image vs 2 global", reason, f"≤ {MULTI_CROP_MAX_COST}×", "not measured")
    else:
        parts["multi_crop"] = mc
        others = ", ".join(f"{b} {c:.2f}×" for b, c in mc["cost_by_backend"].items() if b != mc["backend"])
        row(
            f"multi-crop cost per image vs 2 global ({mc['backend']})",
            f"{mc['cost_vs_global_only']:.2f}× ({mc['crops']}; {others})",
            f"≤ {MULTI_CROP_MAX_COST}× (2 + 8 crops)",
            verdict(mc["cost_vs_global_only"], MULTI_CROP_MAX_COST, True, mc["device"]),
        )

    versions = (out / "versions.txt").read_text().strip() if (out / "versions.txt").exists() else None
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "part_status": {p: part_status(out, p) for p in PARTS},
        "targets": rows,
        "parts": parts,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "gpu_check.md").write_text(summary_markdown(summary) + "\n")
    return summary


PARTS = ("gpu_tests", "paths", "reference_step", "cache_step", "augment", "multi_crop")


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["| part | measured | target | met? |", "|---|---|---|---|"]
    for r in summary["targets"]:
        lines.append(f"| {r['part']} | {r['measured'].replace('|', '/')} | {r['target']} | {r['met']} |")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    paths = commands.add_parser("paths", help="a few training steps of every path")
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
    summary = commands.add_parser("summary", help="the visit's table of targets from gpu_check.sh's output")
    summary.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "paths":
        records = run_paths(args)
        sys.exit(0 if all(r["ok"] for r in records) else 1)
    print(summary_markdown(summarize(args.out)))


if __name__ == "__main__":
    main()
