"""Per-teacher standardisation of the targets: a running mean and variance per feature of a teacher's pooled and
token outputs, applied before the loss, so that teachers whose features differ in scale weigh alike (RADIOv2.5
finds that otherwise the largest one dominates)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dali_kd import distributed
from dali_kd.data.outputs import ModelOutput

# The running statistics move this far toward each batch's: about the last 100 batches count.
MOMENTUM = 0.99
EPS = 1e-6


class TeacherStandardiser:
    """Standardises the targets of the teachers marked in `standardise` (model.teachers[i].standardise), in teacher
    order; the others pass through. Each call updates the statistics with the batch (averaged over the ranks of a
    distributed run, on the device: no host read) before applying them; the first batch sets them."""

    def __init__(
        self,
        keys: Sequence[str],
        standardise: Sequence[bool],
        device: torch.device,
        world_size: int = 1,
    ):
        assert len(keys) == len(standardise)
        self.keys = list(keys)
        self.device = device
        self.standardise = list(standardise)
        self.world_size = world_size
        # "<key>.pooled.mean", "<key>.pooled.var", "<key>.tokens.mean", ...: [D] each, made by the first batch.
        self.stats: dict[str, torch.Tensor] = {}

    def __call__(self, targets: Sequence[ModelOutput]) -> list[ModelOutput]:
        out = []
        for key, on, target in zip(self.keys, self.standardise, targets, strict=True):
            if not on:
                out.append(target)
                continue
            pooled = self._standardised(f"{key}.pooled", target.pooled)
            tokens = self._standardised(f"{key}.tokens", target.patch_tokens)
            out.append(ModelOutput(pooled, target.logits, tokens))
        return out

    def _standardised(self, name: str, values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        rows = values.detach().float().flatten(0, -2)  # every vector of the batch (a token is one): [N, D]
        moments = torch.stack([rows.mean(0), rows.square().mean(0)])
        if self.world_size > 1:
            moments = distributed.all_reduce(moments) / self.world_size
        mean, var = moments[0], (moments[1] - moments[0].square()).clamp_min(0)
        if f"{name}.mean" in self.stats:
            mean = torch.lerp(mean, self.stats[f"{name}.mean"], MOMENTUM)
            var = torch.lerp(var, self.stats[f"{name}.var"], MOMENTUM)
        self.stats[f"{name}.mean"], self.stats[f"{name}.var"] = mean, var
        return ((values.float() - mean) * torch.rsqrt(var + EPS)).to(values.dtype)

    def unstandardise(self, outputs: Sequence[ModelOutput]) -> list[ModelOutput]:
        """The inverse, the statistics left as they are: outputs in the standardised scale (what the student's
        adaptors learnt) back in each teacher's own; a teacher without statistics passes through."""
        out = []
        for key, output in zip(self.keys, outputs, strict=True):
            pooled = self._unstandardised(f"{key}.pooled", output.pooled)
            tokens = self._unstandardised(f"{key}.tokens", output.patch_tokens)
            out.append(ModelOutput(pooled, output.logits, tokens))
        return out

    def _unstandardised(self, name: str, values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None or f"{name}.mean" not in self.stats:
            return values
        mean, var = self.stats[f"{name}.mean"], self.stats[f"{name}.var"]
        return (values.float() * torch.sqrt(var + EPS) + mean).to(values.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {name: value.clone() for name, value in self.stats.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {name: value.to(self.device, copy=True) for name, value in state.items()}
