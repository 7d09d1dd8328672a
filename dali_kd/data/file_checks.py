"""The scan's file checks: which files of an ImageFolder tree training must not see, and why.

A DALI pipeline that meets an undecodable file dies for good, so the bad files are set aside before it starts. The
default check reads each file's header and structure (format from content, not extension; data/image_headers.py);
`full` also decodes every file with DALI's own CPU decoder. Results are cached by path, size and mtime, beside the
good list (good.txt) and the rejected files with their reasons (quarantine.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dali_kd.config import DataConfig
from dali_kd.cpu_budget import usable_cpus
from dali_kd.data.file_tree import IMAGE_EXTENSIONS, TreeListing, data_folder, list_tree
from dali_kd.data.image_headers import Reject, check_data
from dali_kd.errors import UserError
from dali_kd.io import write_text_atomic

__all__ = ["Reject", "check_data", "check_file", "dali_decode_check", "scan"]

# Named like images or like the audio files DALI's file reader also lists: these are checked.
CHECKED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS) | {".gif", ".wav", ".flac", ".ogg"}
# data.max_image_pixels' default: the scan and the shard command refuse larger images unless told otherwise.
DEFAULT_MAX_PIXELS: int = DataConfig.model_fields["max_image_pixels"].default
CACHE_VERSION = 1


@dataclass(frozen=True)
class FileCheck:
    """One file's check, as cached: a good file has no reason."""

    path: str  # relative to the scanned root
    size: int
    mtime_ns: int
    mode: str  # "header" or "full"
    reason: str | None  # None: good


def check_file(path: Path, max_pixels: int) -> None:
    """Raise Reject with the reason if training must not see this file."""
    if path.is_symlink() and not path.exists():
        raise Reject("dangling symlink")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise Reject("unreadable (permission denied)") from None
    except OSError as e:
        raise Reject(f"unreadable ({e.strerror})") from None
    check_data(data, max_pixels, path)


# ---- full decode with DALI's own CPU decoder --------------------------------------------------------------------
class _DaliDecoder:
    """One-file-at-a-time CPU decode through DALI, rebuilt after a failure (a failed pipeline stays dead)."""

    def __init__(self):
        self.pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)  # fmt: skip
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        self.pipe = decode()
        self.pipe.build()

    def check(self, data: bytes) -> None:
        import numpy as np

        if self.pipe is None:
            self._build()
        try:
            self.pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            (images,) = self.pipe.run()
        except RuntimeError as e:
            self.pipe = None
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next(
                (ln for ln in lines if "fail" in ln.lower() and "pipeline" not in ln.lower()), lines[-1]
            )
            raise Reject(f"DALI cannot decode it: {detail[:160]}") from None


_decoder: _DaliDecoder | None = None


def dali_decode_check(data: bytes) -> None:
    """Reject unless DALI's CPU decoder decodes these bytes (one process-wide decoder, rebuilt after a failure)."""
    global _decoder
    _decoder = _decoder or _DaliDecoder()
    _decoder.check(data)


def _check_one(job: tuple[str, str, int, bool]) -> str | None:
    """Worker: the reason to reject (or None) for one file."""
    global _decoder
    root, rel, max_pixels, full = job
    path = Path(root) / rel
    try:
        check_file(path, max_pixels)
        if full:
            _decoder = _decoder or _DaliDecoder()
            _decoder.check(path.read_bytes())
    except Reject as e:
        return str(e)
    return None


# ---- the scan ---------------------------------------------------------------------------------------------------
def candidate_files(root: Path) -> TreeListing:
    """Files named like images (or DALI-listed audio) under root's class folders, relative, in walk order; each real
    file once, symlink loops not followed (its notes say which)."""
    return list_tree(root, lambda name: Path(name).suffix.lower() in CHECKED_EXTENSIONS)


def scan_workers(requested: int | None, full: bool) -> int:
    """How many checks a scan runs at once: what was asked (None: as many as helps), never more than the machine
    can use. Decoding is CPU work, one process per usable CPU; header checks mostly wait on the disk, so threads
    go to four per usable CPU (at most 32)."""
    if requested is not None and requested < 1:
        raise UserError(f"scan: workers must be at least 1, not {requested}")
    cpus = usable_cpus()
    limit = cpus if full else min(32, 4 * cpus)
    return limit if requested is None else min(requested, limit)


