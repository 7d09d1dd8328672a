"""`python -m dali_kd.scan ROOT`: check every image file of an ImageFolder tree before DALI meets it.

A DALI pipeline that meets an undecodable file dies for good, so a training run needs the bad files set aside first.
The default check reads each file's header and structure (format from content, not extension); `--full` also
decodes every file with DALI's own CPU decoder. Results are cached by path, size and mtime.

Writes OUT/good.txt (one <class>/<file> per line: the list training uses) and OUT/quarantine.jsonl
(one {"path", "reason"} per rejected file).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dali_kd.cli import CommandLineParser
from dali_kd.data.dataset import IMAGE_EXTENSIONS, TreeListing, data_folder, list_tree
from dali_kd.data.decoder_log import admits_images_over_decoder_limit, quiet_too_large_image_lines
from dali_kd.errors import UserError
from dali_kd.io import write_text_atomic

# Named like images or like the audio files DALI's file reader also lists: these are checked.
CHECKED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS) | {".gif", ".wav", ".flac", ".ogg"}
DEFAULT_MAX_PIXELS = 100_000_000
CACHE_VERSION = 1
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
UNSUPPORTED_SOF = {0xC3: "lossless JPEG", 0xC7: "lossless JPEG", 0xCB: "lossless JPEG", 0xCF: "lossless JPEG",
                   0xC5: "hierarchical JPEG", 0xC6: "hierarchical JPEG", 0xCD: "hierarchical JPEG",
                   0xCE: "hierarchical JPEG"}  # fmt: skip


class Reject(Exception):
    """A file training must not see; the message is the reason written to the quarantine."""


@dataclass(frozen=True)
class FileCheck:
    """One file's check, as cached: a good file has no reason."""

    path: str  # relative to the scanned root
    size: int
    mtime_ns: int
    mode: str  # "header" or "full"
    reason: str | None  # None: good


# ---- format checks from content --------------------------------------------------------------------------------
def sniff(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3":
        return "audio"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
        return "pnm"
    stripped = head.lstrip()[:15].lower()
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{")):
        return "text"
    return "unknown"


def check_jpeg(data: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the scan; dimensions from the frame header; an end-of-image marker at the end."""
    pos, size, dims = 2, len(data), None
    while True:
        if pos + 4 > size:
            raise Reject("truncated JPEG (ends inside its headers)")
        if data[pos] != 0xFF:
            raise Reject(f"corrupt JPEG: invalid marker at byte {pos}")
        while data[pos] == 0xFF and pos + 1 < size:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if marker in (0xD8, 0xD9, 0x00):
            raise Reject(f"corrupt JPEG: unexpected marker 0x{marker:02X} at byte {pos - 1}")
        length = struct.unpack(">H", data[pos : pos + 2])[0]
        if length < 2 or pos + length > size:
            raise Reject("truncated JPEG (a header segment runs past the end of the file)")
        if marker in SOF_MARKERS:
            if marker in UNSUPPORTED_SOF:
                raise Reject(f"{UNSUPPORTED_SOF[marker]}: DALI cannot decode it")
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            dims = (width, height)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            break
        pos += length
    if dims is None:
        raise Reject("corrupt JPEG: no frame header before the image data")
    # Cameras may append data after the image (MPO, gain maps), so look near the end, not at the last two bytes;
    # but only after the scan starts: an EXIF thumbnail in the headers ends with an end-of-image marker of its own.
    if data.find(b"\xff\xd9", max(pos + length, size - 4096)) < 0:
        raise Reject("truncated JPEG (no end-of-image marker)")
    return dims


def _chunk_name(kind: bytes) -> str:
    return repr(kind.decode("ascii")) if kind.isalpha() else f"0x{kind.hex()}"


def check_png(data: bytes) -> tuple[int, int]:
    """Walk every chunk with its CRC up to IEND; refuse animated PNG (DALI decodes it as a blank image)."""
    pos, size, dims = 8, len(data), None
    while True:
        if pos + 8 > size:
            raise Reject("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > size:
            raise Reject(f"truncated PNG (chunk {_chunk_name(kind)} runs past the end of the file)")
        crc = struct.unpack(">I", data[end - 4 : end])[0]
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise Reject(f"corrupt PNG (bad CRC in chunk {_chunk_name(kind)})")
        if kind == b"IHDR":
            dims = struct.unpack(">II", data[pos + 8 : pos + 16])
        elif kind == b"acTL":
            raise Reject("animated PNG: DALI decodes it as a blank image")
        elif kind == b"IEND":
            break
        pos = end
    if dims is None:
        raise Reject("corrupt PNG (no IHDR chunk)")
    return dims


def check_other(path: Path) -> tuple[int, int]:
    """BMP, TIFF, WebP, JPEG 2000, PNM: Pillow reads the dimensions from the header without decoding."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:  # noqa: BLE001 - anything Pillow cannot even open is not trainable
        raise Reject(f"unreadable image header ({type(e).__name__})") from None


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


def check_data(data: bytes, max_pixels: int, path: Path | None = None) -> None:
    """check_file on bytes already read (a sample in a shard: path None)."""
    if not data:
        raise Reject("empty file (0 bytes)")
    kind = sniff(data[:32])
    if kind == "audio":
        raise Reject("audio file, not an image")
    if kind == "gif":
        raise Reject("GIF: DALI cannot decode GIF")
    if kind == "text":
        raise Reject("not an image: HTML/XML/JSON text")
    if kind == "unknown":
        raise Reject("not an image: unrecognised content")
    width, height = (
        check_jpeg(data)
        if kind == "jpeg"
        else check_png(data)
        if kind == "png"
        else check_other(path if path is not None else io.BytesIO(data))
    )
    if width <= 0 or height <= 0:
        raise Reject(f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise Reject(f"too large: {width}x{height} pixels is over the cap of {max_pixels}")


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
    workers = workers or min(32, (os.cpu_count() or 1) * (1 if full else 4))
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
    quarantined = [{"path": rel, "reason": checks[rel].reason} for rel in files if checks[rel].reason]
    write_text_atomic(out / "good.txt", "".join(f"{rel}\n" for rel in good))
    write_text_atomic(out / "quarantine.jsonl", "".join(json.dumps(q) + "\n" for q in quarantined))
    entries = {rel: [v.size, v.mtime_ns, v.mode, v.reason] for rel, v in checks.items()}
    write_text_atomic(
        cache_path,
        json.dumps({"version": CACHE_VERSION, "max_pixels": max_pixels, "root": str(root), "files": entries}),
    )
    seconds = time.perf_counter() - start
    return ScanResult(root, out, good, quarantined, len(todo), len(files) - len(todo), seconds, listing.notes)


def main(argv: list[str] | None = None) -> int:
    parser = CommandLineParser(prog="python -m dali_kd.scan", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="an ImageFolder tree: ROOT/<class>/<image>")
    parser.add_argument(
        "--out", type=Path, help="where good.txt and quarantine.jsonl go (default: the user cache)"
    )
    parser.add_argument("--full", action="store_true", help="also decode every file with DALI's CPU decoder")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images")
    parser.add_argument("--workers", type=int, help="parallel checks (default: from the CPU count)")
    args = parser.parse_args(argv)
    if args.full and admits_images_over_decoder_limit(args.max_pixels):
        quiet_too_large_image_lines()  # DALI decodes such images, but prints a red error line for each
    try:
        result = scan(args.root, args.out, full=args.full, max_pixels=args.max_pixels, workers=args.workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"good list: {result.good_list}\nquarantine: {result.quarantine_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
