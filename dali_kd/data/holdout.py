"""The held-out part of a training folder (data.holdout_fraction): evaluation images taken from data.root itself."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import PurePosixPath

from dali_kd.data.dataset import ImageIndex


def _rank(rel_path: str) -> bytes:
    # A hash of the path alone: the choice depends on no seed, listing order, rank or machine.
    return hashlib.sha256(rel_path.encode("utf-8")).digest()


def held_out(rel_paths: Iterable[str], fraction: float) -> frozenset[str]:
    """The paths held out: in each class (a path's first part) round(n × fraction) of its n files, at least one
    and never all (a class of one file keeps it for training), those whose path hashes lowest."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for rel in rel_paths:
        by_class[PurePosixPath(rel).parts[0]].append(rel)
    held: set[str] = set()
    for files in by_class.values():
        count = min(len(files) - 1, max(1, round(len(files) * fraction)))
        held.update(sorted(files, key=_rank)[:count])
    return frozenset(held)


def split_off(
    index: ImageIndex, fraction: float, set_aside: Iterable[str] = ()
) -> tuple[ImageIndex, ImageIndex | None, str]:
    """(training part, held-out part or None, the line that says so) of a folder's index. set_aside: the
    relative paths the scan set aside; they count as listed, so that a file going bad moves no other file
    between the parts."""
    rel = [PurePosixPath(os.path.relpath(f, index.root)).as_posix() for f in index.files]
    held = held_out([*rel, *set_aside], fraction)
    val = [i for i, path in enumerate(rel) if path in held]
    if not val:
        return (
            index,
            None,
            "data: no evaluation: no class has two images, so data.holdout_fraction holds none out",
        )
    train = [i for i, path in enumerate(rel) if path not in held]
    line = (
        f"data: val split: {len(val)} of the {len(rel)} images under data.root held out for evaluation "
        f"(data.holdout_fraction={fraction:g} of each class; never trained on)"
    )
    return index.take(train), index.take(val), line
