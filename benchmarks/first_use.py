"""The demo as a new user meets it: `python -m dali_kd.train` from an empty HOME and a cold torch.compile cache, on a
quiet machine and beside busy loops, side by side in one run.

For each case it reports the seconds from the command's start to its first distilled step (the first-use dataset
and teacher included) and to its end, the thread count the run chose, and the k-NN top-1 of student and teacher;
then each busy case's total as a multiple of the quiet one. The busy loops are plain `while True: pass` processes
started before the demo and stopped after it.

    python benchmarks/first_use.py [--busy 0,2] [--json out.json] [-- KEY=VALUE ...]

KEY=VALUE pairs after `--` go to every run (e.g. train.epochs=1 for a short check); the demo's own log interval is
set to one step, so the first step's line is printed as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUSY_LOOP = "while True:\n    pass\n"
STEP_LINE = re.compile(r"^step (\d+)/")
KNN_LINE = re.compile(r"student k-NN top-1 ([\d.]+)% \(teacher ([\d.]+)%")
THREADS_LINE = re.compile(r"^cpu: (\d+) threads")


def run_demo(busy: int, extra: list[str]) -> dict[str, Any]:
    """One demo from an empty HOME beside `busy` busy loops: the times and figures its output shows."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory(prefix="dali_kd_first_use_") as tmp:
            env = {
                **os.environ,
                "HOME": str(Path(tmp) / "home"),
                "TORCHINDUCTOR_CACHE_DIR": str(
                    Path(tmp) / "inductor"
                ),  # a cold compile cache, as a new user has
                "PYTHONUNBUFFERED": "1",
            }
            command = [
                sys.executable,
                "-m",
                "dali_kd.train",
                "--no-progress",
                "train.log_every_n_steps=1",
                *extra,
            ]
            start = time.perf_counter()
            found: dict[str, Any] = {"busy_loops": busy, "first_step_s": None, "threads": None, "knn": None}
            with subprocess.Popen(
                command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    seen = time.perf_counter() - start
                    if found["first_step_s"] is None and STEP_LINE.match(line):
                        found["first_step_s"] = round(seen, 1)
                    if match := THREADS_LINE.match(line):
                        found["threads"] = int(match.group(1))
                    if match := KNN_LINE.search(line):
                        found["knn"] = {"student": float(match.group(1)), "teacher": float(match.group(2))}
                found["returncode"] = proc.wait()
            found["total_s"] = round(time.perf_counter() - start, 1)
            return found
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def markdown(rows: list[dict[str, Any]]) -> str:
    quiet = next((r["total_s"] for r in rows if r["busy_loops"] == 0), None)
    lines = [
        "| busy loops | threads | first step s | total s | × quiet | student k-NN | teacher k-NN | rc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        knn = r["knn"] or {"student": float("nan"), "teacher": float("nan")}
        ratio = f"{r['total_s'] / quiet:.2f}" if quiet else "-"
        lines.append(
            f"| {r['busy_loops']} | {r['threads']} | {r['first_step_s']} | {r['total_s']} | {ratio} | "
            f"{knn['student']:.1f} | {knn['teacher']:.1f} | {r['returncode']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", default="0,2", help="comma-separated numbers of busy loops, one demo each")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("extra", nargs="*", help="KEY=VALUE overrides for every run (after --)")
    args = parser.parse_args(argv)
    rows = []
    for busy in (int(b) for b in args.busy.split(",")):
        rows.append(run_demo(busy, args.extra))
        print(json.dumps(rows[-1]), flush=True)
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
