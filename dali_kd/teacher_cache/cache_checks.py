"""What a cached run checks of its targets: its counters, and the fidelity probe that compares each teacher's cached
targets with that teacher run live on the same replayed views."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dali_kd import console
from dali_kd.data.outputs import ModelOutput

# A replayed view's cached target and a live teacher on it agree to this cosine, fp16 storage included.
FIDELITY_FLOOR = 0.999
# Far below the floor: the cache's targets are not the teacher's (another teacher's, or damaged), so replay stops.
FIDELITY_STOP = 0.9


@dataclass
class CacheCounters:
    hits: int = 0
    probe_batches: int = 0
    fidelity_min: float | None = None
    read_s: float = 0.0
    read_bytes: int = 0
    write_s: float = 0.0
    write_bytes: int = 0
    refilled: int = (
        0  # replayed rows whose stored outputs failed their checksum, computed again by the teacher
    )
    stopped_at_step: int | None = (
        None  # the step whose probe stopped replay from the cache (None: it goes on)
    )

    # Checkpoint keys as the run's progress dict has always named them.
    KEYS = {
        "hits": "cache_hits",
        "probe_batches": "teacher_probe_batches",
        "fidelity_min": "cache_fidelity_min",
        "read_s": "cache_read_s",
        "read_bytes": "cache_read_bytes",
        "write_s": "cache_write_s",
        "write_bytes": "cache_write_bytes",
        "refilled": "cache_rows_refilled",
        "stopped_at_step": "cache_stopped_at_step",
    }

    def state_dict(self) -> dict[str, Any]:
        return {self.KEYS[name]: value for name, value in asdict(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, key in self.KEYS.items():
            if key in state:
                setattr(self, name, state[key])


def _compared(out: ModelOutput) -> torch.Tensor | None:
    """What the probe compares: the pooled embedding, else the logits (the config makes a cache store one)."""
    return out.pooled if out.pooled is not None else out.logits


class FidelityProbes:
    """The probes' cosines, kept on the device until a log row reads them (no host wait inside a step).

    keys: each teacher's name in messages ("" for the only teacher: messages as they have always been)."""

    def __init__(self, cache_dir: str, mode: str, keys: list[str], report: bool):
        self.cache_dir, self.mode, self.keys, self.report = cache_dir, mode, keys, report
        self._cosines: list[float] = []  # read since the last metrics row
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # (step, teacher, cosine on the device)

    def add(self, step: int, live: list[ModelOutput], cached: list[ModelOutput]) -> None:
        """Compare each teacher's live outputs with its cached ones on the same views."""
        for teacher, (a, b) in enumerate(zip(map(_compared, live), map(_compared, cached), strict=True)):
            assert a is not None and b is not None  # the config makes a cache store pooled or logits
            cosine = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min()
            self._pending.append((step, teacher, cosine))

    def take_worst(self) -> float | None:
        """The lowest cosine read since the last call (None: no probe), for the next metrics row."""
        worst, self._cosines = min(self._cosines, default=None), []
        return worst

    def read(self, counters: CacheCounters) -> None:
        """The probes' cosines on the host: counted, and a warning for each one below the floor; one far below it
        (replay mode) stops replay from the cache."""
        pending, self._pending = self._pending, []
        for step, teacher, on_device in pending:
            cosine = float(on_device)
            self._cosines.append(cosine)
            worst = counters.fidelity_min
            counters.fidelity_min = cosine if worst is None else min(worst, cosine)
            whose = f" (teacher {self.keys[teacher]})" if self.keys[teacher] else ""
            if self.mode == "replay" and cosine < FIDELITY_STOP and counters.stopped_at_step is None:
                counters.stopped_at_step = step
                if self.report:
                    console.warning(
                        f"teacher cache {self.cache_dir}: fidelity {cosine:.4f}{whose} at step {step}, far below "
                        f"{FIDELITY_FLOOR}: its targets are not what the teacher gives on these views, so the teacher "
                        "runs on every batch from here on (train.cache_rebuild=true rebuilds the cache)"
                    )
            elif cosine < FIDELITY_FLOOR and self.report:
                message = (
                    f"WARNING: teacher cache fidelity {cosine:.4f}{whose} < {FIDELITY_FLOOR} at step {step}: the "
                    "cached targets do not match what the teacher gives on these views"
                    + (" (expected with train.cache_mode=fixed)" if self.mode == "fixed" else "")
                )
                console.warning(message)
