"""`python -m dali_kd.shard SRC OUT`: an ImageFolder tree (or a file list) written as tar shards DALI reads.

Millions of small files cost a metadata lookup each on a cluster's shared filesystem; a few hundred 1 GB tars do not.
The scan runs first (broken files never enter a shard; they are listed in OUT/scan/train/quarantine.jsonl), sample
ids are those training from the folder gives (same scan, same order), and samples are spread over the shards in a
seeded shuffle so that no shard holds one class. Each shard is written under a temporary name and renamed when
whole: a killed run keeps the shards it finished, and a rerun with the same settings keeps those whose bytes still
match and writes the rest. The same inputs always give byte-identical shards. The layout: dali_kd/data/shards.py.

`python -m dali_kd.shard --index-only DIR` writes the DALI index of every tar in DIR (shards made elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dali_kd import __version__
from dali_kd.commands.cli import CommandLineParser, int_in_range
from dali_kd.config import DataConfig
from dali_kd.data import shards as fmt
from dali_kd.data.decoder_log import admits_images_over_decoder_limit, quiet_too_large_image_lines
from dali_kd.data.file_checks import DEFAULT_MAX_PIXELS
from dali_kd.data.prepare import prepare_data
from dali_kd.errors import UserError
from dali_kd.io import atomic_write, os_reason, write_json_atomic, write_text_atomic

DEFAULT_SHARD_SIZE = "1GB"
# What a rerun needs to keep finished shards: the settings, then one line per finished shard with the digest of its
# plan (which includes each source file's size and mtime, so it stays out of the deterministic manifest).
STATE_NAME = ".shard-state.jsonl"
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
READ_THREADS = (
    8  # files read ahead in parallel: a shared filesystem answers many small reads slowly, not badly
)


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29: a size needs its unit (B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text)
    unit = UNITS.get(match.group(2).lower()) if match else None
    if match is None or not unit:
        raise UserError(f"--shard-size {text!r}: expected a size with its unit, such as 512MB, 1GB or 2GiB")
    size = int(float(match.group(1)) * unit)
    if size < 1:
        raise UserError(f"--shard-size {text!r}: must be at least 1 byte")
    return size


@dataclass(frozen=True)
class Sample:
    id: int
    path: str  # relative to SRC
    label: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return fmt.sample_key(self.id)

    @property
    def ext(self) -> str:
        return fmt.image_ext(self.path)


@dataclass
class ShardPlan:
    """What one shard will hold, in order; `digest` names exactly that (a rerun keeps a shard only if it matches)."""

    number: int
    samples: list[Sample]
    num_bytes: int = 0
    digest: str = ""

    @property
    def name(self) -> str:
        return fmt.shard_name(self.number)

    @property
    def members(self) -> list[list[fmt.Member]]:
        """Each sample's members where they sit in the tar (computed when needed: tens of millions of samples)."""
        out, pos = [], 0
        for s in self.samples:
            members, pos = fmt.sample_members(s.key, s.ext, s.size, s.label, pos)
            out.append(members)
        return out

    def lay_out(self, settings: dict[str, Any]) -> None:
        members = self.members
        self.num_bytes = (members[-1][-1].offset + fmt.padded(members[-1][-1].size)) + len(fmt.END_OF_ARCHIVE)
        rows = [[s.id, s.path, s.label, s.size, s.mtime_ns] for s in self.samples]
        text = json.dumps(
            {"settings": settings, "samples": rows, "version": fmt.FORMAT_VERSION}, sort_keys=True
        )
        self.digest = hashlib.sha256(text.encode()).hexdigest()


def shuffled(ids: range, seed: int) -> list[int]:
    """A seeded permutation that no library version changes: sort by a keyed hash of the id."""
    salt = str(seed).encode()
    return sorted(
        ids, key=lambda i: hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8, key=salt).digest()
    )


