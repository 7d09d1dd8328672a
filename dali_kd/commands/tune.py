"""`python -m dali_kd.tune`: the configured training step timed with each speed option flipped, one at a time,
and the KEY=VALUE overrides that made it faster on this machine.

It takes the same config files, presets and overrides as `python -m dali_kd.train`. Every candidate trains in a
fresh Trainer (the trainer's own step, data stream and telemetry) in a temporary run directory: a few warm-up
steps, then --steps timed steps, and the run is stopped. Candidates are measured --repeats times in interleaved
rounds, so that a machine getting slower or faster over the minutes touches every candidate alike (with one
round, the defaults are timed first and again last, so that their spread still measures the noise); compile
caches carry over from one candidate to the next (same process, torch's on-disk caches).

How it decides (dali_kd.commands.tune_verdict): a candidate's ms/step is the median of its repeats; the noise is the
largest spread between the repeats of any one setting. An override is printed as faster only where the timings
tell it apart from the defaults (further than the noise, no overlapping repeats); otherwise the verdict says the
noise cannot tell them apart. Each override is measured alone: their combination is measured once at the end when
there is more than one. --quick sizes all this for a CPU: few steps, few options, three rounds.

Ctrl-C, SIGTERM or SIGUSR1 stop the tuning at once (a timing run at its next step), with one line; the temporary run
directories go with it: exit 130 for Ctrl-C, 75 for the others, as for train (nothing is requeued: nothing is saved).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dali_kd.commands.cli import CommandLineParser
from dali_kd.commands.tune_verdict import Candidate, fastest_overrides, noise_pct, table, verdict_lines
from dali_kd.config import Config, load_config
from dali_kd.config.presets import find_preset
from dali_kd.errors import UserError
from dali_kd.io import write_json_atomic
from dali_kd.pipelines.params import resolve_multi_crop_graph
from dali_kd.training.callbacks import Callback

if TYPE_CHECKING:
    import torch

    from dali_kd.runs.preemption import StopSignal

# --quick: a few minutes on a CPU. Three rounds give each setting a spread; the options are the ones that move a
# CPU step (the DALI threads against torch's for the same cores, and how far DALI works ahead).
QUICK = {"steps": 5, "warmup": 2, "repeats": 3, "options": "dali_threads,prefetch_batches"}
FULL = {"steps": 24, "warmup": 6, "repeats": 2, "options": None}


def _flip(cfg: Config, key: str, auto_on: bool) -> Candidate:
    """The boolean (or auto) option at key turned the other way from what it resolves to now."""
    value = cfg.value(key)
    on = auto_on if value in (None, "auto") else bool(value)
    return Candidate(f"{key}={str(not on).lower()}", [f"{key}={str(not on).lower()}"])


def _others(key: str, values: list, current: Any, note: str | None) -> list[Candidate]:
    return [Candidate(f"{key}={v}", [f"{key}={v}"], note) for v in dict.fromkeys(values) if v != current]


def speed_options(cfg: Config, on_gpu: bool) -> list[Candidate]:
    """The options that change how fast the same step runs, each flipped from this config's value."""
    d = cfg.data
    dali = None if d.backend == "dali" else f"skipped: DALI only (data.backend is {d.backend})"
    gpu_dali = dali or (None if on_gpu else "skipped: GPU decode only (the device is the CPU)")
    threads = [max(1, d.dali_threads // 2), min(os.cpu_count() or 1, d.dali_threads * 2)]
    return [
        _flip(cfg, "model.teacher.compile", auto_on=on_gpu),
        _flip(cfg, "train.optimizer.fused", auto_on=on_gpu),
        _flip(cfg, "train.telemetry", auto_on=True),
        *_others("data.output_dtype", ["float16" if d.output_dtype == "float32" else "float32"], None, None),
        *_others("data.decode", ["full" if d.decode == "window" else "window"], None, dali),
        *_others("data.hw_decoder_load", [0.65, 0.9, 1.0], d.hw_decoder_load, gpu_dali),
        *_others("data.prefetch_batches", [1, 4], d.prefetch_batches, dali),
        *_others("data.dali_threads", threads, d.dali_threads, dali),
        # Multi-crop's two DALI graphs: one chain per crop, or all crops of a chain as frames (data.multi_crop_graph).
        *(
            _others(
                "data.multi_crop_graph",
                ["batched", "per_crop"],
                resolve_multi_crop_graph(d.multi_crop_graph, on_gpu),
                dali,
            )
            if cfg.train.use_local_crops
            else []
        ),
    ]


class _Measured(Exception):
    """Raised by StepClock to end a run once its steps are timed."""


class StepClock(Callback):
    """Wall time of `steps` steps after `warmup` ones, then stops the run. An interval that holds an epoch end
    (its checkpoint, an evaluation) is left out; the device's queue is drained at both ends of the timing."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.intervals_s: list[float] = []
        self._last: tuple[float, int] | None = None

    def _now(self, trainer, sync: bool) -> float:
        if sync and trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize(trainer.device)
        return time.perf_counter()

    def on_step(self, trainer, batch) -> None:
        if trainer.micro_batch:  # a step's later batches (train.grad_accum_steps): time whole steps
            return
        done = trainer.step
        if done < self.warmup:
            return
        now = self._now(trainer, sync=done in (self.warmup, self.warmup + self.steps))
        if self._last is not None and self._last[1] == trainer.parts.state.epoch:
            self.intervals_s.append(now - self._last[0])
        self._last = (now, trainer.parts.state.epoch)
        if done >= self.warmup + self.steps:
            raise _Measured

    @property
    def ms_per_step(self) -> float:
        return 1000 * sum(self.intervals_s) / len(self.intervals_s)


def run_overrides(run_dir: Path, name: str, total_steps: int) -> list[str]:
    """Where a timing run writes, and what it leaves out: evaluation, step checkpoints, a stop it never reaches."""
    return [
        f"train.output_dir={run_dir}",
        f"train.run_name={name}",
        f"train.epochs={total_steps}",  # one step an epoch at least: the run is stopped long before its end
        "train.save_every_n_steps=null",
        "data.val_root=null",
        "data.holdout_fraction=0",
        f"train.teacher_feature_dir={run_dir / 'teacher_cache'}",  # never the user's cache
    ]


def measure_step(cfg: Config, device, warmup: int, steps: int) -> float:
    """ms per step of cfg's training step on `device`: a fresh Trainer, warmup + steps steps, then stopped."""
    import torch

    from dali_kd.console import Console
    from dali_kd.training.trainer import Trainer

    clock = StepClock(warmup, steps)
    with Console("quiet"):
        trainer = Trainer(cfg, device, show_progress=False, callbacks=[clock])
        try:
            assert cfg.train.run_name is not None  # the tuning overrides name each run
            trainer.fit(Path(cfg.train.output_dir) / cfg.train.run_name)
        except _Measured:
            pass
        finally:
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not clock.intervals_s:
        raise UserError("no step could be timed: the run ended before its warm-up did")
    return clock.ms_per_step


@dataclass(frozen=True)
class Timing:
    """How each candidate is timed: on `device`, `warmup` steps left out, then `steps` timed, in `repeats`
    interleaved rounds."""

    device: torch.device
    steps: int
    warmup: int
    repeats: int


def tune(
    loader: dict[str, Any], overrides: list[str], candidates: list[Candidate], timing: Timing, work: Path,
    stop: StopSignal, report=print,
) -> list[Candidate]:  # fmt: skip
    """Time every runnable candidate `timing.repeats` times in interleaved rounds (loader: load_config's file
    arguments); a candidate whose overrides the schema rejects, or whose run fails, gets a note instead. A stop
    signal ends it (Preempted): at once while a timing run starts, at its next step once it trains."""
    total = timing.warmup + timing.steps
    rounds = [candidates if r % 2 == 0 else candidates[::-1] for r in range(timing.repeats)]
    if timing.repeats == 1 and len(candidates) > 1:
        rounds.append(candidates[:1])  # the defaults again, last: the noise
    for round_index, order in enumerate(rounds):
        for number, candidate in enumerate(order):
            if candidate.note is not None:
                continue
            name = f"r{round_index}-{number}"
            try:
                cfg = load_config(
                    **loader, overrides=overrides + candidate.overrides + run_overrides(work, name, total)
                )
            except UserError as e:
                candidate.note = f"skipped: not accepted by this config ({e})"
                continue
            try:
                with stop.interrupting():
                    candidate.ms.append(measure_step(cfg, timing.device, timing.warmup, timing.steps))
            except Exception as e:  # noqa: BLE001 - one failing option must not end the tuning
                candidate.note = (
                    f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                )
                candidate.ms.clear()
                continue
            report(f"round {round_index + 1}/{len(rounds)}: {candidate.name}: {candidate.ms[-1]:.2f} ms/step")
    return candidates


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m dali_kd.tune",
        description="Time the configured training step with each speed option flipped and print the fastest "
        "KEY=VALUE overrides. Config flags and overrides as for python -m dali_kd.train (the demo's data and "
        "teacher are made on first use, as train makes them).",
    )
    parser.add_argument("--data_config", type=Path, help="data YAML (default: the demo's)")
    parser.add_argument("--train_config", type=Path, help="train YAML (default: the demo's)")
    parser.add_argument("--model_config", type=Path, help="model YAML (default: the demo's)")
    parser.add_argument("--preset", action="append", default=[], metavar="NAME|PATH", help="as for train")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="overrides train.device")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"sized for a CPU: {QUICK['repeats']} rounds of {QUICK['warmup']} + {QUICK['steps']} steps, options "
        f"{QUICK['options']} (the flags below still win)",
    )
    parser.add_argument("--steps", type=int, help=f"timed steps per candidate (default {FULL['steps']})")
    parser.add_argument(
        "--warmup", type=int, help=f"untimed steps first: compilation, warm-up (default {FULL['warmup']})"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"interleaved rounds (>= 2: the noise estimate; default {FULL['repeats']})",
    )
    parser.add_argument(
        "--options", help="comma-separated: only the options whose key contains one of these words"
    )
    parser.add_argument(
        "--try", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="another candidate"
    )
    parser.add_argument(
        "--json", type=Path, help="also write the table and the decision as JSON (its folder must exist)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="as for train")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with what --quick (or the full tuning) sets wherever a flag was not given."""
    args = build_parser().parse_intermixed_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.repeats, args.steps, args.warmup) < 1:
        raise UserError("--repeats, --steps and --warmup must be >= 1")
    if args.json is not None:
        check_json_path(args.json)
    return args


