"""Whether a teacher cache on disk is whole: its files as its header says, and each row as it was written.

A row's checksums are written with its done byte (after its data, before the done byte), one over its view record
and done byte, then one per teacher over that teacher's stored outputs: a row whose view fails cannot be rendered
again and is not replayed; a teacher's outputs that fail are computed again by that teacher. Checksums are CRC-32 (zlib): they find torn
or zeroed pages and flipped bits, not deliberate forgery.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Per row, in checks.bin: the checksum of the view record (with the mix part and the done byte), then that of each
# teacher's stored outputs (one teacher: TARGETS_CHECK, NUM_CHECKS in all).
VIEW_CHECK, TARGETS_CHECK = 0, 1
NUM_CHECKS = 2


def targets_check(teacher: int) -> int:
    """The column of checks.bin that holds teacher `teacher`'s (0-based, config order) outputs' checksum."""
    return TARGETS_CHECK + teacher


def num_checks(num_teachers: int) -> int:
    return VIEW_CHECK + 1 + num_teachers


# name, numpy dtype name, full shape: one array file <name>.bin.
Layout = Sequence[tuple[str, str, tuple[int, ...]]]


def row_checksums(columns: Sequence[np.ndarray]) -> np.ndarray:
    """One CRC-32 per row over the rows' bytes in `columns` (each [n, ...], as stored), in order."""
    n = len(columns[0])
    rows = [np.ascontiguousarray(c).reshape(n, -1).view(np.uint8) for c in columns]
    sums = np.empty(n, dtype=np.uint32)
    for i in range(n):
        crc = 0
        for row in rows:
            crc = zlib.crc32(row[i], crc)
        sums[i] = crc
    return sums


def read_header(path: Path) -> tuple[dict | None, str | None]:
    """(the header, None), or (None, why it cannot be read): missing, not JSON, not an object."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except OSError as e:
        return None, f"{path.name} cannot be read ({e.strerror})"
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
        return None, f"{path.name} is not JSON"
    if not isinstance(header, dict):
        return None, f"{path.name} is not a JSON object"
    return header, None


def any_present(directory: Path, layout: Layout) -> bool:
    """Whether any of the cache's array files is in `directory` (a cache was allocated there, or begun)."""
    return any((directory / f"{name}.bin").exists() for name, _, _ in layout)


def damage(directory: Path, layout: Layout) -> str | None:
    """What is wrong with the cache's files (the first: missing, or another size than its header implies)."""
    for name, dtype, shape in layout:
        path = directory / f"{name}.bin"
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path.name} is missing"
        except OSError as e:
            return f"{path.name} cannot be read ({e.strerror})"
        if size != expected:
            return f"{path.name} is {size} bytes where its header implies {expected}"
    return None