def plan_shards(
    samples: list[Sample], shard_size: int, seed: int, shuffle: bool, settings: dict
) -> list[ShardPlan]:
    """Samples in (shuffled) order, cut into shards of about shard_size bytes (a shard holds at least one)."""
    order = shuffled(range(len(samples)), seed) if shuffle else list(range(len(samples)))
    plans: list[ShardPlan] = []
    current: list[Sample] = []
    current_bytes = len(fmt.END_OF_ARCHIVE)
    for i in order:
        s = samples[i]
        sample_bytes = 2 * fmt.BLOCK + fmt.padded(len(fmt.label_bytes(s.label))) + fmt.padded(s.size)
        if current and current_bytes + sample_bytes > shard_size:
            plans.append(ShardPlan(len(plans), current))
            current, current_bytes = [], len(fmt.END_OF_ARCHIVE)
        current.append(s)
        current_bytes += sample_bytes
    if current:
        plans.append(ShardPlan(len(plans), current))
    for plan in plans:
        plan.lay_out(settings)
    return plans


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
        if self.tty:
            self.bar.write(text)
        elif self.enabled:
            print(
                f"{text} [{self.num_files}/{self.total_files} files, {self.num_files / self.elapsed:.0f} files/s, "
                f"{self.num_bytes / 1e6 / self.elapsed:.1f} MB/s]",
                flush=True,
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


def file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _record(plan: ShardPlan, sha256: str) -> dict[str, Any]:
    return {
        "name": plan.name,
        "index": fmt.index_path(Path(plan.name)).name,
        "num_samples": len(plan.samples),
        "bytes": plan.num_bytes,
        "sha256": sha256,
    }


# ---- what OUT already holds -------------------------------------------------------------------------------------
# The files a shard run writes into OUT (with the temporary names of atomic writes); anything else is the user's.
OWN_FILE = re.compile(
    r"\.?(shard-\d{6}\.(tar|idx)|manifest\.json|samples\.jsonl|shard-state\.jsonl)(\..+\.tmp)?|scan"
)


def _own_file(name: str) -> bool:
    return OWN_FILE.fullmatch(name) is not None


def _settings_change(old: dict, new: dict) -> str:
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(changed[:3])


def finished_shards(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
    """The shard records a previous run into OUT left (by name), after refusing OUT if it was made with other
    settings or holds files that are not ours; with overwrite, our old files are removed instead."""
    manifest, state = out / fmt.MANIFEST_NAME, out / STATE_NAME
    old_settings, records = None, {}
    try:
        lines = [json.loads(line) for line in state.read_text().splitlines()] if state.exists() else []
        if lines:
            old_settings = lines[0]["settings"]
            records = {r["name"]: r for r in lines[1:]}
        elif manifest.exists():  # finished shards without their state (copied without hidden files): not kept
            old_settings = json.loads(manifest.read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        # A state we cannot read is as good as one made with other settings.
        old_settings, records = "unreadable", {}
    foreign = sorted(p.name for p in out.iterdir() if not _own_file(p.name)) if out.is_dir() else []
    if not overwrite:
        if foreign:
            raise UserError(
                f"{out} holds files that are not shards (e.g. {foreign[0]}): choose an empty folder"
            )
        if old_settings is not None and old_settings != settings:
            what = (
                _settings_change(old_settings, settings) if isinstance(old_settings, dict) else "unreadable"
            )
            raise UserError(
                f"{out} holds shards made with other settings ({what}): pass --overwrite to replace them, "
                f"or choose another folder"
            )
        if old_settings is None and any(p.name.endswith(".tar") for p in out.iterdir()):
            raise UserError(f"{out} holds shards without a manifest: pass --overwrite to replace them")
        return records
    for p in out.iterdir() if out.is_dir() else ():
        if _own_file(p.name) and p.is_file():
            p.unlink()
    return {}


def shards_to_keep(out: Path, plans: list[ShardPlan], records: dict[str, dict]) -> dict[str, str]:
    """name -> sha256 of each finished shard that is exactly what its plan asks for now: the same samples from
    unchanged files (the plan's digest), its index as planned, and its bytes as they were written (re-hashed)."""
    keep = {}
    for plan in plans:
        old, idx = records.get(plan.name), fmt.index_path(out / plan.name)
        if not old or old.get("plan") != plan.digest or not idx.is_file():
            continue
        if idx.read_text() == fmt.index_text(plan.members) and file_sha256(out / plan.name) == old.get(
            "sha256"
        ):
            keep[plan.name] = old["sha256"]
    return keep


# ---- the command ------------------------------------------------------------------------------------------------
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


def make_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 10**9,
    seed: int = 0,
    shuffle: bool = True,
    scan: str = "header",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    file_list: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    on_shard_written: Callable[[str], None] | None = None,
) -> ShardResult:
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise UserError(f"SRC {src}: {'not found' if not src.exists() else 'not a directory'}")
    real_src, real_out = src.resolve(), out.resolve()
    if real_out == real_src or real_src in real_out.parents:
        raise UserError(
            f"OUT {out} is inside SRC {src}: it would become a class folder; choose a folder outside"
        )
    file_list = str(Path(file_list).expanduser().resolve()) if file_list else None
    settings = {
        "src": str(real_src), "file_list": file_list, "shard_size": shard_size, "seed": seed, "shuffle": shuffle,
        "scan": scan, "max_image_pixels": max_pixels,
    }  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a folder we may not write to fails here, before the scan
            pass
    except OSError as e:
        raise UserError(f"OUT {out}: cannot write there ({os_reason(e) or e})") from None
    records = finished_shards(out, settings, overwrite)
    for p in out.iterdir():
        if p.name.endswith(".tmp"):  # a shard that a killed run left half-written
            p.unlink()
    class_names, samples, splits = list_samples(src, file_list, scan, max_pixels, out / "scan")
    plans = plan_shards(samples, shard_size, seed, shuffle, settings)

    progress = ShardingProgress(len(samples), sum(s.size for s in samples), enabled=show_progress)
    written: list[str] = []
    kept, shard_records = [], []
    try:
        for m in splits.messages:
            progress.line(m) if progress.tty else print(m, flush=True)
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
    finally:
        progress.close()
    # Shards of an earlier, larger plan would be picked up by a glob: remove them.
    planned = {p.name for p in plans}
    for p in sorted(out.glob("shard-*")):
        if p.with_suffix(".tar").name not in planned:
            p.unlink()
    location = {}
    for plan in plans:
        for s, members in zip(plan.samples, plan.members, strict=True):
            image = members[1]
            location[s.id] = (plan.number, image.offset, image.size)
    write_text_atomic(
        out / fmt.SAMPLES_NAME,
        "".join(json.dumps([s.id, *location[s.id], s.label, s.path]) + "\n" for s in samples),
    )
    manifest = {
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
    write_json_atomic(out / fmt.MANIFEST_NAME, manifest)
    return ShardResult(out, manifest, written, kept, len(splits.quarantine), splits.messages)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {path}: {os_reason(e) or e}") from None


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


def main(argv: list[str] | None = None) -> int:
    parser = CommandLineParser(prog="python -m dali_kd.shard", description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", type=Path, help="an ImageFolder tree: SRC/<class>/<image>")
    parser.add_argument(
        "out", nargs="?", type=Path, help="where the shards, their indexes and manifest.json go"
    )
    parser.add_argument(
        "--shard-size", default=DEFAULT_SHARD_SIZE, help="about this much per shard (default 1GB)"
    )
    parser.add_argument(
        "--seed",
        type=int_in_range(0, 2**32 - 1),
        default=0,
        help="the shuffle that spreads samples over shards (0 to 2**32-1, as train.seed)",
    )
    parser.add_argument(
        "--no-shuffle", action="store_true", help="shards in sample-id order (class by class)"
    )
    parser.add_argument("--scan", choices=("header", "full", "off"), default="header", help="as data.scan")
    parser.add_argument(
        "--max-image-pixels",
        type=int_in_range(1),
        default=DEFAULT_MAX_PIXELS,
        help="larger images are set aside",
    )
    parser.add_argument(
        "--file-list", help="shard only these files (one <class>/<image> per line), as data.file_list"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards OUT holds from other settings"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-shard lines")
    parser.add_argument(
        "--index-only", type=Path, metavar="DIR", help="only write the index of every tar in DIR"
    )
    args = parser.parse_args(argv)
    try:
        if args.index_only:
            if args.src or args.out:
                raise UserError("--index-only DIR takes no SRC or OUT")
            for path in write_indexes(args.index_only):
                print(f"wrote {path}")
            return 0
        if not args.src or not args.out:
            raise UserError("expected SRC and OUT (python -m dali_kd.shard SRC OUT), or --index-only DIR")
        if args.scan == "full" and admits_images_over_decoder_limit(args.max_image_pixels):
            quiet_too_large_image_lines()  # DALI decodes such images, but prints a red error line for each
        result = make_shards(
            args.src, args.out, parse_size(args.shard_size), args.seed, not args.no_shuffle, args.scan,
            args.max_image_pixels, args.file_list, args.overwrite, show_progress=not args.no_progress,
        )  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: the finished shards in {args.out} are kept; rerun the same command to go on",
            file=sys.stderr,
        )
        return 130
    m = result.manifest
    print(
        f"{m['num_samples']} samples of {len(m['class_names'])} classes in {len(m['shards'])} shards "
        f"({sum(r['bytes'] for r in m['shards']) / 1e6:.1f} MB; {len(result.written)} written, {len(result.kept)} "
        f"kept from an earlier run); {result.quarantined} files set aside (scan/train/quarantine.jsonl)\n"
        f"manifest: {result.out / fmt.MANIFEST_NAME}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
