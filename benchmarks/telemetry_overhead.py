"""Telemetry overhead: the same training run with `train.telemetry` on and off, alternated, in one process.

Reports the median step time of each and their ratio (on / off); the target is under 1% (ratio < 1.01).

    python benchmarks/telemetry_overhead.py [--quick] [--device auto|cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dali_kd.config import load_config
from dali_kd.runtime import resolve_device
from dali_kd.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import make_dataset  # noqa: E402


def run_once(data: Path, out: Path, telemetry: bool, args, device: torch.device) -> float:
    """Median step time (ms) over the log intervals after the first (which holds warm-up)."""
    cfg = load_config(
        overrides=[
            f"data.root={data}",
            "data.val_root=null",
            "data.scan=off",
            f"data.image_size={args.image_size}",
            f"data.dali_threads={args.threads}",
            f"model.teacher.name={args.teacher}",
            "model.teacher.checkpoint=null",
            f"model.student.name={args.student}",
            f"train.batch_size={args.batch_size}",
            "train.epochs=1",
            f"train.max_steps_per_epoch={args.steps}",
            f"train.log_every_n_steps={args.log_every}",
            "train.compile_student=false",
            f"train.telemetry={str(telemetry).lower()}",
            f"train.output_dir={out}",
            f"train.run_name={'on' if telemetry else 'off'}-{len(list(out.glob('*')))}",
        ]
    )
    run_dir = out / cfg.train.run_name
    Trainer(cfg, device, show_progress=False).fit(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_ms"] for r in rows[1:])


def direct_cost_ms(device: torch.device, log_every: int, out: Path) -> dict:
    """The telemetry calls' own cost, timed in isolation: per step (timer marks) and per log row (amortised)."""
    from dali_kd.telemetry.monitor import RunMonitor

    monitor = RunMonitor(out, device)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        monitor.timer.start_step()
        for _ in range(3):
            monitor.timer.mark()
        monitor.timer.end_step()
    per_step = 1000 * (time.perf_counter() - t0) / n
    rows = 50
    t0 = time.perf_counter()
    for i in range(rows):
        monitor.log(step=i, epoch=0, losses={"loss": 1.0}, steps=n // rows, images=1, lr=0.1)
    per_row = 1000 * (time.perf_counter() - t0) / rows
    monitor.close()
    return {
        "per_step_ms": per_step,
        "per_log_row_ms": per_row,
        "per_step_amortised_ms": per_step + per_row / log_every,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds), to check the script works")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.log_every, args.batch_size = 1, 6, 2, 8
        args.teacher, args.student, args.image_size = "test_resnet", "test_vit", 32
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", num_images=64 if args.quick else 256, num_classes=4)
        direct = direct_cost_ms(device, args.log_every, tmp)
        on, off = [], []
        for _ in range(args.repeats):  # alternate, so drifts in machine load hit both sides alike
            off.append(run_once(data, tmp / "runs", False, args, device))
            on.append(run_once(data, tmp / "runs", True, args, device))
    result = {
        "step_ms_telemetry_on": statistics.median(on),
        "step_ms_telemetry_off": statistics.median(off),
        "ratio_on_off": statistics.median(on) / statistics.median(off),
        "direct_cost": direct,
        "direct_overhead_pct": 100 * direct["per_step_amortised_ms"] / statistics.median(off),
        "runs_on": on,
        "runs_off": off,
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"device": str(device)},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": torch.get_num_threads(),
        },
    }
    print(
        f"telemetry on {result['step_ms_telemetry_on']:.2f} ms/step, off {result['step_ms_telemetry_off']:.2f} "
        f"ms/step: measured overhead {100 * (result['ratio_on_off'] - 1):+.2f}% ({args.repeats} alternating repeats, "
        f"{device}, run-to-run spread {100 * (max(off) - min(off)) / statistics.median(off):.0f}%)"
    )
    print(
        f"telemetry calls timed directly: {direct['per_step_amortised_ms'] * 1000:.1f} µs per step (marks "
        f"{direct['per_step_ms'] * 1000:.1f} µs + one row {direct['per_log_row_ms']:.2f} ms / {args.log_every} steps) "
        f"= {result['direct_overhead_pct']:.3f}% of the step"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
