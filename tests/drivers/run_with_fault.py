"""Runs `python -m dali_kd.train` in this process with one fault injected at a chosen point (through the
trainer's public callbacks), for the resume, preemption and NaN tests. The fault is a real one: SIGKILL (no
cleanup at all), SIGUSR1, or a NaN input.

    python tests/drivers/run_with_fault.py FAULT STEP [RANK] -- <dali_kd.train arguments>

STEP: the step before which the fault strikes (at its first batch), or STEP:BATCH, before that batch of the step
(0-based; a step has train.grad_accum_steps batches).

FAULT: kill-before-step | kill-all-before-step | kill-launcher-before-step | kill-launcher-at-start |
kill-during-checkpoint | kill-during-eval | usr1-at-step | nan-at-step | record
(record only writes, per rank, the sample ids each batch trained on, the final weights, and under DDP the count of
gradient all-reduces (bucket by bucket) done before each batch and at the end) | pause-at-step, pause-at-eval
(before the evaluation after STEP), pause-at-finish (before the final weights are written; STEP is ignored) (each
prints "paused" and waits for a line on stdin: a run that is still going while a test starts another or signals
it), or a stop signal during
start-up, before any step: SIGNAL-during-scan | SIGNAL-during-models | SIGNAL-during-stream (SIGNAL: usr1 | term;
STEP is then ignored).

kill-all-before-step: SIGKILL of the whole torchrun job at once (the agent, every rank), as `kill -9` of all its
processes would do, sent by RANK (default 0). kill-launcher-before-step: SIGKILL of the torchrun agent alone (RANK,
default 0, sends it), as `kill -9 PID`, `timeout -s KILL` or `kill -9 -PGID` of the agent's process group do: torchrun
starts each rank in a session of its own, so none of these reaches the ranks. kill-launcher-at-start: the same as
this program starts, before the command (the ranks are still starting up; STEP is ignored).
kill-during-checkpoint: with no RANK, or on the rank that writes the file (0), the step-STEP checkpoint's temporary
file is cut to half its size, then that rank is SIGKILLed; on another rank, it SIGKILLs itself once rank 0's
temporary (or finished) file for that step exists: one rank dies while the other is writing.
"""

from __future__ import annotations  # noqa: I001 - dali_kd first, as below

