"""What a batch of the teacher-cache stream carries for the cache's targets, beside the batch every stream yields."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from dali_kd.data.outputs import ModelOutput


@dataclass
class CacheFields:
    """What a batch of the teacher-cache stream (dali_kd.teacher_cache.stream) carries for the cache's targets.

    slots:      int64 [B] numpy, the view slot of each row (rows are written and read at (stream id, slot)).
    store:      bool [B] numpy, the rows a live teacher's outputs are written to (a fill batch), else None.
    from_cache: the teacher's outputs for this batch come from the cache, not a live teacher.
    targets:    a replayed batch's cached outputs, one per teacher (config order), read ahead by the stream (on the
                trainer's device), and read_s how long that read took.
    damaged:    bool [teachers, B] numpy, each teacher's rows of `targets` that failed their checksum (that teacher
                computes them again).
    """

    slots: np.ndarray
    store: np.ndarray | None = None
    from_cache: bool = False
    targets: list[ModelOutput] | None = None
    read_s: float = 0.0
    damaged: np.ndarray | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CacheFields:
        """The fields with the cached outputs on `device`; the numpy fields stay on the host, as the contract says."""
        if self.targets is None:
            return replace(self)
        moved = []
        for out in self.targets:
            tensors = {f.name: getattr(out, f.name) for f in fields(out)}
            on = {
                k: None if t is None else t.to(device, non_blocking=non_blocking) for k, t in tensors.items()
            }
            moved.append(replace(out, **on))
        return replace(self, targets=moved)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The cached outputs by name (targets.<teacher>.<field>); the host fields are numpy and not listed."""
        found = {
            f"targets.{k}.{f.name}": getattr(out, f.name)
            for k, out in enumerate(self.targets or [])
            for f in fields(out)
        }
        return {name: t for name, t in found.items() if t is not None}
