"""What a first-use demo teacher costs and learns: the demo's own teacher recipe (dali_kd.commands.demo) for other
models, image sizes, step counts and learning rates, on the demo dataset, one row per case in one run.

Each row: val top-1 on the demo's 400 held-out images and the process CPU seconds the training took (CPU seconds,
not wall time, so rows taken on a shared machine still compare). The demo dataset is generated on first use under
the given --home (default: a temporary folder); the teachers are written there too, never to the real cache.

    python benchmarks/demo_teacher.py resnet14t:32:120 resnet18:48:180 [--lr 3e-3] [--threads 1] [--json out]

A case is MODEL:IMAGE_SIZE:STEPS (a timm name, the side in pixels, optimizer steps at batch 64).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def run_case(model: str, size: int, steps: int, lr: float) -> dict:
    import torch

    from dali_kd.commands import demo
    from dali_kd.config import load_config

    overrides = [
        f"data.image_size={size}",
        f"data.eval_resize={round(size * 9 / 8)}",
        f"data.local_crop_size={max(8, size // 2)}",
        f"model.teacher.name={model}",
    ]
    cfg = load_config(overrides=overrides)
    device = torch.device("cpu")
    demo.prepare_demo(cfg, device, show_progress=False, train_teacher=False)
    path = Path(os.environ["HOME"]) / f"teacher_{model}_{size}px_{steps}.safetensors"
    start = time.process_time()
    top1 = demo.train_demo_teacher(cfg, path, device, show_progress=False, steps=steps, lr=lr)
    return {"model": model, "image_size": size, "steps": steps, "lr": lr, "val_top1": round(top1, 1),
            "cpu_s": round(time.process_time() - start, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="MODEL:IMAGE_SIZE:STEPS")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds compare best)")
    parser.add_argument("--home", type=Path, default=None, help="where the demo data and teachers go")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cases = []
    for case in args.cases:
        model, size, steps = case.split(":")
        cases.append((model, int(size), int(steps)))
    with tempfile.TemporaryDirectory(prefix="dali_kd_demo_teacher_") as tmp:
        os.environ["HOME"] = str(args.home or tmp)
        import torch

        torch.set_num_threads(args.threads)
        rows = []
        for model, size, steps in cases:
            row = run_case(model, size, steps, args.lr)
            rows.append(row)
            print(f"{model} {size} px, {steps} steps, lr {args.lr:g}: val top-1 {row['val_top1']:.1f}%, "
                  f"{row['cpu_s']:.0f} CPU s", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
