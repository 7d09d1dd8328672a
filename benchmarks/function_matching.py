"""Function matching, measured: student k-NN / head top-1 with mixing off vs on, at the demo's schedule and a longer
one, on the demo data and on a harder generated set (`fine`: five pairs of near-twin classes among line clutter,
60 training images per class, with its own ResNet-18 teacher trained on first use).

Every run is a real `python -m dali_kd.train` (the demo's configs, `--no-progress`); only the keys below change:

    data.augment.mix = none | <--mix>   (data.augment.mix_alpha from --mix-alpha)
    --arms on+cache: the same mixing, with the teacher cache replaying --cache-views mixed views per image
    train.epochs     = <demo epochs> × schedule      (same steps per epoch, same lr/warm-up, so "4" is 4× the steps)
    train.eval_every_n_epochs = train.epochs         (evaluated once, at the end)

Reported per run: student k-NN and head top-1 (and the teacher's), the median step time over the logged intervals
(not the first, which holds compilation) and the wall time; then mixing on − off per (dataset, schedule), and the
step-time ratio on / off, which is what mixing costs end to end on this device.

    python benchmarks/function_matching.py [--quick] [--datasets demo,fine] [--schedules 1,4] [--mix mixup] [--device cpu]
        [--out runs/function_matching] [--json out.json] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script sits in
from dali_kd.commands.demo import TEACHER_STEPS, train_demo_teacher  # noqa: E402
from dali_kd.commands.demo_data import make_demo_dataset  # noqa: E402
from dali_kd.config import load_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_throughput import machine_info  # noqa: E402

FINE_TRAIN_PER_CLASS = 60  # a small set: where the paper expects function matching to help most
FINE_VAL_PER_CLASS = 40
# --quick: the whole script in about a minute on tiny data (4 classes, 32 px, 2 steps a run), to check it runs.
QUICK_DATA = {"num_classes": 4, "train_per_class": 8, "val_per_class": 4, "image_size": 40}
QUICK_SETTINGS = [
    "data.image_size=32", "data.eval_resize=36", "data.dali_threads=1", "train.batch_size=8",
    "train.max_steps_per_epoch=2", "train.knn_k=3", "train.optimizer.warmup_steps=1", "train.telemetry=false",
    "train.log_every_n_steps=1", "train.compile_student=false",
]  # fmt: skip


def dataset_overrides(name: str, cache_dir: Path, device: torch.device, quick: bool = False) -> list[str]:
    """The overrides that point the demo's configs at a dataset (and its teacher); makes both on first use."""
    if name == "demo" and not quick:
        return []  # the demo's own data and teacher, made by dali_kd.train itself on first use
    if name not in ("demo", "fine"):
        raise SystemExit(f"unknown dataset {name!r} (demo | fine)")
    classes = "shapes" if name == "demo" else "fine"
    sizes = (
        QUICK_DATA
        if quick
        else {"train_per_class": FINE_TRAIN_PER_CLASS, "val_per_class": FINE_VAL_PER_CLASS}
    )
    data = make_demo_dataset(cache_dir / name / "data", **sizes, classes=classes)
    teacher = cache_dir / name / "teacher_resnet18.safetensors"
    overrides = [
        f"data.root={data / 'train'}",
        f"data.val_root={data / 'val'}",
        f"model.teacher.checkpoint={teacher}",
        f"model.teacher.num_classes={sizes.get('num_classes', 10)}",
    ]
    if not teacher.is_file():
        settings = QUICK_SETTINGS if quick else []
        cfg = load_config(overrides=[*overrides, *settings, f"train.device={device.type}"])
        accuracy = train_demo_teacher(
            cfg, teacher, device, show_progress=False, steps=4 if quick else TEACHER_STEPS
        )
        print(f"{name}: teacher trained, val top-1 {accuracy:.1f}%", flush=True)
    return overrides


def arm_overrides(arm: str, args, run_stem: str) -> tuple[str, list[str]]:
    """(the arm's name in run names and tables, its overrides): off is `none`, on is the mix kind."""
    if arm == "off":
        return "none", ["data.augment.mix=none"]
    if arm not in ("on", "on+cache"):
        raise SystemExit(f"unknown arm {arm!r} (off | on | on+cache)")
    mixing = [f"data.augment.mix={args.mix}", f"data.augment.mix_alpha={args.mix_alpha}"]
    if arm == "on":
        return args.mix, mixing
    name = f"{args.mix}+cache{args.cache_views}"
    cache = [
        "train.cache_teacher_features=true", "train.cache_mode=replay",
        f"train.cache_views_per_image={args.cache_views}",
        f"train.teacher_feature_dir={args.out / f'cache-{run_stem}-{name}'}",
    ]  # fmt: skip
    return name, [*mixing, *cache]


