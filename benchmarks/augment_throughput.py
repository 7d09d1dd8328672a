"""CPU vs GPU augmentation: images/s of the four augmentations through each data path, side by side in one run.

Same files, same AugmentParams, same batch size for every path:
  torchvision  dali_kd's torchvision backend (PIL + torchvision in a DataLoader, persistent_workers=False — the
               original trainer's path) at several worker counts, including the original's 4
  dali_raw     the raw DALI CPU pipeline (pipelines.train_pipeline, pipe.run()) — what dali_kd's loader wraps
  dali_cpu     dali_kd's DALI loader in CPU-only mode (torch tensors out) at several thread counts
  dali_raw_gpu the raw DALI pipeline on the GPU (decode "mixed", hardware JPEG decoder where present)
  dali_gpu     dali_kd's DALI loader on the GPU

--decode window,full measures every DALI row with each decode side by side (window: only the crop window is
decoded; full: the whole image, then the view is cut from it; see pipelines.params.DecodeParams) and gives each
full-decode row its rate relative to the window row; --output-dtype sets what the DALI pipelines hand out. The
loader rows take these only where dali_kd's loader accepts a `decode` argument; until then they run its own
default (window, float32) and are left out for any other choice, and the multi-crop rows run float32
(settings.loader_takes_decode in the JSON says which).

Each is warmed up, then timed over several repeats: median, spread (min-max), CPU-seconds per image (this process
and its DataLoader workers), and the ratio to torchvision at the same number of CPU workers/threads.

--multi-crop adds DINO multi-crop per path (torchvision, DALI CPU, DALI GPU), at one worker/thread count: one view
per image, the 2 global crops only, and 2 global + N local crops, and reports what the local crops cost per image
(2+N crops time / global-only time; the original trainer paid about 3×).

    python benchmarks/augment_throughput.py [--quick] [--multi-crop] [--decode window,full]
        [--output-dtype float32|float16] [--json out.json] [--md out.md] [--png out.png]
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dali_kd.data.dali_loader import DaliTrainStream
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.torchvision_loader import TorchvisionTrainStream
from pipelines.params import (
    DECODE_MODES,
    DEFAULT_DECODE,
    OUTPUT_DTYPES,
    AugmentParams,
    DecodeParams,
    MultiCropParams,
)
from pipelines.pipelines import train_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import make_dataset  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Whether dali_kd's loader takes the decoder choices yet (the raw pipeline always does).
LOADER_TAKES_DECODE = "decode" in inspect.signature(DaliTrainStream).parameters


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU time of this process (all its threads) and of the given child processes."""
    times = os.times()
    total = times.user + times.system
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(
    make_batches, batch_size: int, warmup: int, batches: int, repeats: int, queued: int = 2, sync=None
) -> dict:
    """Time `batches` batches `repeats` times from one long-lived iterator, after warming up.

    The warm-up also drains the `queued` batches a loader prepares ahead (DataLoader: 2 per worker; DALI: its
    prefetch queue), which would otherwise be counted as if they had been made in no time.
    """
    iterator, pids_of, close = make_batches()
    for _ in range(warmup + queued):
        next(iterator)
    rates, cpu = [], []
    for _ in range(repeats):
        pids = pids_of()
        c0, t0 = cpu_seconds(pids), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        if sync:
            sync()
        elapsed = time.perf_counter() - t0
        cpu.append((cpu_seconds(pids) - c0) / (batches * batch_size))
        rates.append(batches * batch_size / elapsed)
    close()
    return {
        "img_per_s": statistics.median(rates),
        "img_per_s_min": min(rates),
        "img_per_s_max": max(rates),
        "cpu_s_per_img": statistics.median(cpu),
        "repeats": repeats,
    }


def torchvision_batches(index, params, batch_size, workers):
    def make():
        stream = TorchvisionTrainStream(
            index, params, batch_size=batch_size, seed=0, num_workers=workers, persistent_workers=False
        )
        iterator = iter(stream)
        next(iterator)  # starts the workers
        return iterator, stream.worker_pids, stream.close

    return make


