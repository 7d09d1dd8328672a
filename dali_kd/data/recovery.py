"""Runtime quarantine: when decoding fails mid-run, name the file, set it aside, and read a same-class image in its
place, so the stream keeps its length, its position and every rank's step count."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from dali_kd.data.dataset import ImageIndex
from dali_kd.errors import TrainingStopped

PATH_RE = re.compile(r"(/[^\s'\"]+)")


class RuntimeQuarantine:
    def __init__(self, index: ImageIndex, max_files: int, substitutions: dict[int, int] | None = None):
        self.index = index
        self.max_files = max_files
        self.substitutions: dict[int, int] = dict(substitutions or {})
        self.entries: list[dict[str, str]] = []  # new since the last take_entries()
        self._id_of = {path: i for i, path in enumerate(index.files)}
        self._started_ns = time.time_ns()

    def culprits(self, error_text: str) -> list[int]:
        """Sample ids of the files a decode error is about: named in the message, else changed during the run."""
        named = {self._id_of[p] for p in PATH_RE.findall(error_text) if p in self._id_of}
        if named:
            return sorted(named - set(self.substitutions))
        from dali_kd.scan import Reject, check_file

        changed = []
        for i, path in enumerate(self.index.files):
            try:
                if i not in self.substitutions and os.stat(path).st_mtime_ns >= self._started_ns:
                    check_file(Path(path), max_pixels=1 << 62)
            except (OSError, Reject):
                changed.append(i)
        return changed

    def set_aside(self, error_text: str) -> list[int]:
        """Quarantine the culprits of an error (stopping the run if none can be named or too many pile up)."""
        first_line = next(
            (ln.strip() for ln in error_text.splitlines() if "fail" in ln.lower()), error_text[:200]
        )
        bad = self.culprits(error_text)
        if not bad:
            raise TrainingStopped(f"decoding failed and the file could not be identified: {first_line[:300]}")
        for sample_id in bad:
            if len(self.substitutions) >= self.max_files:
                raise TrainingStopped(
                    f"more than data.max_runtime_quarantine={self.max_files} files failed to decode during the "
                    f"run (last: {self.index.files[sample_id]}); run `python -m dali_kd.scan --full` on the data"
                )
            self.substitutions[sample_id] = self._replacement(sample_id)
            self.entries.append(
                {
                    "path": self.index.files[sample_id],
                    "reason": f"decode failed during training: {first_line[:200]}",
                    "found": "runtime",
                }  # fmt: skip
            )
        return bad

    def _replacement(self, sample_id: int) -> int:
        """The next image of the same class that is still good (cyclically)."""
        label, n = self.index.labels[sample_id], self.index.num_samples
        for step in range(1, n):
            other = (sample_id + step) % n
            if self.index.labels[other] == label and other not in self.substitutions:
                return other
        raise TrainingStopped(f"class {self.index.class_names[label]} has no decodable image left")

    def effective(self) -> tuple[list[str], list[int]]:
        """The file list and the sample ids the reader should use: quarantined slots read their replacement."""
        ids = [self.substitutions.get(i, i) for i in range(self.index.num_samples)]
        return [self.index.files[i] for i in ids], ids

    def take_entries(self) -> list[dict[str, str]]:
        entries, self.entries = self.entries, []
        return entries