def check_json_path(path: Path) -> None:
    """--json's file can be written once the timing is done: said before it starts, not after."""
    folder = path.parent
    if path.is_dir():
        raise UserError(f"--json: {path} is a folder; give the name of a file to write")
    if not folder.is_dir():
        raise UserError(f"--json: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--json: the folder {folder} is not writable")


def chosen_options(options: list[Candidate], words_text: str) -> list[Candidate]:
    """The options whose name contains one of the comma-separated words; a word that matches none is a mistake."""
    words = [w.strip() for w in words_text.split(",") if w.strip()]
    unmatched = [w for w in words if not any(w in c.name for c in options)]
    if unmatched or not words:
        keys = ", ".join(dict.fromkeys(c.name.split("=")[0] for c in options))
        what = f"{', '.join(map(repr, unmatched))} matches no speed option" if words else "names no option"
        raise UserError(f"--options: {what} (this config's speed options: {keys})")
    return [c for c in options if any(w in c.name for w in words)]


def prepare(cfg: Config, device) -> list[str]:
    """The overrides every timing run adds: the demo's dataset and teacher made first where the config uses them
    (as train makes them), and that teacher pinned (a timing run skips evaluation, which for data of one's own
    would name another teacher, see dali_kd.config.own_data)."""
    from dali_kd.commands.demo import demo_parts, prepare_demo

    if any(parts := demo_parts(cfg)):
        prepare_demo(cfg, device, sys.stdout.isatty(), *parts)
    if cfg.model.teachers is not None:
        return []  # a list of teachers is read as written, whatever the data (dali_kd.config.own_data)
    return [f"model.teacher.checkpoint={json.dumps(cfg.model.primary_teacher.checkpoint)}"]


