"""Runtime quarantine: when decoding fails mid-run, name the file, set it aside, and read a same-class image in its
place, so the stream keeps its length, its position and every rank's step count.

One bookkeeping for every stream (DALI, torchvision, the teacher-cache replay): the limit
`data.max_runtime_quarantine`, the warning, the quarantine entry, and one replacement rule: the next image of the
same class that is still good, cyclically. A stand-in may fail later itself; a slot is then read through the
chain of replacements (i → j → k), never through a file already set aside.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from dali_kd import console
from dali_kd.data.dataset import ImageIndex
from dali_kd.errors import TrainingStopped

PATH_RE = re.compile(r"(/[^\s'\"]+)")


class RuntimeQuarantine:
    """Files set aside during the run and the image each one's slot reads instead.

    substitutions: set-aside sample id → the image chosen for it when it was set aside (that image may have been
    set aside since; `resolve` follows the chain). It is the stream's resumable state: a stream built with it reads
    the same stand-ins.
    """

    def __init__(self, index: ImageIndex, max_files: int, substitutions: dict[int, int] | None = None):
        self.index = index
        self.max_files = max_files
        self.substitutions: dict[int, int] = {int(k): int(v) for k, v in (substitutions or {}).items()}
        self.entries: list[dict[str, str]] = []  # new since the last take_entries()
        self._id_of = {path: i for i, path in enumerate(index.files)}
        self._started_ns = time.time_ns()

    def is_set_aside(self, sample_id: int) -> bool:
        return sample_id in self.substitutions

    def resolve(self, sample_id: int) -> int:
        """The image slot `sample_id` shows: itself, or the end of its chain of replacements (i → j → k)."""
        shown = sample_id
        for _ in range(len(self.substitutions) + 1):
            if shown not in self.substitutions:
                return shown
            shown = self.substitutions[shown]
        raise AssertionError(f"the runtime quarantine's replacements of {sample_id} form a cycle")

    def shown_ids(self) -> list[int]:
        """For every slot (sample id) of the index, the sample id of the image it shows."""
        return [self.resolve(i) for i in range(self.index.num_samples)]

    def substituted(self) -> dict[int, int]:
        """Each set-aside slot -> the image it shows (the end of its chain)."""
        return {i: self.resolve(i) for i in self.substitutions}

    def effective(self) -> tuple[list[str], list[int]]:
        """The file each slot should read and that file's sample id: set-aside slots read their resolved stand-in."""
        ids = self.shown_ids()
        return [self.index.files[i] for i in ids], ids

    def culprits(self, error_text: str, candidates: Callable[[], list[int]] | None = None) -> list[int]:
        """Sample ids of the files a decode error is about: named in the message, else among `candidates` (the
        samples the failing batch held, where the stream can say) those that fail a check, else (folder) files
        changed during the run, else (folder) every file whose header check fails, else (shards) every sample that
        fails a check."""
        named = {self._id_of[p] for p in PATH_RE.findall(error_text) if p in self._id_of}
        if named:
            return sorted(i for i in named if not self.is_set_aside(i))
        if candidates is not None:
            return sorted({i for i in candidates() if not self.is_set_aside(i) and self.fails_check(i)})
        if self.index.shards is not None:
            return [
                i for i in range(self.index.num_samples) if not self.is_set_aside(i) and self.fails_check(i)
            ]
        from dali_kd.data.file_checks import Reject, check_file

        changed = []
        for i, path in enumerate(self.index.files):
            try:
                if not self.is_set_aside(i) and os.stat(path).st_mtime_ns >= self._started_ns:
                    check_file(Path(path), max_pixels=1 << 62)
            except (OSError, Reject):
                changed.append(i)
        if changed:
            return changed
        # A file can go bad with its size and time unchanged (as the scan cache saw it): check every header.
        broken = []
        for i, path in enumerate(self.index.files):
            try:
                if not self.is_set_aside(i):
                    check_file(Path(path), max_pixels=1 << 62)
            except Reject:
                broken.append(i)
        return broken

    def fails_check(self, sample_id: int) -> bool:
        """Whether the sample's bytes cannot be read, or fail the scan's header check or DALI's CPU decode."""
        return self.check_reason(sample_id) is not None

    def check_reason(self, sample_id: int) -> str | None:
        """Why the sample's bytes cannot be read, or fail the scan's header check or DALI's CPU decode (None: good)."""
        from dali_kd.data.file_checks import Reject, check_data, dali_decode_check

        try:
            data = self.index.read_bytes(sample_id)
            check_data(data, max_pixels=1 << 62)
            dali_decode_check(data)
        except OSError as e:
            return f"unreadable ({e.strerror or e})"
        except Reject as e:
            return str(e)
        return None

    def set_aside(self, error_text: str, candidates: Callable[[], list[int]] | None = None) -> list[int]:
        """Quarantine the culprits of a decode error (stopping the run if none can be named or too many pile up).
        candidates: the samples the failing batch held, if the stream can tell (see culprits)."""
        first_line = next(
            (ln.strip() for ln in error_text.splitlines() if "fail" in ln.lower()), error_text[:200]
        )
        bad = self.culprits(error_text, candidates)
        if not bad:
            raise TrainingStopped(f"decoding failed and the file could not be identified: {first_line[:300]}")
        for sample_id in bad:
            self.add(sample_id, first_line[:200])
        return bad

    def add(self, sample_id: int, reason: str) -> bool:
        """Set one file aside (once: False if it already was): choose its replacement, warn, record the entry."""
        if self.is_set_aside(sample_id):
            return False
        path = self.index.files[sample_id]
        if len(self.substitutions) >= self.max_files:
            raise TrainingStopped(
                f"more than data.max_runtime_quarantine={self.max_files} files failed to decode during the "
                f"run (last: {path}); run `python -m dali_kd.scan --full` on the data"
            )
        self.substitutions[sample_id] = self.replacement(sample_id)
        console.warning(f"warning: set aside {path}: it failed to decode ({reason}); continuing without it")
        self.entries.append(
            {
                **self.index.where(sample_id),
                "reason": f"decode failed during training: {reason}",
                "found": "runtime",
            }
        )
        return True

    def replacement(self, sample_id: int, usable: Callable[[int], bool] | None = None) -> int:
        """The next image of the same class that is still good (cyclically), and `usable` where given; from
        shards one of the same tar (index.can_stand_in: DALI's reader reads a slot from its own tar)."""
        label, n = self.index.labels[sample_id], self.index.num_samples
        for step in range(1, n):
            other = (sample_id + step) % n
            if (
                self.index.labels[other] == label
                and not self.is_set_aside(other)
                and self.index.can_stand_in(sample_id, other)
                and (usable is None or usable(other))
            ):
                return other
        where = f" in {self.index.where(sample_id)['shard']}" if self.index.shards is not None else ""
        raise TrainingStopped(f"class {self.index.class_names[label]} has no decodable image left{where}")

    def state_dict(self) -> dict[str, int]:
        """The substitutions with string keys (as checkpoints store them); the constructor takes them back."""
        return {str(k): v for k, v in self.substitutions.items()}

    def take_entries(self) -> list[dict[str, str]]:
        entries, self.entries = self.entries, []
        return entries
