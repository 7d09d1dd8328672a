"""Kill a two-rank (gloo, CPU) run at random moments and resume it with `--resume auto`, beside busy loops: every
resumed run must finish (exit 0) and match an uninterrupted run bit for bit (the student's weights on each rank and
in student.safetensors, the metrics' losses, and the images each rank trained on after its checkpoint).

    python tests/drivers/stress_kill_resume.py --tries 20 --busy 2 [--seed 0] [--modes M,M] [--work DIR]

The kill moments are drawn from --seed (each try's line says what it drew, so a failure can be replayed). Modes:
  all-at-step        SIGKILL of every process of the job (the torchrun agent and both ranks) before a step's batch
  all-timed          the same after a random delay: start-up, evaluation and the final writes too
  launcher-at-step   SIGKILL of the torchrun agent alone before a step's batch (`kill -9 PID`, `timeout -s KILL`)
  launcher-at-start  SIGKILL of the agent alone while its ranks start up (before they reach the rendezvous)
  launcher-timed     SIGKILL of the agent's process group after a random delay (`kill -9 -PGID`; torchrun starts
                     each rank in a session of its own, so the signal reaches the agent only)
  writer-mid-ckpt    SIGKILL of rank 0 alone, its checkpoint's temporary file cut to half
  waiter-mid-ckpt    SIGKILL of rank 1 alone while rank 0 writes a checkpoint
Both runs of a try use the same --master_port, as a user repeating the command would. The first failure's logs (the
killed run's and the resumed run's torchrun output, every rank's lines in it) are printed; all are kept in --work.
Exit 0 when every try passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DRIVER = ROOT / "tests" / "drivers" / "run_with_fault.py"
MODES = (
    "all-at-step", "all-timed", "launcher-at-step", "launcher-at-start", "launcher-timed", "writer-mid-ckpt",
    "waiter-mid-ckpt",
)  # fmt: skip
TIMED = ("all-timed", "launcher-timed")
TOTAL_STEPS = 8  # 2 epochs × 4 steps
CHECKPOINT_STEPS = (2, 4, 6, 8)  # every 2 steps, each epoch end among them


@dataclass(frozen=True)
class Try:
    index: int
    mode: str
    step: int = 0  # the step the fault strikes at (step modes)
    micro: int = 0
    delay_s: float = 0.0  # timed modes

    def describe(self) -> str:
        return (
            f"{self.mode} after {self.delay_s:.2f} s"
            if self.mode in TIMED
            else f"{self.mode} step {self.step}"
            if self.step
            else self.mode
        )


@dataclass
class Outcome:
    attempt: Try
    killed_rc: int
    resumed_rc: int | None
    resumed_from: str | None
    problem: str | None  # None: the try passed
    folder: Path
    wall_s: float

    def line(self, tries: int) -> str:
        where = Path(self.resumed_from).name if self.resumed_from else "a fresh start"
        verdict = "ok" if self.problem is None else f"FAILED: {self.problem}"
        return (
            f"try {self.attempt.index + 1}/{tries}: {self.attempt.describe()}: killed run exit {self.killed_rc}, "
            f"resumed from {where} exit {self.resumed_rc}: {verdict} ({self.wall_s:.0f} s)"
        )


def draw_try(rng: random.Random, index: int, modes: Sequence[str], reference_s: float) -> Try:
    mode = rng.choice(list(modes))
    if mode in ("all-at-step", "launcher-at-step"):
        return Try(index, mode, step=rng.randint(1, TOTAL_STEPS))
    if mode in ("writer-mid-ckpt", "waiter-mid-ckpt"):
        return Try(index, mode, step=rng.choice(CHECKPOINT_STEPS))
    if mode == "launcher-at-start":
        return Try(index, mode)
    return Try(index, mode, delay_s=rng.uniform(0.0, 1.1 * reference_s))


def fault_arguments(attempt: Try) -> list[str]:
    """run_with_fault.py's FAULT STEP [RANK] for a try (a timed try runs `record`: the harness kills it)."""
    if attempt.mode in ("all-at-step", "launcher-at-step"):
        return [f"kill-{attempt.mode.split('-')[0]}-before-step", f"{attempt.step}:{attempt.micro}", "0"]
    if attempt.mode == "launcher-at-start":
        return ["kill-launcher-at-start", "0", "0"]
    if attempt.mode == "writer-mid-ckpt":
        return ["kill-during-checkpoint", str(attempt.step), "0"]
    if attempt.mode == "waiter-mid-ckpt":
        return ["kill-during-checkpoint", str(attempt.step), "1"]
    return ["record", "0"]