def config_files(args: argparse.Namespace) -> dict[str, Any]:
    """load_config's file arguments as the command line gives them."""
    return {
        "data_config": args.data_config,
        "train_config": args.train_config,
        "model_config": args.model_config,
        "presets": [find_preset(p) for p in args.preset],
    }


def run(argv: list[str] | None, stop: StopSignal) -> dict[str, Any]:
    """The tuning as the command line says; stop: the signal handlers main() installed."""
    from dali_kd.runtime import resolve_device

    args = parse_args(argv)
    loader = config_files(args)
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    cfg = load_config(**loader, overrides=overrides)
    device = resolve_device(cfg.train.device)
    options = speed_options(cfg, device.type == "cuda")
    if args.options is not None:
        options = chosen_options(options, args.options)
    with stop.interrupting():  # the demo's first-use preparation: minutes, nothing worth keeping half-made
        pinned = prepare(cfg, device)
    candidates = [Candidate("defaults", []), *options, *(Candidate(e, [e]) for e in args.extra)]
    print(f"tuning {cfg.model.primary_teacher.name} → {cfg.model.student.name}, batch {cfg.train.batch_size} on {device}: "
          f"{len(candidates)} candidates × {args.repeats} rounds{' (and the defaults again)' if args.repeats == 1 else ''} "
          f"× ({args.warmup} + {args.steps} steps)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dali_kd_tune_") as tmp:
        timing = Timing(device, args.steps, args.warmup, args.repeats)
        tune(loader, overrides + pinned, candidates, timing, Path(tmp), stop)
        if candidates[0].ms_per_step is None:
            raise UserError(f"the defaults could not be timed: {candidates[0].note}")
        noise = noise_pct(candidates)
        best = fastest_overrides(candidates, noise)
        combined = None
        if len(best) > 1:
            both = Candidate("all fastest together", best)
            tune(loader, overrides + pinned, [both], replace(timing, repeats=1), Path(tmp), stop)
            combined = both
    lines = verdict_lines(candidates, noise)
    result = {
        "device": str(device), "batch_size": cfg.train.batch_size, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "noise_pct": noise, "candidates": [asdict(c) for c in candidates],
        "verdicts": lines, "fastest_overrides": best, "combined": asdict(combined) if combined else None,
    }  # fmt: skip
    print(
        table(
            candidates + ([combined] if combined else []), cfg.train.batch_size * cfg.train.grad_accum_steps
        )
    )
    print(f"noise: {noise:.1f}% (the largest spread between repeats of one setting): smaller differences, or "
          "overlapping repeats, cannot be told apart")  # fmt: skip
    print("\n".join(lines))
    if args.json:
        write_json_atomic(args.json, result)
    if best:
        print(f"fastest: {' '.join(best)}")
    else:
        print(
            f"fastest: no option told apart from the defaults as faster (noise {noise:.1f}%): keep the defaults"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    """The command; its exit code. A stop signal is passed on when it returns, as train's main() does."""
    from dali_kd.runs.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, RUN_SIGNALS, Preempted, StopSignal

    with StopSignal(RUN_SIGNALS) as stop:
        try:
            stop.check()  # a signal the command's own handler recorded while it imported
            run(argv, stop)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Preempted as e:
            how = "interrupted" if e.interrupted else "preempted"
            print(f"{how}: {e.signal_name} received: tuning stopped, nothing decided", file=sys.stderr)
            return EXIT_INTERRUPTED if e.interrupted else EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
