"""Two teachers vs one, on the demo data: the student distilled from both demo teachers (`--preset two_teachers`)
against the students distilled from each of them alone, over several seeds.

Every run is a real `python -m dali_kd.train` (the demo's configs, `--no-progress`); only these change:

    alone, first teacher    the demo as shipped (its ResNet-14-T)
    alone, second teacher   model.teacher.name / checkpoint = the two_teachers preset's second teacher
    both                    --preset two_teachers
    train.seed = each of --seeds, train.run_name = <arm>-s<seed>

The demo's teachers are trained on first use and cached as the demo does (~/.cache/dali_kd, or --home). Reported per
run, from its summary.json: the student's k-NN top-1; its agreement with each teacher on the held-out split (the mean
cosine between the student's adaptor output for that teacher and the teacher's pooled embedding: a student that did
not learn from a teacher has no adaptor for it, "–"); each teacher's own k-NN. Then the mean and spread per arm.

    python benchmarks/teachers_compare.py [--seeds 0,1,2] [--out runs/teachers_compare] [--json out.json]
        [--home DIR] [--quick] [--rerun] [--set KEY=VALUE ...]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script sits in
from dali_kd.config import load_config  # noqa: E402

PRESET = "two_teachers"
# --quick: the whole comparison in a minute or two on tiny data, to check that it runs: a few generated images of
# the demo's classes, teachers trained for a few steps, each run 2 steps.
QUICK_SETTINGS = [
    "data.dali_threads=1", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2", "train.knn_k=3",
    "train.optimizer.warmup_steps=1", "train.telemetry=false", "train.log_every_n_steps=1",
    "train.compile_student=false", "train.num_workers=0",
]  # fmt: skip
QUICK_TEACHER_STEPS = 4


def teachers() -> list[tuple[str, str, str]]:
    """(key, timm name, checkpoint) of each teacher of the two-teacher preset, in its order."""
    cfg = load_config(presets=[PRESET])
    return [
        (key, spec.name, spec.checkpoint or "")
        for key, spec in zip(cfg.model.teacher_keys, cfg.model.teacher_specs, strict=True)
    ]


def arms() -> dict[str, list[str]]:
    """Each arm's name and its command-line additions: each teacher alone, then both."""
    out = {}
    for key, name, checkpoint in teachers():
        out[key] = [f"model.teacher.name={name}", f"model.teacher.checkpoint={checkpoint}"]
    out["both"] = ["--preset", PRESET]
    return out


def prepare_quick(home: Path) -> list[str]:
    """--quick: a tiny generated dataset of the demo's ten classes under `home`, and each teacher of the preset
    trained on it for a few steps at its demo path (there, not in the real cache: HOME is `home`); returns the
    overrides that point every run at that data."""
    import torch

    from dali_kd.commands.demo import train_demo_teacher
    from dali_kd.commands.demo_data import make_demo_dataset

    data = make_demo_dataset(home / "quick-data", train_per_class=6, val_per_class=3, image_size=40)
    overrides = [f"data.root={data / 'train'}", f"data.val_root={data / 'val'}", *QUICK_SETTINGS]
    cfg = load_config(presets=[PRESET], overrides=[*overrides, "train.device=cpu"])
    for i, spec in enumerate(cfg.model.teacher_specs):
        path = Path(spec.checkpoint or "").expanduser()
        if not path.is_file():
            train_demo_teacher(cfg, path, torch.device("cpu"), False, steps=QUICK_TEACHER_STEPS, teacher=i)
    return overrides


def run_one(arm: str, seed: int, extra: list[str], args: argparse.Namespace, env: dict[str, str]) -> dict:
    name = f"{arm}-s{seed}"
    run_dir = args.out / name
    if (run_dir / "summary.json").is_file() and not args.rerun:
        print(f"{name}: already done ({run_dir}); --rerun to run it again", flush=True)
    else:
        cmd = [
            sys.executable, "-m", "dali_kd.train", "--no-progress", "--device", args.device, *extra,
            f"train.seed={seed}", f"train.output_dir={args.out}", f"train.run_name={name}", *args.set,
        ]  # fmt: skip
        print("$ " + " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"arm": arm, "seed": seed, **results_of(summary, [key for key, _, _ in teachers()], arm)}


def results_of(summary: dict, keys: list[str], arm: str) -> dict:
    """The comparison's numbers from one run's summary.json: with one teacher its results carry no key (agreement,
    teacher_knn_top1), with several each teacher's carries its own (agreement_<key>, teacher_knn_top1_<key>)."""
    row: dict = {"student_knn_top1": summary.get("student_knn_top1"), "wall_s": summary.get("wall_s")}
    for key in keys:
        if arm == "both":
            row[f"agreement_{key}"] = summary.get(f"agreement_{key}")
            row[f"teacher_knn_top1_{key}"] = summary.get(f"teacher_knn_top1_{key}")
        elif arm == key:
            row[f"agreement_{key}"] = summary.get("agreement")
            row[f"teacher_knn_top1_{key}"] = summary.get("teacher_knn_top1")
        else:
            row[f"agreement_{key}"] = None
            row[f"teacher_knn_top1_{key}"] = None
    return row


def _mean(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "–"
    spread = f" ± {statistics.stdev(got):.{3 if max(got) <= 1 else 1}f}" if len(got) > 1 else ""
    return f"{statistics.mean(got):.{3 if max(got) <= 1 else 1}f}{spread}"


def markdown(rows: list[dict], keys: list[str]) -> str:
    """One line per run, then one per arm: the mean ± the sample standard deviation over its seeds."""
    columns = [
        "student_knn_top1",
        *(f"agreement_{k}" for k in keys),
        *(f"teacher_knn_top1_{k}" for k in keys),
    ]
    titles = ["student k-NN %", *(f"agreement with {k}" for k in keys), *(f"{k} k-NN %" for k in keys)]
    lines = ["| arm | seed | " + " | ".join(titles) + " |", "|---" * (len(titles) + 2) + "|"]
    for row in rows:
        cells = [_mean([row[c]]) for c in columns]
        lines.append(f"| {row['arm']} | {row['seed']} | " + " | ".join(cells) + " |")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        cells = [_mean([r[c] for r in mine]) for c in columns]
        lines.append(f"| **{arm}** | mean of {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/teachers_compare"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--home", type=Path, default=None, help="where the demo's data and teachers are cached"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny data, few steps: checks that it runs")
    parser.add_argument("--rerun", action="store_true", help="run again what --out already holds")
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every run")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.home is not None:
        os.environ["HOME"] = str(args.home.resolve())  # the demo's cache (~/.cache/dali_kd) goes there
    if args.quick:
        if args.home is None:
            raise SystemExit(
                "--quick needs --home: its few-step teachers must not land in the real demo cache"
            )
        args.set = [*prepare_quick(args.home.resolve()), *args.set]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    keys = [key for key, _, _ in teachers()]
    rows = [
        run_one(arm, int(seed), extra, args, env)
        for seed in args.seeds.split(",")
        for arm, extra in arms().items()
    ]
    rows.sort(key=lambda r: (list(arms()).index(r["arm"]), r["seed"]))
    table = markdown(rows, keys)
    print(table, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"results": rows, "markdown": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
