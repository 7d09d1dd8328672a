"""Writing an image tree (or a file list) as tar shards: the scan, the plan, each shard under a temporary name, the
manifest.

The scan runs first (broken files never enter a shard; they are listed in OUT/scan/train/quarantine.jsonl), sample
ids are those training from the folder gives (same scan, same order), and samples are spread over the shards in a
seeded shuffle so that no shard holds one class. Each shard is written under a temporary name and renamed when
whole: a killed run keeps the shards it finished, and a rerun with the same settings keeps those whose bytes still
match and writes the rest. The same inputs always give byte-identical shards. The layout: data/shards.py; the
plan: data/shard_plan.py; what a rerun keeps: data/shard_rerun.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dali_kd import __version__, console
from dali_kd.config import DataConfig
from dali_kd.data import shards as fmt
from dali_kd.data.file_checks import DEFAULT_MAX_PIXELS
from dali_kd.data.prepare import DataSplits, prepare_data
from dali_kd.data.shard_plan import Sample, ShardPlan, plan_shards
from dali_kd.data.shard_rerun import STATE_NAME, file_sha256, finished_shards, shards_to_keep
from dali_kd.errors import UserError
from dali_kd.io import atomic_write, os_reason, write_json_atomic, write_text_atomic

READ_THREADS = (
    8  # files read ahead in parallel: a shared filesystem answers many small reads slowly, not badly
)


# ---- progress ---------------------------------------------------------------------------------------------------
class ShardingProgress:
    """A bar with files/s and MB/s on a terminal; elsewhere (a batch job's log) one line per finished shard."""

    def __init__(self, num_files: int, num_bytes: int, enabled: bool = True):
        from tqdm import tqdm

        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=num_files, unit="file", disable=not self.tty, smoothing=0.1, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.num_files = self.num_bytes = 0
        self.total_files, self.total_bytes = num_files, num_bytes

    def advance(self, files: int, num_bytes: int) -> None:
        self.num_files += files
        self.num_bytes += num_bytes
        self.bar.update(files)
        self.bar.set_postfix_str(f"{self.num_bytes / 1e6 / self.elapsed:.1f} MB/s", refresh=False)

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def line(self, text: str) -> None:
        # The `dali_kd` logger writes through tqdm: above the bar on a terminal, a plain line elsewhere.
        if self.tty:
            console.info(text)
        elif self.enabled:
            console.info(
                f"{text} [{self.num_files}/{self.total_files} files, {self.num_files / self.elapsed:.0f} files/s, "
                f"{self.num_bytes / 1e6 / self.elapsed:.1f} MB/s]"
            )

    def close(self) -> None:
        self.bar.close()


# ---- writing ----------------------------------------------------------------------------------------------------
def _read_all(src: Path, samples: list[Sample], pool: ThreadPoolExecutor) -> Iterator[tuple[Sample, bytes]]:
    """Each sample's bytes, in order, read a few files ahead."""

    def read(s: Sample) -> bytes:
        try:
            return (src / s.path).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {src / s.path} ({e.strerror or e}): rerun to scan again") from None

    ahead = READ_THREADS * 4
    for begin in range(0, len(samples), ahead):
        chunk = samples[begin : begin + ahead]
        yield from zip(chunk, pool.map(read, chunk), strict=True)


def write_shard(
    src: Path, out: Path, plan: ShardPlan, pool: ThreadPoolExecutor, progress: ShardingProgress
) -> str:
    """Write one shard (temporary name, fsync, rename) and its index; returns the shard's sha256."""
    digest = hashlib.sha256()

    def write(f: BinaryIO) -> None:
        def put(data: bytes) -> None:
            f.write(data)
            digest.update(data)

        for (s, data), members in zip(_read_all(src, plan.samples, pool), plan.members, strict=True):
            if len(data) != s.size:
                raise UserError(
                    f"{src / s.path} changed while sharding ({s.size} -> {len(data)} bytes): rerun"
                )
            for member, payload in zip(members, (fmt.label_bytes(s.label), data), strict=True):
                put(fmt.member_header(member.name, member.size))
                put(payload)
                put(b"\0" * (fmt.padded(member.size) - member.size))
            progress.advance(1, len(data))
        put(fmt.END_OF_ARCHIVE)

    atomic_write(out / plan.name, write)
    write_text_atomic(fmt.index_path(out / plan.name), fmt.index_text(plan.members))
    return digest.hexdigest()


def _record(plan: ShardPlan, sha256: str) -> dict[str, Any]:
    return {
        "name": plan.name,
        "index": fmt.index_path(Path(plan.name)).name,
        "num_samples": len(plan.samples),
        "bytes": plan.num_bytes,
        "sha256": sha256,
    }


def _append_line(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {path}: {os_reason(e) or e}") from None


# ---- a whole run ------------------------------------------------------------------------------------------------
@dataclass
class ShardResult:
    out: Path
    manifest: dict[str, Any]
    written: list[str]
    kept: list[str]
    quarantined: int
    messages: list[str]


def list_samples(src: Path, file_list: str | None, scan: str, max_pixels: int, scan_dir: Path):
    """The samples training from SRC would see, with its ids: the same scan and index code (prepare_data)."""
    data = DataConfig(
        root=str(src), file_list=file_list, scan=scan, scan_dir=str(scan_dir), max_image_pixels=max_pixels
    )
    splits = prepare_data(data)
    index = splits.train
    samples = []
    for i, (path, label) in enumerate(zip(index.files, index.labels, strict=True)):
        try:
            st = os.stat(path)
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror}): rerun to scan again") from None
        samples.append(Sample(i, os.path.relpath(path, src), label, st.st_size, st.st_mtime_ns))
    return index.class_names, samples, splits


