"""When to checkpoint and what goes in (torchtitan's CheckpointManager shape); the files themselves: checkpoint.py.

The loop hands over its stateful parts once, as objects with `state_dict`/`load_state_dict`, and asks `due(step,
epoch_end=..., preempted=...)` after every step (every `train.save_every_n_steps`, each epoch end, a preemption);
`save` gathers every rank's data-stream position and RNG state, and rank 0 writes the file. Every rank calls it: it
is a collective. `restore` loads a checkpoint back into the same parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from dali_kd import distributed
from dali_kd.config import Config
from dali_kd.distributed import DistInfo
from dali_kd.errors import UserError
from dali_kd.identity import config_fingerprint, config_hash
from dali_kd.runs import checkpoint as ckpt


class SavesState(Protocol):
    def state_dict(self) -> dict[str, Any]: ...


class Stateful(SavesState, Protocol):
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# The part whose counters make up a checkpoint's "progress" dict; its step, epoch and step_in_epoch sit at the top.
PROGRESS = "progress"
COUNTERS = ("step", "epoch", "step_in_epoch")


class RunProgress:
    """Several parts' counters as one Stateful (the run state, the quarantine, the teacher targets, the NaN guard):
    their state dicts merged, and each part takes back the keys it knows."""

    def __init__(self, *parts: Stateful):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(part.state_dict())
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part in self.parts:
            part.load_state_dict(state)


class Checkpointer:
    """Saves `states` (each under its name; `PROGRESS` as the progress dict), every rank's `stream` position and
    RNG state, and `identity` (what a resume is checked against: {"teacher": ..., "data_files": ...}). The stream
    only gives its state: a resume builds it at the saved position."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        *,
        dist: DistInfo,
        steps_per_epoch: int,
        states: dict[str, Stateful],
        stream: SavesState,
        identity: dict[str, Any],
        resumed_from: Path | None = None,
    ):
        self.files = ckpt.CheckpointDir(run_dir, cfg.train.keep_last_checkpoints)
        self.cfg = cfg
        self.dist = dist
        self.save_every = cfg.train.save_every_n_steps
        self.steps_per_epoch = steps_per_epoch
        self.states = states
        self.stream = stream
        self.identity = identity
        self.last: Path | None = resumed_from  # the newest complete checkpoint of this run

    def due(self, step: int, epoch_end: bool = False, preempted: bool = False) -> bool:
        if preempted or epoch_end:
            return True
        # A periodic save that falls on an epoch's last step waits for the epoch end (after its evaluation).
        every = self.save_every
        periodic = bool(every and step % every == 0)
        return periodic and step % self.steps_per_epoch != 0

    def save(self, step: int) -> Path | None:
        """Write the state at this step (every rank calls it); the newest checkpoint, now `last`."""
        state = self.collect(step)
        path = self.files.save(state, step) if state is not None else None
        distributed.barrier()  # nobody moves on (or exits) before the file is complete
        self.last = path or self.files.latest()
        return self.last

    def collect(self, step: int) -> dict[str, Any] | None:
        """The run's full state at a step boundary (a collective: every rank calls it; rank 0 gets the dict)."""
        streams = distributed.gather_objects(self.stream.state_dict())
        rngs = distributed.gather_objects(ckpt.rng_state())
        if not self.dist.is_main:
            return None
        saved = {name: part.state_dict() for name, part in self.states.items()}
        progress = saved.pop(PROGRESS, {})
        return {
            "format": ckpt.FORMAT_VERSION,
            **{key: progress.pop(key) for key in COUNTERS},
            **saved,
            "stream": streams,
            "rng": rngs,
            "progress": progress,
            "world_size": self.dist.world_size,
            "config_hash": config_hash(self.cfg),
            "config_fingerprint": config_fingerprint(self.cfg),
            "teacher": self.identity["teacher"],
            "data_files": self.identity["data_files"],
        }


def _shorten(line: str) -> str:
    """`Missing key(s) in state_dict: "a", "b", ... (dozens)` → the first three keys and how many more."""
    head, sep, keys = line.partition(" in state_dict: ")
    names = [k.strip(' ".') for k in keys.split(",") if k.strip(' ".')] if sep else []
    if len(names) > 3:
        return f"{head}: {', '.join(names[:3])} and {len(names) - 3} more"
    return line[:300]


def restore(state: dict[str, Any], states: dict[str, Stateful], rank: int) -> dict[str, Any]:
    """Load a checkpoint's state into the parts (and this rank's RNGs); returns this rank's data-stream state."""
    for name, part in states.items():
        if name == PROGRESS:
            part.load_state_dict({**state["progress"], **{k: state[k] for k in COUNTERS}})
            continue
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
    ckpt.set_rng_state(state["rng"][rank])
    return state["stream"][rank]
