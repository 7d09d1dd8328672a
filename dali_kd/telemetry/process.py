"""This process's CPU use and resident memory, read from the OS between log steps (no thread needed)."""

from __future__ import annotations

import os
import resource
import time


def resident_mb() -> float:
    """Current resident set size; the peak (getrusage) where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_resident_mb()


def peak_resident_mb() -> float:
    """The process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ProcessSampler:
    """CPU % of this process since the last collect (100 = one core busy) and its resident memory."""

    def __init__(self):
        self._last = (time.perf_counter(), self._cpu_s())

    @staticmethod
    def _cpu_s() -> float:
        t = os.times()
        return t.user + t.system

    def collect(self) -> dict[str, float]:
        now, cpu = time.perf_counter(), self._cpu_s()
        wall = now - self._last[0]
        pct = 100.0 * (cpu - self._last[1]) / wall if wall > 0 else 0.0
        self._last = (now, cpu)
        return {"proc_cpu_pct": pct, "proc_rss_mb": resident_mb()}
