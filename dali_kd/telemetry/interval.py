"""Loss sums over a log interval, kept on the device; `means()` is the loop's one host read per interval."""

from __future__ import annotations

import torch

from dali_kd import distributed


class IntervalLosses:
    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0  # steps whose losses count (a skipped step's do not)
        self.images = 0  # images of every step, counted or not

    def add(self, losses: dict[str, torch.Tensor], images: int, counted: bool = True) -> None:
        if counted:
            for name, value in losses.items():
                self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        """Each loss averaged over the interval's counted steps and all ranks (a collective)."""
        names = sorted(self.sums)
        if not names:  # every step of the interval was skipped
            return {"loss": float("nan")}
        stacked = distributed.all_reduce(torch.stack([self.sums[n].float() for n in names]))
        values = (stacked / (max(1, self.steps) * self.world_size)).tolist()
        return dict(zip(names, values, strict=True))
