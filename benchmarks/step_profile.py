"""What the device does during steady training steps: torch.profiler over a few steps of the benchmark's step,
run by dali_kd's own trainer, summarised rather than kept as a trace.

A Callback starts the profiler after --warmup steps and marks each step (ProfilerStep#k); then --steps steps are
profiled, and the run is stopped. Reported over those steps:
  gpu_busy_pct      the share of the window in which any kernel, copy or memset ran (null on the CPU)
  top_kernels       the 10 kernels with the most device time (on the CPU: the 10 ops with the most self time)
  idle              the device's idle time per step and its largest gaps, each with the host op running then
  host_syncs        calls that make the host wait for the device (cudaStreamSynchronize, cudaDeviceSynchronize,
                    cudaEventSynchronize, a synchronous cudaMemcpy) and device-to-host copies; apart from them,
                    reads of a tensor's value (aten::_local_scalar_dense: .item(), bool(); a sync only for a
                    device tensor), counted on the CPU too
Log intervals are set longer than the run, so no metrics row (whose reads are expected) falls in the window.

    python benchmarks/step_profile.py [step_floor.py's model flags] --data DIR [--warmup 10] [--steps 8]
        [--compile] [--json profile.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile

from dali_kd.config import load_config
from dali_kd.console import Console
from dali_kd.runtime import resolve_device
from dali_kd.training.callbacks import Callback
from dali_kd.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_floor import add_model_arguments  # noqa: E402
from train_throughput import step_overrides  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
HOST_READ_OP = "aten::_local_scalar_dense"
STEP_PREFIX = "ProfilerStep"  # the profiler names each step range ProfilerStep* in its events


class _Profiled(Exception):
    """Ends the run once its steps are profiled."""


class ProfileSteps(Callback):
    """Profiles `steps` steps after `warmup` ones (plus one more, which holds the final drain and is left out)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.profiler: profile | None = None

    def on_step(self, trainer, batch) -> None:
        done = trainer.step
        if done == self.warmup:
            activities = [ProfilerActivity.CPU]
            if trainer.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            # A schedule that always records: only then does the profiler mark its steps.
            self.profiler = profile(activities=activities, schedule=lambda _: ProfilerAction.RECORD)
            self.profiler.start()
        elif self.warmup < done <= self.warmup + self.steps:
            self.profiler.step()
        elif done > self.warmup + self.steps:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            self.profiler.stop()
            raise _Profiled


def _span(event) -> tuple[float, float]:
    return event.time_range.start, event.time_range.end


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def summarize(events, steps: int) -> dict[str, Any]:
    """The profile's summary over its first `steps` ProfilerStep ranges (times in the profiler's µs)."""
    ranges = sorted(_span(e) for e in events if e.name.startswith(STEP_PREFIX))[:steps]
    if not ranges:
        raise SystemExit("the profile holds no step marks")
    start, end = ranges[0][0], ranges[-1][1]
    window_ms = (end - start) / 1000

    def inside(e) -> bool:
        return start <= e.time_range.start < end

    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and inside(e)]
    device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU and inside(e)]
    syncs = {name: sum(1 for e in host if e.name == name) for name in SYNC_CALLS}
    syncs["Memcpy DtoH"] = sum(1 for e in device if e.name.startswith("Memcpy DtoH"))
    out: dict[str, Any] = {
        "steps": len(ranges),
        "window_ms": window_ms,
        "ms_per_step": window_ms / len(ranges),
    }
    out["host_syncs"] = {name: n for name, n in syncs.items() if n}
    out["host_syncs_per_step"] = sum(syncs.values()) / len(ranges)
    # A read of a tensor's value: a sync when the tensor is on the device, free for a host tensor (the optimiser's
    # step counters), so counted apart.
    out["value_reads_per_step"] = sum(1 for e in host if e.name == HOST_READ_OP) / len(ranges)
    if device:
        busy = _merged([(max(a, start), min(b, end)) for a, b in map(_span, device)])
        busy_ms = sum(b - a for a, b in busy) / 1000
        out["gpu_busy_pct"] = 100 * busy_ms / window_ms
        gaps = [(b0, a1) for (_, b0), (a1, _) in zip(busy, busy[1:], strict=False)]
        out["idle"] = {
            "ms_per_step": (window_ms - busy_ms) / len(ranges),
            "largest_gaps": [
                {
                    "ms": (b - a) / 1000,
                    "at_ms": (a - start) / 1000,
                    "host_was_in": _host_op_at(host, (a + b) / 2),
                }
                for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:5]
            ],
        }
        kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
        out["top_kernels"] = _top([(e.name, e.time_range.elapsed_us()) for e in kernels], len(ranges))
    else:
        out["gpu_busy_pct"] = None
        out["idle"] = None
        ops = [(e.name, e.self_cpu_time_total) for e in host if not e.name.startswith(STEP_PREFIX)]
        out["top_ops"] = _top(ops, len(ranges))
    return out