def loader_decode(decode: DecodeParams) -> dict:
    """The loader's keyword for these decoder choices ({} for the loader's own default where it takes none)."""
    if LOADER_TAKES_DECODE:
        return {"decode": decode}
    if decode != DecodeParams():
        raise ValueError("dali_kd's loader does not take decoder choices yet")
    return {}


def dali_loader_batches(index, params, batch_size, threads, device, decode: DecodeParams = DEFAULT_DECODE):
    choices = loader_decode(decode)  # raises here, before anything is measured

    def make():
        stream = DaliTrainStream(
            index, params, batch_size=batch_size, seed=0, device=device, num_threads=threads, **choices
        )
        return iter(stream), list, stream.close

    return make


def dali_raw_batches(index, params, batch_size, threads, decode: DecodeParams, device_id: int | None = None):
    def make():
        pipe = train_pipeline(
            index.files,
            params,
            batch_size=batch_size,
            seed=0,
            num_threads=threads,
            device_id=device_id,
            decode=decode,
        )
        pipe.build()
        return (pipe.run() for _ in itertools.count()), list, lambda: None

    return make


def parse_modes(text: str) -> list[str]:
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in DECODE_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"--decode takes a comma list of {', '.join(DECODE_MODES)}, got {text!r}"
        )
    return modes