def run_args(images: Path, out: Path) -> list[str]:
    from tests.test_distributed import args_for

    # Stochastic depth draws from torch's RNG every step: each rank's restored RNG decides the resumed weights.
    return [*args_for(images, out), "model.student.drop_path_rate=0.2"]


def descendants(pid: int) -> list[int]:
    """pid's processes, children before their own children (torchrun starts each rank in a session of its own)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                children = [int(c) for c in (task / "children").read_text().split()]
                found.extend(children)
                queue.extend(children)
    return found


def kill_job(pid: int) -> None:
    """SIGKILL a torchrun agent and everything it started, the agent first (so it starts and stops nothing more)."""
    family = descendants(pid)
    for member in [pid, *family]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def ranks_of(folder: Path) -> list[int]:
    """The processes still running a rank of a run writing into folder (found by their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                entry.name.isdigit()
                and str(DRIVER).encode() in command
                and f"train.output_dir={folder}".encode() in command
            ):
                pids.append(int(entry.name))
    return pids


def what_remains(folder: Path, port: int) -> str:
    """The killed run's processes still there, and the sockets on its port, as the resumed run starts (for the
    logs of a failure)."""
    lines = []
    for pid in ranks_of(folder):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            said = [
                line.replace("\t", " ")
                for line in status
                if line.startswith(("State", "PPid", "ShdPnd", "Threads"))
            ]
            lines.append(
                f"rank process {pid}: {', '.join(said)}, in {Path(f'/proc/{pid}/wchan').read_text()}"
            )
    with contextlib.suppress(OSError):
        sockets = subprocess.run(
            ["ss", "-tanp"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()
        lines += [line for line in sockets if f":{port} " in line]
    return "\n".join(lines) + "\n"


def torchrun(
    fault: list[str], args: list[str], record: Path, port: int, log: Path, kill_after_s: float | None = None,
    kill_all: bool = True,
) -> int:  # fmt: skip
    """One two-rank run through the fault driver; its output in log.out/log.err; its exit code. kill_after_s: SIGKILL
    then, of every process of the job (kill_all) or of the agent's process group."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(DRIVER), *fault, "--", *args,
    ]  # fmt: skip
    env = {
        **os.environ, "FAULT_RECORD_DIR": str(record), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }  # fmt: skip
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            proc.wait(timeout=kill_after_s if kill_after_s is not None else 900)
        except subprocess.TimeoutExpired:
            if kill_all:
                kill_job(proc.pid)
            else:
                os.killpg(
                    proc.pid, signal.SIGKILL
                )  # started in a session of its own: its group is the agent's
            proc.wait()
        finally:
            if proc.poll() is None:  # an error of the harness itself: leave nothing running
                kill_job(proc.pid)
                proc.wait()
    return proc.returncode


def resumed_step(summary: dict) -> tuple[str | None, int]:
    path = summary.get("resumed_from")
    return path, int(Path(path).stem.split("_")[1]) if path else 0


def compare(reference: Path, folder: Path) -> str | None:
    """What differs between the uninterrupted run and the resumed one; None when nothing does."""
    import torch
    from safetensors.torch import load_file

    run, ref_run = folder / "run", reference / "run"
    summary = json.loads((run / "summary.json").read_text())
    _, start = resumed_step(summary)
    for rank in (0, 1):
        before = json.loads((reference / "record" / f"ids_rank{rank}.json").read_text())
        after = json.loads((folder / "record" / f"ids_rank{rank}.json").read_text())
        if after != before[start:]:
            return f"rank {rank} resumed at step {start} on other images"
        weights = [
            torch.load(d / "record" / f"student_rank{rank}.pt", weights_only=True)
            for d in (reference, folder)
        ]
        if weights[0].keys() != weights[1].keys() or not all(
            torch.equal(weights[0][k], weights[1][k]) for k in weights[0]
        ):
            return f"rank {rank}'s student weights differ from the uninterrupted run's"
    final = [load_file(d / "student.safetensors") for d in (ref_run, run)]
    if final[0].keys() != final[1].keys() or not all(torch.equal(final[0][k], final[1][k]) for k in final[0]):
        return "student.safetensors differs from the uninterrupted run's"
    losses = [
        [json.loads(r)["loss"] for r in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (ref_run, run)
    ]
    if losses[0] != losses[1]:
        return f"metrics.jsonl losses differ: {losses[1]} against {losses[0]}"
    return None


def went_on(attempt: Try, start: int) -> str | None:
    """Whether the killed run trained past its kill (its checkpoint is of a later step): its ranks outlived it."""
    last = attempt.step - 1 if attempt.mode.endswith("-at-step") else attempt.step
    if attempt.mode not in TIMED and start > last:
        return f"the killed run went on past its kill before step {attempt.step}: resumed at step {start}"
    return None


def run_try(attempt: Try, images: Path, work: Path, reference: Path, port: int) -> Outcome:
    started = time.monotonic()
    folder = work / f"try{attempt.index + 1:02d}"
    folder.mkdir(parents=True)
    args = run_args(images, folder)
    timed = attempt.delay_s if attempt.mode in TIMED else None
    killed_rc = torchrun(
        fault_arguments(attempt), args, folder / "record-killed", port, folder / "killed", timed,
        kill_all=attempt.mode.startswith("all-"),
    )  # fmt: skip
    outcome = Outcome(attempt, killed_rc, None, None, None, folder, 0.0)
    (folder / "before-resume.txt").write_text(what_remains(folder, port))
    if killed_rc == 0 and attempt.mode not in TIMED:
        outcome.problem = "the fault did not strike: the killed run finished"
    else:
        outcome.resumed_rc = torchrun(
            ["record", "0"], [*args, "--resume", "auto"], folder / "record", port, folder / "resumed"
        )
        if outcome.resumed_rc != 0:
            outcome.problem = "the resumed run did not finish"
        else:
            outcome.resumed_from, start = resumed_step(
                json.loads((folder / "run" / "summary.json").read_text())
            )
            outcome.problem = went_on(attempt, start) or compare(reference, folder)
    if leftovers := ranks_of(
        folder
    ):  # ranks of the killed run that outlived their launcher, or a hung resume
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        outcome.problem = outcome.problem or f"{len(leftovers)} rank(s) still running after the try"
    outcome.wall_s = time.monotonic() - started
    return outcome


def failure_logs(outcome: Outcome, tail: int = 6000) -> str:
    parts = []
    remains = outcome.folder / "before-resume.txt"
    if remains.is_file():
        parts.append(f"---- {remains} ----\n{remains.read_text()}")
    for name in ("killed", "resumed"):
        for suffix in (".out", ".err"):
            path = (outcome.folder / name).with_suffix(suffix)
            if path.is_file():
                parts.append(f"---- {path} (last {tail} characters) ----\n{path.read_text()[-tail:]}")
    return "\n".join(parts)


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """`count` processes that spin on a core each until the block ends: a machine loaded by other jobs."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def make_images(folder: Path) -> Path:
    from tests.conftest import write_tree

    write_tree(folder / "train", num_classes=4, per_class=12, seed=0)
    write_tree(folder / "val", num_classes=4, per_class=4, seed=1)
    return folder


def stress(
    work: Path, tries: int, busy: int = 0, seed: int = 0, modes: Sequence[str] = MODES, port: int = 29800,
    keep_going: bool = False, say=print, attempts: Sequence[Try] = (),
) -> list[Outcome]:  # fmt: skip
    """The reference run, then `tries` seeded kill-and-resume tries (or the given attempts), stopping at the first
    failure unless keep_going; each try's outcome."""
    rng = random.Random(seed)
    images = make_images(work / "images")
    reference = work / "reference"
    reference.mkdir()
    outcomes: list[Outcome] = []
    with busy_loops(busy):
        started = time.monotonic()
        rc = torchrun(
            ["record", "0"], run_args(images, reference), reference / "record", port, reference / "log"
        )
        reference_s = time.monotonic() - started
        if rc != 0:
            raise RuntimeError(f"the uninterrupted run failed (exit {rc}); see {reference / 'log.err'}")
        say(f"uninterrupted run: {reference_s:.0f} s, beside {busy} busy loop(s); seed {seed}")
        for index in range(len(attempts) or tries):
            attempt = attempts[index] if attempts else draw_try(rng, index, modes, reference_s)
            outcome = run_try(attempt, images, work, reference, port + 1 + index)
            outcomes.append(outcome)
            say(outcome.line(len(attempts) or tries))
            if outcome.problem is not None and not keep_going:
                break
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--busy", type=int, default=2, help="busy loops beside the runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--port", type=int, default=29800, help="the first --master_port (one per try)")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--keep-going", action="store_true", help="go on after a failure")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}")
    work = args.work or Path(tempfile.mkdtemp(prefix="stress_kill_resume_"))
    print(f"work folder: {work}", flush=True)
    outcomes = stress(work, args.tries, args.busy, args.seed, modes, args.port, args.keep_going,
                      say=lambda line: print(line, flush=True))  # fmt: skip
    failed = [o for o in outcomes if o.problem is not None]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} tries passed", flush=True)
    if failed:
        print(failure_logs(failed[0]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
