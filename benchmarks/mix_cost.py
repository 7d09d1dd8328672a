"""The cost of function matching's mixing step per batch: draw (host) + mix (device), on synthetic views.

Times `draw_mix` + `mix_batch` (the work `MixingStream` adds to each batch) after a warm-up, median of the repeats,
for each kind, at the given batch and view size; with --student NAME, in the same run, one forward + backward of
that timm model on the same batch, and the mixing step as a share of it (a training step costs more still: the
teacher's forward, the optimizer).

    python benchmarks/mix_cost.py [--device cpu|cuda] [--batch-size 64] [--size 224] [--repeats 30]
        [--student resnet10t] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in
from dali_kd.data.batch import Batch, ViewRecord  # noqa: E402
from dali_kd.data.mixing import MixParams, draw_mix, mix_batch, mix_generator  # noqa: E402


def synthetic_batch(batch_size: int, size: int, device: torch.device, dtype: torch.dtype) -> Batch:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=gen).to(device, dtype)
    view = ViewRecord(
        torch.rand(batch_size, 2), torch.rand(batch_size, 2), torch.zeros(batch_size, dtype=torch.long),
        torch.rand(batch_size, 4),
    ).to(device)  # fmt: skip
    ids = torch.arange(batch_size, device=device)
    return Batch(images, ids, ids, view)


def time_kind(kind: str, batch: Batch, repeats: int) -> float:
    """Median ms of one batch's draw + mix (the device synchronised after each, so the mix is counted)."""
    params, size, times = MixParams(kind), batch.images.shape[-1], []
    for n in range(repeats + 5):
        start = time.perf_counter()
        mixed = mix_batch(batch, draw_mix(mix_generator(0, 0, n), len(batch), params, size))
        if mixed.images.is_cuda:
            torch.cuda.synchronize()
        if n >= 5:  # the first ones warm up allocator and kernels
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_student(name: str, batch: Batch, repeats: int) -> float:
    """Median ms of one forward + backward of timm model `name` on the batch (a floor for a training step)."""
    import timm

    model = timm.create_model(name, num_classes=10).to(batch.images.device)
    images, times = batch.images.float(), []
    for n in range(repeats + 2):
        start = time.perf_counter()
        model(images).float().logsumexp(1).mean().backward()
        if images.is_cuda:
            torch.cuda.synchronize()
        if n >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--student", help="also time this timm model's forward + backward on the batch")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = synthetic_batch(args.batch_size, args.size, device, getattr(torch, args.dtype))
    results = {kind: time_kind(kind, batch, args.repeats) for kind in ("mixup", "cutmix", "both")}
    student_ms = time_student(args.student, batch, max(3, args.repeats // 5)) if args.student else None
    for kind, ms in results.items():
        share = f", {100 * ms / student_ms:.1f}% of the student's step" if student_ms else ""
        print(
            f"{kind:7s} {ms:8.2f} ms per batch of {args.batch_size} × {args.size}² ({device}, {args.dtype}){share}"
        )
    if student_ms:
        print(f"{args.student} forward + backward on the same batch: {student_ms:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    **vars(args),
                    "ms": results,
                    "student_ms": student_ms,
                },
                f,
            )


if __name__ == "__main__":
    main()
