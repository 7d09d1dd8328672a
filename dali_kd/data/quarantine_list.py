"""The run's quarantine list: every file the run set aside and why.

Two kinds of entries: the scan's, made before training (data/prepare.py), and those found during the run, when a
rank's training stream or its evaluation meets a file that no longer decodes (data/recovery.py,
data/eval_quarantine.py). The list gathers the second kind from every rank, keeps them for a resumed run (the
checkpoint carries them, under the progress key `runtime_quarantine`) and keeps the run directory's
quarantine.jsonl up to date. The loop only asks it to gather, at the points where it saves or evaluates.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Protocol

from dali_kd import console, distributed
from dali_kd.errors import UserError
from dali_kd.io import write_text_atomic

FILE_NAME = "quarantine.jsonl"


class SetsAside(Protocol):
    """A stream or evaluator that sets files aside: the entries it made since the last call."""

    def take_entries(self) -> list[dict[str, str]]: ...


def append_entries(path: Path, entries: list[dict[str, str]]) -> None:
    """Append quarantine entries, one JSON object per line."""
    try:
        with open(path, "a") as f:
            for entry in entries:
                f.write(json.dumps(entry) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


class QuarantineList:
    """The scan's entries and the run's own; `watch` the streams and evaluators that set files aside."""

    def __init__(self, scan_entries: list[dict[str, str]]):
        self.scan_entries = list(scan_entries)
        self.runtime_entries: list[dict[str, str]] = []  # found during the run, by any rank
        self._sources: list[SetsAside] = []
        self._file: Path | None = None  # rank 0's quarantine.jsonl, once started

    def watch(self, *sources: SetsAside) -> None:
        self._sources.extend(sources)

    def __len__(self) -> int:
        return len(self.scan_entries) + len(self.runtime_entries)

    def start(self, run_dir: Path) -> None:
        """(Rank 0) write the run directory's quarantine.jsonl afresh: the scan's verdicts, then what the run
        itself set aside (a resumed run's, carried over by its checkpoint)."""
        path = run_dir / FILE_NAME
        write_text_atomic(
            path, "".join(json.dumps(e) + "\n" for e in self.scan_entries + self.runtime_entries)
        )
        self._file = path

    def gather(self) -> list[dict[str, str]]:
        """Collective: what every rank's sources set aside since the last call (training entries say so; an
        evaluation's carry their split), added here and, on rank 0, to quarantine.jsonl."""
        taken = [entry for source in self._sources for entry in source.take_entries()]
        new = [
            {"split": "train", **e}
            for rank_entries in distributed.gather_objects(taken)
            for e in rank_entries
        ]
        self.runtime_entries.extend(new)
        if new and self._file is not None:
            append_entries(self._file, new)
            console.info(f"data: {len(new)} more file(s) set aside during the run (see {FILE_NAME})")
        return new

    def set_aside_files(self, split: str) -> set[str]:
        """The files of a split the run set aside so far (ImageIndex.files entries)."""
        return {e["path"] for e in self.runtime_entries if e.get("split", "train") == split}

    def state_dict(self) -> dict[str, Any]:
        return {"runtime_quarantine": copy.deepcopy(self.runtime_entries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this list's key (a checkpoint's progress dict also holds other parts' counters)."""
        if "runtime_quarantine" in state:
            self.runtime_entries = copy.deepcopy(state["runtime_quarantine"])
