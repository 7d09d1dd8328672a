"""The teacher cache's replay with and without look-ahead: ms per batch the consumer waits, beside a step.

Makes an ImageNet-like tree (benchmarks/make_dataset.py), fills a cache with one stored view per image (fixed view
records and stand-in targets: no teacher), then replays it with data.prefetch_batches 1 (each batch rendered when
asked for) and N (DALI renders the next batches while the consumer works), alternating the two `--rounds` times
in one run. The consumer's "step" is one forward + backward of a timm student on the batch (--student), or none.
Reports, per setting, the median over rounds of: the wait for each batch (data ms), the whole batch + step
(ms/batch), and the ratio ahead / in turn.

    python benchmarks/replay_throughput.py [--device cpu|cuda] [--num-images 256] [--batch-size 32] [--size 224]
        [--prefetch 2] [--batches 12] [--rounds 3] [--student resnet18] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in
from benchmarks.make_dataset import make_dataset  # noqa: E402
from dali_kd.config import StreamSettings  # noqa: E402
from dali_kd.data.batch import ViewRecord  # noqa: E402
from dali_kd.data.dataset import ImageIndex  # noqa: E402
from dali_kd.data.outputs import ModelOutput  # noqa: E402
from dali_kd.pipelines.params import AugmentParams  # noqa: E402
from dali_kd.teacher_cache.layout import Part  # noqa: E402
from dali_kd.teacher_cache.store import TeacherCache  # noqa: E402
from dali_kd.teacher_cache.stream import CachedViewStream  # noqa: E402


def filled_cache(directory: Path, index: ImageIndex, feature: int = 384) -> TeacherCache:
    """Every row done: a centred 0.7 × 0.8 window, alternate flips, mild jitter; random pooled targets."""
    cache = TeacherCache(directory, {"teacher": "bench"}, [Part("pooled", (feature,), "float16")],
                         index.num_samples, 1, create=True)  # fmt: skip
    n = index.num_samples
    ids, slots = np.arange(n), np.zeros(n, dtype=np.int64)
    view = ViewRecord(
        crop_anchor=torch.tensor([[0.15, 0.1]]).repeat(n, 1), crop_shape=torch.tensor([[0.7, 0.8]]).repeat(n, 1),
        flip=torch.arange(n) % 2, jitter=torch.tensor([[1.1, 0.9, 1.0, 0.02]]).repeat(n, 1),
    )  # fmt: skip
    pooled = torch.randn(n, feature, generator=torch.Generator().manual_seed(0))
    cache.write(ids, slots, ModelOutput(pooled=pooled, logits=None, patch_tokens=None), view)
    return cache


def run_once(args, index, cache, prefetch: int, step) -> tuple[float, float]:
    """(median data ms, ms per batch) over args.batches batches after 2 warm-up batches."""
    settings = StreamSettings.with_defaults(
        AugmentParams(view_size=args.size),
        args.batch_size,
        0,
        dali_threads=args.threads,
        prefetch_batches=prefetch,
    )
    stream = CachedViewStream(settings, index, torch.device(args.device), cache=cache, mode="replay")
    it = iter(stream)
    for _ in range(2):
        step(next(it))
    waits = []
    start = time.perf_counter()
    for _ in range(args.batches):
        t0 = time.perf_counter()
        batch = next(it)
        waits.append(time.perf_counter() - t0)
        step(batch)
    total = time.perf_counter() - start
    stream.close()
    return 1000 * statistics.median(waits), 1000 * total / args.batches


def make_step(args):
    if not args.student:
        return lambda batch: None
    import timm

    model = timm.create_model(args.student, num_classes=10).to(args.device)

    def step(batch):
        model(batch.images.float()).logsumexp(1).mean().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--prefetch", type=int, default=2, help="data.prefetch_batches of the look-ahead run")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--student", default="resnet18", help="timm model stepped per batch ('' for none)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "dali_kd-replay-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    index = ImageIndex.from_folder(make_dataset(args.data / "images", args.num_images))
    step = make_step(args)
    results: dict[int, list[tuple[float, float]]] = {1: [], args.prefetch: []}
    with tempfile.TemporaryDirectory() as cache_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = filled_cache(Path(cache_dir), index)
        for _ in range(args.rounds):
            for prefetch in results:  # alternating: both settings see the same machine load
                results[prefetch].append(run_once(args, index, cache, prefetch, step))
    summary = {
        f"prefetch_{p}": {
            "data_ms": statistics.median(r[0] for r in runs),
            "ms_per_batch": statistics.median(r[1] for r in runs),
        }
        for p, runs in results.items()
    }
    ahead, in_turn = summary[f"prefetch_{args.prefetch}"], summary["prefetch_1"]
    summary["ratio_ms_per_batch_ahead_vs_in_turn"] = ahead["ms_per_batch"] / in_turn["ms_per_batch"]
    summary["args"] = {k: str(v) for k, v in vars(args).items()}
    print(
        f"| prefetch_batches | data ms | ms/batch (batch {args.batch_size}, step: {args.student or 'none'}) |"
    )
    print("|---|---|---|")
    for p in results:
        s = summary[f"prefetch_{p}"]
        print(f"| {p} | {s['data_ms']:.1f} | {s['ms_per_batch']:.1f} |")
    print(f"ms/batch ahead / in turn: {summary['ratio_ms_per_batch_ahead_vs_in_turn']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