# First, as under `python -m dali_kd.train`: dali_kd notes the launcher that started this process before torch loads.
import dali_kd  # noqa: F401

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import dali_kd.runs.checkpoint as ckpt
from dali_kd.commands import train
from dali_kd.training.callbacks import Callback


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def count_allreduces(ddp) -> list[int]:
    """A one-item list that counts the DDP wrapper's gradient all-reduces (one per bucket), through its public
    comm-hook interface, doing the all-reduce as DDP would."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter = [0]

    def counting(state, bucket):
        counter[0] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting)
    return counter


def pause() -> None:
    print("paused", flush=True)
    sys.stdin.readline()


def kill_job() -> None:
    """SIGKILL the torchrun agent (this process's parent), every other rank it started, then this process."""
    agent = os.getppid()
    children = [
        c for task in Path(f"/proc/{agent}/task").iterdir() for c in (task / "children").read_text().split()
    ]
    os.kill(agent, signal.SIGKILL)
    for pid in map(int, children):
        if pid != os.getpid():
            os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_while_rank0_writes(checkpoints: Path, step: int, timeout_s: float = 300.0) -> None:
    """SIGKILL this process once rank 0 has begun writing the step's checkpoint (its temporary file, or the file
    itself if the write was quicker than this look): a wait for a file, never a guessed delay."""
    name = f"step_{step:09d}.pt"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if checkpoints.is_dir() and any(
            p.name.startswith((f".{name}.", name)) for p in checkpoints.iterdir()
        ):
            break
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    split = sys.argv.index("--")
    fault = sys.argv[1]
    step_text, _, batch_text = sys.argv[2].partition(":")
    step, micro_batch = int(step_text), int(batch_text or 0)
    only_rank = int(sys.argv[3]) if split > 3 else None
    argv = sys.argv[split + 1 :]
    here = only_rank is None or only_rank == rank()
    if fault in ("kill-all-before-step", "kill-launcher-before-step", "kill-launcher-at-start"):
        here = rank() == (only_rank or 0)
    if fault == "kill-launcher-at-start" and here:
        os.kill(os.getppid(), signal.SIGKILL)
    record_dir = Path(os.environ.get("FAULT_RECORD_DIR", "."))

    class Fault(Callback):
        def __init__(self):
            self.seen: list[list[int]] = []
            self.allreduces: list[int] = []  # all-reduces done so far, before each batch
            self._counter: list[int] | None = None

        def on_step(self, trainer, batch):
            self.seen.append(batch.sample_ids.tolist())
            if fault == "record" and trainer.parts.task.ddp is not None:
                if self._counter is None:
                    self._counter = count_allreduces(trainer.parts.task.ddp)
                self.allreduces.append(self._counter[0])
            if here and trainer.step + 1 == step and trainer.micro_batch == micro_batch:
                if fault == "kill-before-step":
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault == "kill-all-before-step":
                    kill_job()
                if fault == "kill-launcher-before-step":
                    os.kill(os.getppid(), signal.SIGKILL)
                if fault == "usr1-at-step":
                    os.kill(os.getpid(), signal.SIGUSR1)
                if fault == "nan-at-step":
                    batch.images = batch.images * float("nan")
                if fault == "pause-at-step":
                    pause()

        def on_evaluate(self, trainer):
            if fault == "kill-during-eval" and trainer.step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "pause-at-eval" and trainer.step == step:
                pause()

        def on_finish(self, trainer, summary):
            if fault == "pause-at-finish":
                pause()
            if fault == "record":
                record_dir.mkdir(parents=True, exist_ok=True)
                (record_dir / f"ids_rank{rank()}.json").write_text(json.dumps(self.seen))
                if self._counter is not None:
                    counts = [*self.allreduces, self._counter[0]]
                    (record_dir / f"allreduces_rank{rank()}.json").write_text(json.dumps(counts))
                torch.save(trainer.parts.student.state_dict(), record_dir / f"student_rank{rank()}.pt")

    if "-during-" in fault and fault.split("-during-")[0] in ("usr1", "term"):
        # A real signal at a start-up stage: the stage's function sends it to this process, then runs.
        import dali_kd.teacher_cache.live as live
        import dali_kd.training.build as build

        signum = signal.SIGUSR1 if fault.startswith("usr1") else signal.SIGTERM
        # Each stage where the run calls it: the stream is made by the live teacher targets.
        module, name = {
            "scan": (build, "prepare_data"),
            "models": (build, "build_distill_models"),
            "stream": (live, "make_train_stream"),
        }[fault.split("-during-")[1]]
        stage = getattr(module, name)

        def signalled(*args, **kwargs):
            os.kill(os.getpid(), signum)
            return stage(*args, **kwargs)

        setattr(module, name, signalled)

    if fault == "kill-during-checkpoint" and only_rank is not None and only_rank == rank() != 0:
        import dali_kd.training.checkpointer as checkpointer

        original_collect = checkpointer.Checkpointer.collect

        def collect_then_die(self, at_step):
            state = original_collect(self, at_step)
            if at_step == step:
                kill_while_rank0_writes(self.files.path, step)
            return state

        checkpointer.Checkpointer.collect = collect_then_die  # type: ignore[method-assign]

    if fault == "kill-during-checkpoint" and here and rank() == 0:
        original_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == step:
                original_save(obj, f, *args, **kwargs)
                # Truncate the temporary file to half, then die: a write cut short.
                size = os.path.getsize(f)
                with open(f, "r+b") as handle:
                    handle.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *args, **kwargs)

        ckpt.torch.save = half_save

    # As the dali-kd-train script: the program's own stop-signal handler, then the command (exit 75 when stopped).
    return train.program(argv, callbacks=[Fault()])


if __name__ == "__main__":
    sys.exit(main())
