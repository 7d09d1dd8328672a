"""CPU vs GPU augmentation: images/s of the four augmentations through each data path, side by side in one run.

Same files, same AugmentParams, same batch size for every path:
  torchvision  dali_kd's torchvision backend (PIL + torchvision in a DataLoader, persistent_workers=False — the
               original trainer's path) at several worker counts, including the original's 4
  dali_raw     the raw DALI CPU pipeline (pipelines/graphs.py train_pipeline, pipe.run()) — what dali_kd's loader wraps
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

--format folder,shards measures every path from both formats of the same images: the image files, and the tar
shards `python -m dali_kd.shard` makes of them (written once into --work, and kept there for the next run), each
shards row next to its folder row with its rate relative to it. It also counts the dataset files dali_kd's DALI
loader opens per 1,000 images in each format: a child process reads the images under `strace -f -e trace=open,openat`
and every open of a path under the image folder or the shard folder is counted (setup — listing, manifest, index
files — apart from reading); without strace the count is derived from the design and marked so.

--multi-crop adds DINO multi-crop per path (torchvision, DALI CPU, DALI GPU), at one worker/thread count: one view
per image, the 2 global crops only, and 2 global + N local crops, and reports what the local crops cost per image
(2+N crops time / global-only time; the original trainer paid about 3×). --multi-crop-graph batched,per_crop
measures the DALI rows with each multi-crop graph side by side (data.multi_crop_graph; default auto, the graph each
device picks); a row of the graph auto would not pick on its device says so in its backend, e.g.
"dali_gpu (per_crop)", and every DALI row carries the graph it ran in "graph".

    python benchmarks/augment_throughput.py [--quick] [--multi-crop] [--multi-crop-graph batched,per_crop]
        [--decode window,full]
        [--format folder,shards] [--work DIR] [--shard-size 10MB]
        [--output-dtype float32|float16] [--json out.json] [--md out.md] [--png out.png]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
# The checkout this script sits in, not whichever dali_kd the environment installed (a worktree measures its own
# code; the child that counts file opens imports the same).
sys.path[:0] = [str(ROOT), str(BENCHMARKS)]

from make_dataset import make_dataset  # noqa: E402

from dali_kd.config import StreamSettings  # noqa: E402
from dali_kd.data.dali_loader import DaliTrainStream  # noqa: E402
from dali_kd.data.dataset import ImageIndex  # noqa: E402
from dali_kd.data.shard_index import index_from_shards  # noqa: E402
from dali_kd.data.shards import READER_IMAGE_EXT  # noqa: E402
from dali_kd.data.torchvision_loader import TorchvisionTrainStream  # noqa: E402
from dali_kd.pipelines.graphs import ShardFiles, train_pipeline  # noqa: E402
from dali_kd.pipelines.params import (  # noqa: E402
    DECODE_MODES,
    DEFAULT_DECODE,
    MULTI_CROP_GRAPHS,
    OUTPUT_DTYPES,
    AugmentParams,
    DecodeParams,
    MultiCropParams,
    resolve_multi_crop_graph,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FORMATS = ("folder", "shards")


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
        settings = StreamSettings.with_defaults(params, batch_size, 0, num_workers=workers)
        stream = TorchvisionTrainStream(settings, index)
        iterator = iter(stream)
        next(iterator)  # starts the workers
        return iterator, stream.worker_pids, stream.close

    return make


def dali_loader_batches(index, params, batch_size, threads, device, decode: DecodeParams = DEFAULT_DECODE):
    settings = replace(
        StreamSettings.with_defaults(params, batch_size, 0, dali_threads=threads), decode=decode
    )

    def make():
        stream = DaliTrainStream(settings, index, device)
        return iter(stream), list, stream.close

    return make


def reader_source(index: ImageIndex) -> list[str] | ShardFiles:
    """What the raw pipeline reads: the image files, or the tar shards through their index files."""
    if index.shards is None:
        return list(index.files)
    layout = index.shards
    return ShardFiles(paths=layout.tar_paths, index_paths=layout.index_paths, image_ext=READER_IMAGE_EXT)


def dali_raw_batches(index, params, batch_size, threads, decode: DecodeParams, device_id: int | None = None):
    def make():
        pipe = train_pipeline(
            reader_source(index),
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


def parse_graphs(text: str) -> list[str]:
    graphs = list(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    if not graphs or any(g not in MULTI_CROP_GRAPHS for g in graphs):
        raise argparse.ArgumentTypeError(
            f"--multi-crop-graph takes a comma list of {', '.join(MULTI_CROP_GRAPHS)}, got {text!r}"
        )
    return graphs


def parse_formats(text: str) -> list[str]:
    formats = list(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    if not formats or any(f not in FORMATS for f in formats):
        raise argparse.ArgumentTypeError(f"--format takes a comma list of {', '.join(FORMATS)}, got {text!r}")
    return formats


def parse_counts(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def dataset_indexes(args, work: Path) -> dict[str, ImageIndex]:
    """The same images in each format asked for: the folder (given or generated into work/data), and its shards,
    made once into work/shards by dali_kd.shard (a rerun with the same settings keeps the shards it finds)."""
    data = args.data or make_dataset(work / "data", num_images=args.num_images, num_classes=10)
    indexes = {}
    for fmt in args.format:
        if fmt == "folder":
            indexes[fmt] = ImageIndex.from_folder(data)
        else:
            from dali_kd.commands.shard import parse_size
            from dali_kd.data.shard_writer import ShardOptions, make_shards

            made = make_shards(
                data, work / "shards", ShardOptions(parse_size(args.shard_size)), show_progress=False
            )
            print(
                f"  shards: {len(made.manifest['shards'])} tars of {args.shard_size} in {made.out} "
                f"({len(made.written)} written, {len(made.kept)} kept from an earlier run)",
                flush=True,
            )
            indexes[fmt] = index_from_shards(made.out, where="--format shards")
    return indexes


def dataset_root(index: ImageIndex) -> Path:
    """The folder whose files make up the dataset: the image tree, or the shard folder (tars, index files,
    manifest)."""
    return Path(os.path.dirname(index.shards.tar_paths[0])) if index.shards else Path(index.root)


def run(args) -> dict:
    cores = os.cpu_count() or 1
    params = AugmentParams(view_size=args.image_size)
    decodes = {mode: DecodeParams(mode=mode, dtype=args.output_dtype) for mode in args.decode}
    gpu = torch.cuda.is_available() and not args.no_gpu
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        indexes = dataset_indexes(args, work)
        common = {
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "batches": args.batches,
            "repeats": args.repeats,
        }
        results = []

        def record(backend: str, workers: int, make, fmt: str, sync=None, decode: str | None = None) -> None:
            queued = 2 * workers if backend == "torchvision" else 2
            row = {
                "backend": backend,
                "workers": workers,
                "decode": decode,  # None: not a DALI row (PIL decodes the whole image)
                "format": fmt,
                **measure(make, queued=queued, sync=sync, **common),
            }
            results.append(row)
            print(
                f"  {backend:<12} workers={workers:<3} decode={decode or '-':<6} {fmt:<6} "
                f"{row['img_per_s']:8.1f} img/s",
                flush=True,
            )

        def record_loader(backend: str, threads: int, device: str, mode: str, fmt: str, sync=None) -> None:
            try:
                make = dali_loader_batches(
                    indexes[fmt], params, args.batch_size, threads, device, decodes[mode]
                )
            except ValueError as e:
                print(f"  {backend:<12} workers={threads:<3} decode={mode:<6} skipped: {e}", flush=True)
                return
            record(backend, threads, make, fmt, sync=sync, decode=mode)

        # The formats of each setting are measured one right after the other, so a slow spell of this shared
        # machine falls on both rather than on one.
        for workers in parse_counts(args.workers):
            for fmt, index in indexes.items():
                record(
                    "torchvision", workers, torchvision_batches(index, params, args.batch_size, workers), fmt
                )
        for threads in parse_counts(args.dali_threads):
            for mode, decode in decodes.items():
                for fmt, index in indexes.items():
                    make = dali_raw_batches(index, params, args.batch_size, threads, decode)
                    record("dali_raw", threads, make, fmt, decode=mode)
                    record_loader("dali_cpu", threads, "cpu", mode, fmt)
        if gpu:
            for threads in parse_counts(args.gpu_threads or str(cores)):
                for mode, decode in decodes.items():
                    for fmt, index in indexes.items():
                        make = dali_raw_batches(index, params, args.batch_size, threads, decode, device_id=0)
                        record("dali_raw_gpu", threads, make, fmt, sync=torch.cuda.synchronize, decode=mode)
                        record_loader("dali_gpu", threads, "cuda", mode, fmt, sync=torch.cuda.synchronize)
        first = next(iter(indexes.values()))
        multi_crop = measure_multi_crop(args, first, params, common) if args.multi_crop else []
        files_opened = []
        if args.format != ["folder"] and args.open_count_images:
            # The counting reader's threads: the most the run measured (2 when it measured no DALI CPU rows).
            threads = max(parse_counts(args.dali_threads) or [2])
            files_opened = [count_opens(fmt, index, args, threads) for fmt, index in indexes.items()]
    baseline = {(r["format"], r["workers"]): r["img_per_s"] for r in results if r["backend"] == "torchvision"}
    rate = {(r["backend"], r["workers"], r["decode"], r["format"]): r["img_per_s"] for r in results}
    for r in results:
        fmt = r["format"]
        original = baseline.get((fmt, 4))
        # Equal CPU workers/threads; torchvision with 0 workers decodes in the main process, i.e. one core.
        same = baseline.get((fmt, r["workers"])) or (baseline.get((fmt, 0)) if r["workers"] == 1 else None)
        r["ratio_vs_torchvision_same_workers"] = r["img_per_s"] / same if same else None
        r["ratio_vs_torchvision_4_workers"] = r["img_per_s"] / original if original else None
        raw = rate.get(("dali_raw", r["workers"], r["decode"], fmt))
        if r["backend"] == "dali_cpu" and raw:
            r["ratio_vs_dali_raw"] = r["img_per_s"] / raw
        window = rate.get((r["backend"], r["workers"], "window", fmt))
        if r["decode"] == "full" and window:
            r["ratio_vs_window_decode"] = r["img_per_s"] / window
        folder = rate.get((r["backend"], r["workers"], r["decode"], "folder"))
        if fmt != "folder" and folder:
            r["ratio_vs_folder"] = r["img_per_s"] / folder
    return {
        "results": results,
        "multi_crop": multi_crop,
        "files_opened": files_opened,
        "settings": {
            "num_images": first.num_samples,
            "num_images_per_format": {fmt: index.num_samples for fmt, index in indexes.items()},
            "format": args.format,
            "shard_size": args.shard_size if "shards" in args.format else None,
            "num_shards": len(indexes["shards"].shards.tar_paths) if "shards" in indexes else None,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "augment": vars(params),
            "decode": args.decode,
            "output_dtype": args.output_dtype,
            **common,
        },
        "machine": machine_info(),
    }


OPEN_CALL = re.compile(r'^\s*\d+\s+([\d.]+)\s+(?:open|openat)\((?:[^,"]+,\s*)?"((?:[^"\\]|\\.)*)"')


def count_opens(fmt: str, index: ImageIndex, args, threads: int) -> dict:
    """Dataset files dali_kd's DALI loader (CPU) opens, per 1,000 images, counted from the open calls themselves.

    A child process builds the loader, warms it up and reads about args.open_count_images images, printing when the
    reading starts and ends; strace logs every open/openat of every thread with its time. Opens of a path under the
    dataset's folder are counted: before the reading starts (setup: listing, manifest, index files, the first
    batches) and during it (per image). Without strace (or where ptrace is not allowed) the figure is derived from
    the design instead: folder = one open per image, shards = each tar once per pass.
    """
    root = dataset_root(index)
    batches = max(1, math.ceil(args.open_count_images / args.batch_size))
    call = (
        f"import augment_throughput as a; a.read_for_open_count({fmt!r}, {str(root)!r}, {args.image_size}, "
        f"{args.batch_size}, {threads}, {batches})"
    )
    strace = strace_command()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "opens.log"
        command = [sys.executable, "-c", call]
        if strace:
            command = [*strace, "-o", str(log), *command]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]),
        }
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"the open-count child ({fmt}) failed:\n{result.stderr[-3000:]}")
        span = json.loads(result.stdout.strip().splitlines()[-1])
        opened = parse_open_log(log.read_text(), root, span["start"], span["end"]) if strace else None
    row = {"format": fmt, "images_read": span["images"], "loader_threads": threads}
    if opened is not None:
        row.update(
            method="measured (strace -f, open/openat calls on paths under the dataset folder)", **opened
        )
    else:
        num_tars = len(index.shards.tar_paths) if index.shards else 0
        passes = span["images"] / index.num_samples
        reading = span["images"] if fmt == "folder" else round(num_tars * passes)
        row.update(method="derived, not measured (strace missing or not allowed): folder 1 open per image, shards 1 per tar per pass",
                   setup=None, reading=reading, distinct_files=None, setup_by_kind=None)  # fmt: skip
    row["per_1000_images"] = 1000 * row["reading"] / span["images"]
    print(
        f"  files opened, {fmt}: {row['per_1000_images']:.1f} per 1,000 images "
        f"({row['reading']} opens for {span['images']} images, setup {row['setup']}; {row['method']})",
        flush=True,
    )
    return row


def strace_command() -> list[str] | None:
    """strace logging every thread's open/openat calls with their times and whole paths, or None where strace is
    missing or may not trace (ptrace refused in some containers)."""
    path = shutil.which("strace")
    if not path:
        return None
    command = [path, "-f", "-ttt", "-s", "4096", "-e", "trace=open,openat"]
    probe = subprocess.run([*command, "-o", os.devnull, "true"], capture_output=True)
    return command if probe.returncode == 0 else None


def parse_open_log(text: str, root: Path, start: float, end: float) -> dict:
    """Opens of paths under root in an `strace -f -ttt` log: before `start` (setup) and between start and end."""
    prefix = str(root.resolve()) + os.sep
    setup = reading = 0
    distinct = set()
    setup_by_kind: dict[
        str, int
    ] = {}  # by suffix (".tar", ".idx", ".JPEG"; "folder" for none): what setup opens
    for line in text.splitlines():
        m = OPEN_CALL.match(line)
        if not m:
            continue  # a "<... resumed>" line: its call was logged (and counted) where it began
        t, path = float(m.group(1)), m.group(2)
        if not os.path.abspath(path).startswith(prefix) and os.path.abspath(path) != prefix.rstrip(os.sep):
            continue
        if t < start:
            setup += 1
            kind = os.path.splitext(path)[1] or "folder"
            setup_by_kind[kind] = setup_by_kind.get(kind, 0) + 1
        elif t <= end:
            reading += 1
            distinct.add(path)
    return {
        "setup": setup,
        "reading": reading,
        "distinct_files": len(distinct),
        "setup_by_kind": setup_by_kind,
    }


def read_for_open_count(
    fmt: str, root: str, image_size: int, batch_size: int, threads: int, batches: int
) -> None:
    """The child of count_opens: build dali_kd's DALI loader (CPU) over the dataset, drain its first batches and
    prefetch queue, then read `batches` batches; prints the reading's start and end times (the clock strace's -ttt
    uses) and the images read, as one JSON line."""
    index = (
        ImageIndex.from_folder(root) if fmt == "folder" else index_from_shards(root, where="--format shards")
    )
    settings = StreamSettings.with_defaults(
        AugmentParams(view_size=image_size), batch_size, 0, dali_threads=threads
    )
    stream = DaliTrainStream(settings, index, "cpu")
    iterator = iter(stream)
    for _ in range(3):  # the first batch and the two the loader prepares ahead
        next(iterator)
    start = time.time()
    for _ in range(batches):
        next(iterator)
    end = time.time()
    stream.close()
    print(json.dumps({"start": start, "end": end, "images": batches * batch_size}), flush=True)


def crop_settings(params: AugmentParams, args) -> dict[str, AugmentParams | MultiCropParams]:
    """One view; the 2 global crops only; 2 global + N local crops (the issue's sizes and scales)."""
    global_view = AugmentParams(**{**vars(params), "crop_scale": (0.32, 1.0)})
    local_view = AugmentParams(**{**vars(params), "view_size": args.local_size, "crop_scale": (0.05, 0.32)})
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
    # Multi-crop always decodes the whole image once; the output dtype still applies.
    decode = DecodeParams(dtype=args.output_dtype)
    paths = {("torchvision", None): lambda p: torchvision_batches(index, p, args.batch_size, workers)}
    devices = {"dali_cpu": "cpu"}
    if torch.cuda.is_available() and not args.no_gpu:
        devices["dali_gpu"] = "cuda"
    for backend, device in devices.items():
        # Each multi-crop graph asked for, once: auto stands for one of the other two on each device.
        on_gpu = device == "cuda"
        for graph in dict.fromkeys(resolve_multi_crop_graph(g, on_gpu) for g in args.multi_crop_graph):
            paths[backend, graph] = lambda p, device=device, graph=graph: dali_loader_batches(
                index, with_graph(p, graph), args.batch_size, workers, device, decode
            )
    rows = []
    for (backend, graph), make in paths.items():
        sync = torch.cuda.synchronize if backend == "dali_gpu" else None
        queued = 2 * workers if backend == "torchvision" else 2
        by_setting = {}
        settings = crop_settings(params, args)
        if graph is not None and graph != resolve_multi_crop_graph("auto", backend == "dali_gpu"):
            backend = f"{backend} ({graph})"
            # One view has no multi-crop graph: measured once, in the default graph's rows.
            del settings["one view"]
        for setting, crop_params in settings.items():
            row = {"backend": backend, "workers": workers, "crops": setting}
            if graph is not None:
                row["graph"] = graph
            row.update(measure(make(crop_params), queued=queued, sync=sync, **common))
            by_setting[setting] = row["img_per_s"]
            rows.append(row)
            print(f"  {backend:<12} {setting:<20} {row['img_per_s']:8.1f} img/s", flush=True)
        for row in rows[-len(by_setting) :]:
            # Cost per image relative to the global-only pipeline: rate ratio inverted.
            row["cost_vs_global_only"] = by_setting["2 global"] / row["img_per_s"]
    return rows


def with_graph(params: AugmentParams | MultiCropParams, graph: str) -> AugmentParams | MultiCropParams:
    """params with its multi-crop graph set (one view has none)."""
    return replace(params, graph=graph) if isinstance(params, MultiCropParams) else params


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
    formats = report["settings"].get("format", ["folder"]) != ["folder"]
    lines = [
        "| backend | workers/threads | decode |"
        + (" format |" if formats else "")
        + " img/s (median) | spread | CPU-s/img | × torchvision same workers "
        "| × torchvision 4 workers | × window decode |" + (" × folder |" if formats else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if formats else ""),
    ]
    for r in report["results"]:
        same = r["ratio_vs_torchvision_same_workers"]
        four = r["ratio_vs_torchvision_4_workers"]
        window = r.get("ratio_vs_window_decode")
        folder = r.get("ratio_vs_folder")
        lines.append(
            f"| {r['backend']} | {r['workers']} | {r['decode'] or '—'} |"
            + (f" {r['format']} |" if formats else "")
            + f" {r['img_per_s']:.1f} "
            f"| {r['img_per_s_min']:.0f}–{r['img_per_s_max']:.0f} | {r['cpu_s_per_img'] * 1000:.2f} ms "
            f"| {f'{same:.2f}×' if same else '—'} | {f'{four:.2f}×' if four else '—'} "
            f"| {f'{window:.2f}×' if window else '—'} |"
            + (f" {f'{folder:.2f}×' if folder else '—'} |" if formats else "")
        )
    if report.get("files_opened"):
        lines += [
            "",
            "| format | dataset files opened per 1,000 images | opens while reading | images read "
            "| distinct files | opens at setup | how counted |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["files_opened"]:
            lines.append(
                f"| {r['format']} | {r['per_1000_images']:.1f} | {r['reading']} | {r['images_read']} "
                f"| {r['distinct_files'] if r['distinct_files'] is not None else '—'} "
                f"| {r['setup'] if r['setup'] is not None else '—'}{setup_kinds(r)} | {r['method']} |"
            )
    lines.append(f"\nDALI output dtype: {report['settings']['output_dtype']}")
    loaders = [r for r in report["results"] if "ratio_vs_dali_raw" in r]
    for r in loaders:
        lines.append(
            f"\ndali_kd loader vs raw DALI pipeline, {r['workers']} threads, {r['decode']} decode"
            + (f", {r['format']}" if formats else "")
            + ": "
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


def setup_kinds(row: dict) -> str:
    kinds = row.get("setup_by_kind")
    return f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})" if kinds else ""


def bar_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [
        f"{r['backend']}\n{r['workers']}"
        + (f" {r['decode']}" if r["decode"] else "")
        + (f"\n{r['format']}" if r.get("format", "folder") != "folder" else "")
        for r in rows
    ]
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
        "--format",
        type=parse_formats,
        default=["folder"],
        help="dataset formats to measure side by side, a comma list of folder,shards (default: folder)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="keeps the generated images and their shards between runs (default: a temp folder)",
    )
    parser.add_argument(
        "--shard-size",
        default="10MB",
        help="--format shards: about this much per tar, as dali_kd.shard takes it (default 10MB: the generated 400 "
        "images span several tars; the tool's own default, 1GB, holds ~10k ImageNet images)",
    )
    parser.add_argument(
        "--open-count-images",
        type=int,
        default=1024,
        help="--format with shards: images the DALI loader reads while its file opens are counted (0: no count)",
    )
    parser.add_argument(
        "--output-dtype", choices=OUTPUT_DTYPES, default="float32", help="dtype the DALI pipelines hand out"
    )
    parser.add_argument("--multi-crop", action="store_true", help="also measure DINO multi-crop per path")
    parser.add_argument("--local-crops", type=int, default=8, help="multi-crop: local crops per image")
    parser.add_argument("--local-size", type=int, default=96, help="multi-crop: local crop side, pixels")
    parser.add_argument(
        "--multi-crop-graph",
        type=parse_graphs,
        default=["auto"],
        help="multi-crop: DALI graphs to measure side by side, a comma list of auto,batched,per_crop "
        "(data.multi_crop_graph; default auto)",
    )
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
        args.open_count_images = 256
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