def check_folders(src: Path, out: Path) -> Path:
    """Refuse a SRC that is not a folder and an OUT inside it; returns SRC's real path."""
    if not src.is_dir():
        raise UserError(f"SRC {src}: {'not found' if not src.exists() else 'not a directory'}")
    real_src, real_out = src.resolve(), out.resolve()
    if real_out == real_src or real_src in real_out.parents:
        raise UserError(
            f"OUT {out} is inside SRC {src}: it would become a class folder; choose a folder outside"
        )
    return real_src


def make_out_folder(out: Path) -> None:
    """OUT made, and refused at once if it cannot be written: a folder we may not write to fails before the scan."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"OUT {out}: cannot write there ({os_reason(e) or e})") from None


@dataclass(frozen=True)
class ShardOptions:
    """How the images are cut into shards (python -m dali_kd.shard's options): shard_size bytes per shard at most,
    a seeded shuffle (or the folder's order), the scan and its pixel limit, an optional file list. A rerun with
    other options writes every shard again."""

    shard_size: int = 10**9
    seed: int = 0
    shuffle: bool = True
    scan: str = "header"
    max_pixels: int = DEFAULT_MAX_PIXELS
    file_list: str | None = None


def make_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ShardOptions = ShardOptions(),
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    on_shard_written: Callable[[str], None] | None = None,
) -> ShardResult:
    src, out = Path(src).expanduser(), Path(out).expanduser()
    real_src = check_folders(src, out)
    o = options
    file_list = str(Path(o.file_list).expanduser().resolve()) if o.file_list else None
    # As the manifest and the rerun state record them: a rerun compares these.
    settings = {
        "src": str(real_src), "file_list": file_list, "shard_size": o.shard_size, "seed": o.seed,
        "shuffle": o.shuffle, "scan": o.scan, "max_image_pixels": o.max_pixels,
    }  # fmt: skip
    make_out_folder(out)
    records = finished_shards(out, settings, overwrite)
    for p in out.iterdir():
        if p.name.endswith(".tmp"):  # a shard that a killed run left half-written
            p.unlink()
    class_names, samples, splits = list_samples(src, file_list, o.scan, o.max_pixels, out / "scan")
    plans = plan_shards(samples, o.shard_size, o.seed, o.shuffle, settings)
    progress = ShardingProgress(len(samples), sum(s.size for s in samples), enabled=show_progress)
    try:
        for m in splits.messages:
            console.info(m)
        shard_records, written, kept = write_or_keep_shards(
            src, out, plans, records, settings, progress, on_shard_written
        )
    finally:
        progress.close()
    remove_unplanned_shards(out, plans)
    write_sample_list(out, plans, samples)
    manifest = shard_manifest(out, settings, class_names, samples, splits, shard_records)
    write_json_atomic(out / fmt.MANIFEST_NAME, manifest)
    return ShardResult(out, manifest, written, kept, len(splits.quarantine), splits.messages)


def write_or_keep_shards(
    src: Path,
    out: Path,
    plans: list[ShardPlan],
    records: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    progress: ShardingProgress,
    on_shard_written: Callable[[str], None] | None,
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Every planned shard, kept where a finished one matches its plan, else written; returns the shards' manifest
    records and the names written and kept."""
    written: list[str] = []
    kept, shard_records = [], []
    keep = shards_to_keep(out, plans, records)
    # The state restarts with what is kept; finished shards are appended as they are renamed.
    write_text_atomic(
        out / STATE_NAME,
        "".join(json.dumps(r) + "\n" for r in [{"settings": settings}, *(records[n] for n in keep)]),
    )
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for plan in plans:
            if plan.name in keep:
                shard_records.append(_record(plan, keep[plan.name]))
                kept.append(plan.name)
                progress.advance(len(plan.samples), sum(s.size for s in plan.samples))
                continue
            try:
                sha = write_shard(src, out, plan, pool, progress)
            except UserError as e:
                done = len(written) + len(kept)
                raise UserError(f"{e}; {done} finished shard(s) kept in {out}: rerun to go on") from None
            record = _record(plan, sha)
            shard_records.append(record)
            written.append(plan.name)
            _append_line(out / STATE_NAME, {**record, "plan": plan.digest})
            progress.line(f"{plan.name}: {len(plan.samples)} samples, {plan.num_bytes / 1e6:.1f} MB")
            if on_shard_written:
                on_shard_written(plan.name)
    return shard_records, written, kept


def remove_unplanned_shards(out: Path, plans: list[ShardPlan]) -> None:
    """Shards of an earlier, larger plan would be picked up by a glob: remove them."""
    planned = {p.name for p in plans}
    for p in sorted(out.glob("shard-*")):
        if p.with_suffix(".tar").name not in planned:
            p.unlink()


def write_sample_list(out: Path, plans: list[ShardPlan], samples: list[Sample]) -> None:
    """samples.jsonl: where each sample's image lies, in sample-id order."""
    location = {}
    for plan in plans:
        for s, members in zip(plan.samples, plan.members, strict=True):
            image = members[1]
            location[s.id] = (plan.number, image.offset, image.size)
    write_text_atomic(
        out / fmt.SAMPLES_NAME,
        "".join(json.dumps([s.id, *location[s.id], s.label, s.path]) + "\n" for s in samples),
    )


def shard_manifest(
    out: Path,
    settings: dict[str, Any],
    class_names: tuple[str, ...],
    samples: list[Sample],
    splits: DataSplits,
    shard_records: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": "dali_kd.shards",
        "format_version": fmt.FORMAT_VERSION,
        "tool": "dali_kd.shard",
        "tool_version": __version__,
        "index_version": fmt.INDEX_VERSION,
        "settings": settings,
        "class_names": list(class_names),
        "num_samples": len(samples),
        "image_ext": fmt.READER_IMAGE_EXT,
        "label_ext": fmt.LABEL_EXT,
        "samples": fmt.SAMPLES_NAME,
        "samples_sha256": file_sha256(out / fmt.SAMPLES_NAME),
        "quarantine": {"file": "scan/train/quarantine.jsonl", "num_files": len(splits.quarantine)},
        "shards": shard_records,
    }


def write_indexes(folder: str | os.PathLike) -> list[Path]:
    """Write `<name>.idx` beside every `<name>.tar` in folder (shards made elsewhere); returns the index paths."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--index-only {folder}: {'not found' if not folder.exists() else 'not a directory'}")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise UserError(f"--index-only {folder}: no .tar files there")
    written = []
    for tar in tars:
        text = fmt.index_for_tar(tar)
        write_text_atomic(fmt.index_path(tar), text)
        written.append(fmt.index_path(tar))
    return written