def median_step_ms(run_dir: Path) -> float | None:
    """Median step time over the logged intervals, leaving out the first (it holds compilation and warm-up)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [row["step_ms"] for row in rows[1:] if "step_ms" in row]
    return statistics.median(steps) if steps else None


def run_one(name: str, overrides: list[str], args, out: Path) -> dict:
    run_dir = out / name
    if (run_dir / "summary.json").is_file() and not args.rerun:
        print(f"{name}: already done ({run_dir}); --rerun to run it again", flush=True)
    else:
        cmd = [
            sys.executable, "-m", "dali_kd.train", "--no-progress", "--device", args.device,
            f"train.output_dir={out}", f"train.run_name={name}", *overrides,
        ]  # fmt: skip
        print("$ " + " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "run": name,
        "student_knn_top1": summary.get("student_knn_top1"),
        "student_head_top1": summary.get("student_head_top1"),
        "teacher_knn_top1": summary.get("teacher_knn_top1"),
        "teacher_head_top1": summary.get("teacher_head_top1"),
        "steps": summary.get("steps"),
        "median_step_ms": median_step_ms(run_dir),
        "wall_s": summary.get("wall_s"),
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _delta(on: dict, off: dict, key: str) -> str:
    return "–" if on[key] is None or off[key] is None else f"{on[key] - off[key]:+.1f}"


def markdown(results: list[dict]) -> str:
    lines = [
        "| dataset | schedule | mix | steps | student k-NN % | student head % | teacher k-NN / head % | "
        "step ms | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['dataset']} | {r['schedule']}× | {r['mix']} | {r['steps']} | {_pct(r['student_knn_top1'])} | "
            f"{_pct(r['student_head_top1'])} | {_pct(r['teacher_knn_top1'])} / {_pct(r['teacher_head_top1'])} | "
            f"{r['median_step_ms']:.0f} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        "| dataset | schedule | mixing | k-NN on − off | head on − off | step time on / off |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["mix"] == "none":
            continue
        off = next(
            (
                o
                for o in results
                if (o["dataset"], o["schedule"], o["mix"]) == (r["dataset"], r["schedule"], "none")
            ),
            None,
        )
        if off is None:
            continue

        ratio = r["median_step_ms"] / off["median_step_ms"] if off["median_step_ms"] else float("nan")
        lines.append(
            f"| {r['dataset']} | {r['schedule']}× | {r['mix']} | {_delta(r, off, 'student_knn_top1')} | {_delta(r, off, 'student_head_top1')} | "
            f"{ratio:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="demo,fine", help="comma list: demo, fine")
    parser.add_argument("--schedules", default="1,4", help="comma list of multiples of the demo's epochs")
    parser.add_argument(
        "--mix", default="mixup", choices=["mixup", "cutmix", "both"], help="the 'on' setting"
    )
    parser.add_argument("--mix-alpha", type=float, default=1.0, help="data.augment.mix_alpha for mixup runs")
    parser.add_argument(
        "--arms",
        default="off,on",
        help="comma list: off (no mixing), on (--mix), on+cache (--mix with the teacher cache replaying "
        "--cache-views mixed views per image, as the function_matching preset does)",
    )
    parser.add_argument("--cache-views", type=int, default=16, help="K for the on+cache arm")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "function_matching")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("~/.cache/dali_kd/function_matching").expanduser(),
        help="where the fine set and its teacher are made on first use (the demo's own are dali_kd.train's)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and runs: checks the script in a minute"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run"
    )
    parser.add_argument("--rerun", action="store_true", help="run again a run whose summary.json exists")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    base_epochs = load_config().train.epochs
    if args.quick:
        base_epochs, args.schedules = 1, "1"
        args.cache_dir = args.out / "data"
        args.set = [*QUICK_SETTINGS, *args.set]
    results = []
    for dataset in args.datasets.split(","):
        data = dataset_overrides(dataset, args.cache_dir, device, args.quick)
        for schedule in (int(s) for s in args.schedules.split(",")):
            epochs = base_epochs * schedule
            for arm in args.arms.split(","):
                name, overrides = arm_overrides(arm, args, f"{dataset}-x{schedule}")
                overrides = [
                    *data,
                    *overrides,
                    f"train.epochs={epochs}",
                    f"train.eval_every_n_epochs={epochs}",
                    *args.set,
                ]
                row = run_one(f"{dataset}-x{schedule}-{name}", overrides, args, args.out)
                results.append({"dataset": dataset, "schedule": schedule, "mix": name, **row})
    report = {
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
