"""How many CPU threads this process should run: the CPUs it may use (affinity, cgroup quota), less what others use.

A thread team as wide as the machine is the right choice on idle cores and the wrong one on busy ones: torch's
OpenMP team and DALI's worker pool wait at every op for their slowest thread, and a descheduled thread is very slow.
On 2 cores beside two busy loops, two threads made the demo 4× slower where its fair share would make it 2×. So a
run counts the CPUs it may use — its affinity mask (taskset, Slurm's cpuset), rounded down to its cgroup's CPU quota
(Docker's --cpus, Kubernetes limits) — and subtracts the cores that other processes keep busy on those CPUs, read from
/proc/stat over a short window. Torch's intra-op threads and DALI's CPU threads are both set from that number.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# A core counts as taken by others when they use at least this much of it: half a core of background work still
# leaves a second thread more gain than wait.
_BUSY_CORE = 0.5


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity API
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (cgroup v2 cpu.max, or v1 cfs quota/period); None when unlimited or absent."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup quota (at least 1)."""
    cpus = len(_affinity())
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def _cpu_jiffies(cpus: set[int], stat: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over the given CPUs' lines of /proc/stat; None where there is no such file."""
    busy = total = 0
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        busy += sum(values) - idle
        total += sum(values)
    return busy, total


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


@dataclass(frozen=True)
class CpuBudget:
    """What was seen and decided: `threads` is what torch and DALI get."""

    usable: int
    others_busy: float  # cores that other processes kept busy on the usable CPUs, during the sample
    threads: int
    chosen_by: str  # "auto" or the config key that fixed it

    def line(self) -> str:
        if self.chosen_by != "auto":
            return f"cpu: {self.threads} threads ({self.chosen_by})"
        busy = f", others keep {self.others_busy:.1f} busy" if self.others_busy >= _BUSY_CORE else ""
        return f"cpu: {self.threads} threads ({self.usable} CPUs usable{busy})"


class CpuSampler:
    """Starts counting at construction; `budget()` later decides from what other processes did in between.

    Made at the start of a command, it measures across the imports (seconds), so one busy moment does not decide."""

    def __init__(
        self,
        stat: Path = Path("/proc/stat"),
        cgroup: Path = Path("/sys/fs/cgroup"),
        min_window_s: float = 0.2,
        own_cpu_s: Callable[[], float] = _own_cpu_s,
    ):
        self._stat = stat
        self._own_cpu_s = own_cpu_s
        self._min_window_s = min_window_s
        self._cpus = _affinity()
        self._usable = usable_cpus(cgroup)
        self._start = (_cpu_jiffies(self._cpus, stat), own_cpu_s(), time.monotonic())

    def others_busy(self) -> float:
        """Cores other processes kept busy on this process's CPUs since construction (0 where /proc is absent)."""
        jiffies, own, started = self._start
        if jiffies is None:
            return 0.0
        wait = self._min_window_s - (time.monotonic() - started)
        if wait > 0:  # too short a window reads one scheduler tick as a busy core
            time.sleep(wait)
        now = _cpu_jiffies(self._cpus, self._stat)
        if now is None or now[1] <= jiffies[1]:
            return 0.0
        busy_fraction = (now[0] - jiffies[0]) / (now[1] - jiffies[1])
        elapsed = time.monotonic() - started
        own_cores = (self._own_cpu_s() - own) / elapsed if elapsed > 0 else 0.0
        return max(0.0, busy_fraction * len(self._cpus) - own_cores)

    def budget(self, fixed: int | None = None, chosen_by: str = "train.cpu_threads") -> CpuBudget:
        """fixed: a thread count the user set (kept as is); None: the usable CPUs less the ones others keep busy."""
        if fixed is not None:
            return CpuBudget(self._usable, 0.0, fixed, chosen_by)
        others = self.others_busy()
        free = self._usable - math.floor(others + (1 - _BUSY_CORE))
        return CpuBudget(self._usable, others, max(1, min(self._usable, free)), "auto")
