"""When to checkpoint and what goes in (torchtitan's CheckpointManager shape); the files themselves: checkpoint.py.

The loop hands over its stateful parts once and asks `maybe_save(step, epoch_end=..., preempted=...)` after every
step; the Checkpointer decides (every `train.save_every_n_steps`, each epoch end, a preemption), gathers every
rank's data-stream position and RNG state, and rank 0 writes the file. Every rank calls it: it is a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dali_kd import distributed
from dali_kd.config import Config
from dali_kd.distributed import DistInfo
from dali_kd.errors import UserError
from dali_kd.identity import config_fingerprint, config_hash
from dali_kd.runs import checkpoint as ckpt


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# The parts a checkpoint holds at its top level; "progress" merges the counters of the others.
MODEL_PARTS = ("student", "optimizer", "scheduler")


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        dist: DistInfo,
        steps_per_epoch: int,
        teacher_id: dict[str, str],
        models: dict[str, Stateful],
        progress: list[Stateful],
        stream_state: Callable[[], dict[str, Any]],
        before_save: Callable[[], None] = lambda: None,
        after_save: Callable[[Path | None], None] = lambda path: None,
        resumed_from: Path | None = None,
        data_files: dict[str, Any] | None = None,
    ):
        """models: the student, optimizer and scheduler; progress: parts whose counters make up the "progress"
        dict (run state, teacher targets, NaN guard); stream_state: this rank's data-stream position;
        before_save: runs first on every rank (a last check, gathering what must be saved with the state);
        after_save: runs last on every rank, with the path written; data_files: the training files'
        `identity.data_identity`, so that a resume on a changed file list is refused."""
        self.files = ckpt.CheckpointDir(run_dir, cfg.train.keep_last_checkpoints)
        self.cfg = cfg
        self.dist = dist
        self.save_every = cfg.train.save_every_n_steps
        self.steps_per_epoch = steps_per_epoch
        self.teacher_id = teacher_id
        self.models = models
        self.progress = progress
        self.stream_state = stream_state
        self.before_save = before_save
        self.after_save = after_save
        self.last: Path | None = resumed_from  # the newest complete checkpoint of this run
        self.data_files = data_files

    def due(self, step: int, epoch_end: bool = False, preempted: bool = False) -> bool:
        if preempted or epoch_end:
            return True
        # A periodic save that falls on an epoch's last step waits for the epoch end (after its evaluation).
        every = self.save_every
        periodic = bool(every and step % every == 0)
        return periodic and step % self.steps_per_epoch != 0

    def maybe_save(self, step: int, epoch_end: bool = False, preempted: bool = False) -> bool:
        """Save if due (then `last` is the new checkpoint); whether it saved."""
        if not self.due(step, epoch_end, preempted):
            return False
        self.save(step)
        return True

    def save(self, step: int) -> Path | None:
        self.before_save()
        state = self.collect(step)
        path = self.files.save(state, step) if state is not None else None
        distributed.barrier()  # nobody moves on (or exits) before the file is complete
        self.last = path or self.files.latest()
        self.after_save(self.last)
        return self.last

    def collect(self, step: int) -> dict[str, Any] | None:
        """The run's full state at a step boundary (a collective: every rank calls it; rank 0 gets the dict)."""
        streams = distributed.gather_objects(self.stream_state())
        rngs = distributed.gather_objects(ckpt.rng_state())
        if not self.dist.is_main:
            return None
        progress: dict[str, Any] = {}
        for part in self.progress:
            progress.update(part.state_dict())
        return {
            "format": ckpt.FORMAT_VERSION,
            "step": progress.pop("step"),
            "epoch": progress.pop("epoch"),
            "step_in_epoch": progress.pop("step_in_epoch"),
            **{name: part.state_dict() for name, part in self.models.items()},
            "stream": streams,
            "rng": rngs,
            "progress": progress,
            "world_size": self.dist.world_size,
            "config_hash": config_hash(self.cfg),
            "config_fingerprint": config_fingerprint(self.cfg),
            "teacher": self.teacher_id,
            "data_files": self.data_files,
        }


def _shorten(line: str) -> str:
    """`Missing key(s) in state_dict: "a", "b", ... (dozens)` → the first three keys and how many more."""
    head, sep, keys = line.partition(" in state_dict: ")
    names = [k.strip(' ".') for k in keys.split(",") if k.strip(' ".')] if sep else []
    if len(names) > 3:
        return f"{head}: {', '.join(names[:3])} and {len(names) - 3} more"
    return line[:300]


def restore(
    state: dict[str, Any], models: dict[str, Stateful], progress: list[Stateful], rank: int
) -> dict[str, Any]:
    """Load a checkpoint's state into the parts (and this rank's RNGs); returns this rank's data-stream state."""
    for name, part in models.items():
        try:
            part.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as e:
            # load_state_dict lists every mismatch (dozens of lines); the first one says enough.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # lines[0] is a header: "Error(s) in loading state_dict for ..."
            details = lines[1:] or lines or [type(e).__name__]
            first = next((line for line in details if "size mismatch" in line), details[0])
            raise UserError(
                f"--resume: the checkpoint's {name} does not fit this model ({_shorten(first)})"
            ) from None
    counters = {**state["progress"], **{k: state[k] for k in ("step", "epoch", "step_in_epoch")}}
    for part in progress:
        part.load_state_dict(counters)
    ckpt.set_rng_state(state["rng"][rank])
    return state["stream"][rank]
