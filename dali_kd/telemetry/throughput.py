"""img/s, defined once: images trained divided by the training seconds they took, over log intervals.

A log interval's row holds `images` (trained in it, all ranks), `interval_s` (its training seconds: evaluation and
checkpoint writing are not training) and `img_per_s`, their ratio — the figure the progress line shows. A run's
`images_per_sec` (summary.json, `python -m dali_kd.report`) is the same ratio over every interval but each process's
first: that one holds torch.compile's compilation and the warm-up (its row says `"warmup": true`), which on a CPU
can take a minute of a few-minute run. `images_per_sec_overall` counts those too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def images_per_second(images: float, seconds: float) -> float | None:
    """None when no time passed (nothing to divide by)."""
    return images / seconds if seconds > 0 else None


def is_warmup(row: Mapping[str, Any], index: int) -> bool:
    """A process's first interval; rows written before the flag existed: the file's first row."""
    return bool(row.get("warmup", index == 0))


@dataclass(frozen=True)
class RunThroughput:
    images_per_sec: float | None  # steady state: the warm-up intervals left out
    images_per_sec_overall: float | None  # every interval, compilation and warm-up included

    def as_dict(self) -> dict[str, float | None]:
        return {"images_per_sec": self.images_per_sec, "images_per_sec_overall": self.images_per_sec_overall}


def run_throughput(rows: Iterable[Mapping[str, Any]]) -> RunThroughput:
    """The run's img/s from its metrics rows (rows without finite `images` and `interval_s` are not counted)."""
    steady = [0.0, 0.0]
    overall = [0.0, 0.0]
    for index, row in enumerate(rows):
        images, seconds = row.get("images"), row.get("interval_s")
        if images is None or seconds is None or not math.isfinite(images + seconds):
            continue
        for sums in (overall,) if is_warmup(row, index) else (overall, steady):
            sums[0] += images
            sums[1] += seconds
    return RunThroughput(images_per_second(*steady), images_per_second(*overall))