def _host_op_at(host, when: float) -> str | None:
    """The innermost host op running at `when` (the shortest one that covers it)."""
    covering = [
        e
        for e in host
        if e.time_range.start <= when <= e.time_range.end and not e.name.startswith(STEP_PREFIX)
    ]
    return min(covering, key=lambda e: e.time_range.elapsed_us()).name if covering else None


def _top(named_us: list[tuple[str, float]], steps: int, n: int = 10) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in named_us:
        totals[name][0] += us
        totals[name][1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return [
        {"name": name[:120], "ms_per_step": us / 1000 / steps, "calls": int(calls)}
        for name, (us, calls) in ranked
    ]


def markdown(summary: dict[str, Any]) -> str:
    busy = summary["gpu_busy_pct"]
    lines = [
        f"{summary['steps']} steps profiled, {summary['ms_per_step']:.1f} ms/step under the profiler; "
        f"GPU busy {'—' if busy is None else f'{busy:.1f}%'}; host syncs per step "
        f"{summary['host_syncs_per_step']:.2f} ({', '.join(f'{k} {v}' for k, v in summary['host_syncs'].items())}); "
        f"tensor value reads (aten::_local_scalar_dense, device or host tensors) per step "
        f"{summary['value_reads_per_step']:.1f}",
    ]
    if summary["idle"]:
        idle = summary["idle"]
        lines.append(f"GPU idle {idle['ms_per_step']:.2f} ms per step; largest gaps:")
        lines += [
            f"- {g['ms']:.2f} ms at +{g['at_ms']:.1f} ms, host in {g['host_was_in']}"
            for g in idle["largest_gaps"]
        ]
    top = summary.get("top_kernels") or summary.get("top_ops") or []
    lines += [
        "",
        f"| {'kernel' if 'top_kernels' in summary else 'op (self CPU time)'} | ms/step | calls |",
        "|---|---|---|",
    ]
    lines += [f"| {t['name'].replace('|', '/')} | {t['ms_per_step']:.3f} | {t['calls']} |" for t in top]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, required=True, help="an image tree (benchmarks/make_dataset.py)")
    parser.add_argument("--backend", default="dali", choices=["dali", "torchvision"])
    parser.add_argument("--dali-threads", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the student (as the trainer does)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="steps before the profiler starts")
    parser.add_argument("--steps", type=int, default=8, help="steps profiled")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.log_every = args.warmup + args.steps + 2  # no metrics row inside the window
    device = resolve_device(args.device)
    total = args.warmup + args.steps + 1
    callback = ProfileSteps(args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as tmp, Console("quiet"):
        overrides = step_overrides(args, args.data, Path(tmp), args.backend, "profile")
        overrides += [f"train.epochs={total}", "train.save_every_n_steps=null"]
        trainer = Trainer(load_config(overrides=overrides), device, show_progress=False, callbacks=[callback])
        with contextlib.suppress(_Profiled):  # raised by the callback once the steps are profiled
            trainer.fit(Path(tmp) / "profile")
    if callback.profiler is None:
        raise SystemExit(f"the run ended before step {args.warmup}: not enough images for the warm-up")
    summary = summarize(callback.profiler.events(), args.steps)
    summary.update(device=str(device), teacher=args.teacher, student=args.student, batch_size=args.batch_size)
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        args.json.with_suffix(".md").write_text(markdown(summary) + "\n")


if __name__ == "__main__":
    main()