def parse_counts(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def run(args) -> dict:
    cores = os.cpu_count() or 1
    params = AugmentParams(image_size=args.image_size)
    decodes = {mode: DecodeParams(mode=mode, dtype=args.output_dtype) for mode in args.decode}
    gpu = torch.cuda.is_available() and not args.no_gpu
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_dataset(Path(tmp) / "data", num_images=args.num_images, num_classes=10)
        index = ImageIndex.from_folder(data)
        common = {
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "batches": args.batches,
            "repeats": args.repeats,
        }
        results = []

        def record(backend: str, workers: int, make, sync=None, decode: str | None = None) -> None:
            queued = 2 * workers if backend == "torchvision" else 2
            row = {
                "backend": backend,
                "workers": workers,
                "decode": decode,  # None: not a DALI row (PIL decodes the whole image)
                **measure(make, queued=queued, sync=sync, **common),
            }
            results.append(row)
            print(
                f"  {backend:<12} workers={workers:<3} decode={decode or '-':<6} {row['img_per_s']:8.1f} img/s",
                flush=True,
            )

        def record_loader(backend: str, threads: int, device: str, mode: str, sync=None) -> None:
            try:
                make = dali_loader_batches(index, params, args.batch_size, threads, device, decodes[mode])
            except ValueError as e:
                print(f"  {backend:<12} workers={threads:<3} decode={mode:<6} skipped: {e}", flush=True)
                return
            record(backend, threads, make, sync=sync, decode=mode)

        for workers in parse_counts(args.workers):
            record("torchvision", workers, torchvision_batches(index, params, args.batch_size, workers))
        for threads in parse_counts(args.dali_threads):
            for mode, decode in decodes.items():
                make = dali_raw_batches(index, params, args.batch_size, threads, decode)
                record("dali_raw", threads, make, decode=mode)
                record_loader("dali_cpu", threads, "cpu", mode)
        if gpu:
            for threads in parse_counts(args.gpu_threads or str(cores)):
                for mode, decode in decodes.items():
                    make = dali_raw_batches(index, params, args.batch_size, threads, decode, device_id=0)
                    record("dali_raw_gpu", threads, make, sync=torch.cuda.synchronize, decode=mode)
                    record_loader("dali_gpu", threads, "cuda", mode, sync=torch.cuda.synchronize)
        multi_crop = measure_multi_crop(args, index, params, common) if args.multi_crop else []
    baseline = {r["workers"]: r["img_per_s"] for r in results if r["backend"] == "torchvision"}
    original = baseline.get(4)
    rate = {(r["backend"], r["workers"], r["decode"]): r["img_per_s"] for r in results}
    for r in results:
        # Equal CPU workers/threads; torchvision with 0 workers decodes in the main process, i.e. one core.
        same = baseline.get(r["workers"]) or (baseline.get(0) if r["workers"] == 1 else None)
        r["ratio_vs_torchvision_same_workers"] = r["img_per_s"] / same if same else None
        r["ratio_vs_torchvision_4_workers"] = r["img_per_s"] / original if original else None
        raw = rate.get(("dali_raw", r["workers"], r["decode"]))
        if r["backend"] == "dali_cpu" and raw:
            r["ratio_vs_dali_raw"] = r["img_per_s"] / raw
        window = rate.get((r["backend"], r["workers"], "window"))
        if r["decode"] == "full" and window:
            r["ratio_vs_window_decode"] = r["img_per_s"] / window
    return {
        "results": results,
        "multi_crop": multi_crop,
        "settings": {
            "num_images": index.num_samples,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "augment": vars(params),
            "decode": args.decode,
            "output_dtype": args.output_dtype,
            "loader_takes_decode": LOADER_TAKES_DECODE,
            **common,
        },
        "machine": machine_info(),
    }


def crop_settings(params: AugmentParams, args) -> dict[str, AugmentParams | MultiCropParams]:
    """One view; the 2 global crops only; 2 global + N local crops (the issue's sizes and scales)."""
    global_view = AugmentParams(**{**vars(params), "crop_scale": (0.32, 1.0)})
    local_view = AugmentParams(**{**vars(params), "image_size": args.local_size, "crop_scale": (0.05, 0.32)})
    return {
        "one view": params,
        "2 global": MultiCropParams(global_view, local_view, num_global=2, num_local=0),
        f"2 global + {args.local_crops} local": MultiCropParams(
            global_view, local_view, num_global=2, num_local=args.local_crops
        ),
    }


def measure_multi_crop(args, index, params: AugmentParams, common: dict) -> list[dict]:
    """Each path with each crop setting; per-image cost relative to the same path's global-only setting."""
    cores = os.cpu_count() or 1
    workers = min(4, cores) if args.quick else cores
    # Multi-crop always decodes the whole image once; the output dtype still applies where the loader takes it.
    decode = DecodeParams(dtype=args.output_dtype) if LOADER_TAKES_DECODE else DecodeParams()
    paths = {
        "torchvision": lambda p: torchvision_batches(index, p, args.batch_size, workers),
        "dali_cpu": lambda p: dali_loader_batches(index, p, args.batch_size, workers, "cpu", decode),
    }
    if torch.cuda.is_available() and not args.no_gpu:
        paths["dali_gpu"] = lambda p: dali_loader_batches(index, p, args.batch_size, workers, "cuda", decode)
    rows = []
    for backend, make in paths.items():
        sync = torch.cuda.synchronize if backend == "dali_gpu" else None
        queued = 2 * workers if backend == "torchvision" else 2
        by_setting = {}
        for setting, crop_params in crop_settings(params, args).items():
            row = {"backend": backend, "workers": workers, "crops": setting}
            row.update(measure(make(crop_params), queued=queued, sync=sync, **common))
            by_setting[setting] = row["img_per_s"]
            rows.append(row)
            print(f"  {backend:<12} {setting:<20} {row['img_per_s']:8.1f} img/s", flush=True)
        for row in rows[-len(by_setting) :]:
            # Cost per image relative to the global-only pipeline: rate ratio inverted.
            row["cost_vs_global_only"] = by_setting["2 global"] / row["img_per_s"]
    return rows


def machine_info() -> dict:
    import nvidia.dali

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": nvidia.dali.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def markdown(report: dict) -> str:
    lines = [
        "| backend | workers/threads | decode | img/s (median) | spread | CPU-s/img | × torchvision same workers "
        "| × torchvision 4 workers | × window decode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        same = r["ratio_vs_torchvision_same_workers"]
        four = r["ratio_vs_torchvision_4_workers"]
        window = r.get("ratio_vs_window_decode")
        lines.append(
            f"| {r['backend']} | {r['workers']} | {r['decode'] or '—'} | {r['img_per_s']:.1f} "
            f"| {r['img_per_s_min']:.0f}–{r['img_per_s_max']:.0f} | {r['cpu_s_per_img'] * 1000:.2f} ms "
            f"| {f'{same:.2f}×' if same else '—'} | {f'{four:.2f}×' if four else '—'} "
            f"| {f'{window:.2f}×' if window else '—'} |"
        )
    lines.append(f"\nDALI output dtype: {report['settings']['output_dtype']}")
    loaders = [r for r in report["results"] if "ratio_vs_dali_raw" in r]
    for r in loaders:
        lines.append(
            f"\ndali_kd loader vs raw DALI pipeline, {r['workers']} threads, {r['decode']} decode: "
            f"{r['ratio_vs_dali_raw']:.3f}×"
        )
    if report.get("multi_crop"):
        lines += [
            "",
            "| backend | workers/threads | crops per image | images/s (median) | spread | cost per image vs 2 global |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["multi_crop"]:
            lines.append(
                f"| {r['backend']} | {r['workers']} | {r['crops']} | {r['img_per_s']:.1f} | "
                f"{r['img_per_s_min']:.0f}–{r['img_per_s_max']:.0f} | {r['cost_vs_global_only']:.2f}× |"
            )
    return "\n".join(lines)


def bar_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['backend']}\n{r['workers']}" + (f" {r['decode']}" if r["decode"] else "") for r in rows]
    colours = {
        "torchvision": "#7f7f7f",
        "dali_raw": "#aec7e8",
        "dali_cpu": "#1f77b4",
        "dali_raw_gpu": "#98df8a",
        "dali_gpu": "#2ca02c",
    }
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5), constrained_layout=True)
    values = [r["img_per_s"] for r in rows]
    errors = [
        [r["img_per_s"] - r["img_per_s_min"] for r in rows],
        [r["img_per_s_max"] - r["img_per_s"] for r in rows],
    ]
    ax.bar(labels, values, yerr=errors, color=[colours[r["backend"]] for r in rows], capsize=3)
    m = report["machine"]
    ax.set(
        ylabel="images/s",
        title=f"Four augmentations at {report['settings']['image_size']} px — {m['cpu_cores']} CPU cores"
        + (f", {m['gpu']}" if m.get("gpu") else ""),
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finishes in under 2 minutes on 2 cores")
    parser.add_argument("--data", type=Path, help="an existing image tree (default: a generated one)")
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default=f"0,2,4,{cores}", help="torchvision DataLoader worker counts")
    parser.add_argument("--dali-threads", default=f"1,2,{cores}", help="DALI CPU thread counts")
    parser.add_argument(
        "--gpu-threads", default=None, help="DALI GPU pipeline CPU threads (default: all cores)"
    )
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument(
        "--decode",
        type=parse_modes,
        default=["window"],
        help="DALI decode modes to measure side by side, a comma list of window,full (default: window)",
    )
    parser.add_argument(
        "--output-dtype", choices=OUTPUT_DTYPES, default="float32", help="dtype the DALI pipelines hand out"
    )
    parser.add_argument("--multi-crop", action="store_true", help="also measure DINO multi-crop per path")
    parser.add_argument("--local-crops", type=int, default=8, help="multi-crop: local crops per image")
    parser.add_argument("--local-size", type=int, default=96, help="multi-crop: local crop side, pixels")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.num_images, args.batch_size, args.warmup, args.batches, args.repeats = 96, 16, 1, 12, 3
        args.workers, args.dali_threads = f"0,{min(2, cores)},4", f"{min(2, cores)}"
        args.local_crops, args.local_size = 4, 48
    report = run(args)
    table = markdown(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    md = args.md or (args.json.with_suffix(".md") if args.json else None)
    if md:
        md.write_text(table + "\n")
    png = args.png or (args.json.with_suffix(".png") if args.json else None)
    if png:
        bar_chart(report, png)


if __name__ == "__main__":
    main()