def default_out_dir(root: Path) -> Path:
    """Scans live beside the user's cache, not in the (often read-only) dataset: one folder per dataset root."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    base = Path(os.environ.get("DALI_KD_CACHE", "~/.cache/dali_kd")).expanduser()
    return base / "scans" / f"{root.name}-{key}"


@dataclass
class ScanResult:
    root: Path
    out_dir: Path
    good: list[str]
    quarantined: list[dict[str, str]]
    checked: int
    cached: int
    seconds: float
    notes: tuple[str, ...] = ()  # one line per folder not followed (symlink loops) or file listed once

    @property
    def good_list(self) -> Path:
        return self.out_dir / "good.txt"

    @property
    def quarantine_file(self) -> Path:
        return self.out_dir / "quarantine.jsonl"

    def summary(self) -> str:
        reasons = Counter(q["reason"].split(":")[0].split(" (")[0] for q in self.quarantined)
        total = len(self.good) + len(self.quarantined)
        lines = [
            f"scanned {total} files under {self.root} in {self.seconds:.1f} s ({total / max(self.seconds, 1e-9):.0f} "
            f"files/s): {len(self.good)} good, {len(self.quarantined)} quarantined; {self.checked} checked, "
            f"{self.cached} from cache"
        ]
        lines += [f"  {count:6d}  {reason}" for reason, count in reasons.most_common()]
        return "\n".join([*self.notes, *lines])


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:  # dangling link or unreadable directory entry: checked (and rejected) every time
        return -1, -1


def scan(
    root: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    full: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> ScanResult:
    start = time.perf_counter()
    if max_pixels < 1:
        raise UserError(f"scan: the pixel cap must be at least 1, not {max_pixels}")
    workers = scan_workers(workers, full)
    root = data_folder(root)
    out = Path(out_dir).expanduser() if out_dir else default_out_dir(root)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"scan: cannot create {out}: {e.strerror}") from None
    cache_path = out / "scan_cache.json"
    cache: dict = {}
    try:
        saved = json.loads(cache_path.read_text())
        if saved.get("version") == CACHE_VERSION and saved.get("max_pixels") == max_pixels:
            cache = saved["files"]
    except (OSError, json.JSONDecodeError, AttributeError, KeyError):
        pass
    mode = "full" if full else "header"
    listing = candidate_files(root)
    files = list(listing.files)
    checks: dict[str, FileCheck] = {}
    todo = []
    for rel in files:
        size, mtime = _stat(root / rel)
        hit = cache.get(rel)
        if hit and hit[0] == size and hit[1] == mtime and size >= 0 and (hit[2] == mode or hit[2] == "full"):
            checks[rel] = FileCheck(rel, size, mtime, hit[2], hit[3])
        else:
            todo.append((rel, size, mtime))
    jobs = [(str(root), rel, max_pixels, full) for rel, _, _ in todo]
    if len(jobs) > 64 and workers > 1:
        # Decoding is CPU work (processes); header checks are mostly waiting on the disk (threads).
        pool_type = ProcessPoolExecutor if full else ThreadPoolExecutor
        with pool_type(workers) as pool:
            reasons = list(pool.map(_check_one, jobs, chunksize=32))
    else:
        reasons = [_check_one(job) for job in jobs]
    for (rel, size, mtime), reason in zip(todo, reasons, strict=True):
        checks[rel] = FileCheck(rel, size, mtime, mode, reason)
    good = [rel for rel in files if checks[rel].reason is None]
    quarantined = [{"path": rel, "reason": reason} for rel in files if (reason := checks[rel].reason)]
    write_text_atomic(out / "good.txt", "".join(f"{rel}\n" for rel in good))
    write_text_atomic(out / "quarantine.jsonl", "".join(json.dumps(q) + "\n" for q in quarantined))
    entries = {rel: [v.size, v.mtime_ns, v.mode, v.reason] for rel, v in checks.items()}
    write_text_atomic(
        cache_path,
        json.dumps({"version": CACHE_VERSION, "max_pixels": max_pixels, "root": str(root), "files": entries}),
    )
    seconds = time.perf_counter() - start
    return ScanResult(root, out, good, quarantined, len(todo), len(files) - len(todo), seconds, listing.notes)
