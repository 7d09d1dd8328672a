"""A teacher-cache row as read back: its stored outputs on the way to the device, and its view record packed as stored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dali_kd.data.batch import MixRecord, ViewRecord
from dali_kd.data.outputs import ModelOutput

VIEW_FIELDS = 9  # anchor (2), shape (2), flip (1), jitter (4)
# With data.augment.mix, per row also the mix part of its view record (dali_kd.data.batch.MixRecord): the partner's
# sample id (int64, its own array) and its view, λ and the box (float32; box coordinates are whole pixels).
MIX_FIELDS = VIEW_FIELDS + 1 + 4


@dataclass
class CachedRows:
    """Teacher-cache rows read into host memory as stored (TeacherCache.read_rows), not yet on the device."""

    arrays: list[dict[str, torch.Tensor]]  # per teacher (config order), its stored outputs by name
    num_classes: list[int]  # per teacher, the classes a top-k row scatters into (0 without top-k logits)
    intact: (
        np.ndarray
    )  # bool [teachers, rows]: the teacher's outputs in the row are as written (checksum matches)

    def to_outputs(self, device: torch.device) -> list[ModelOutput]:
        """Each teacher's outputs as fp32 tensors on `device`; from pinned rows the copy does not block the host."""
        return [
            _to_output(arrays, classes, device)
            for arrays, classes in zip(self.arrays, self.num_classes, strict=True)
        ]


def _to_output(arrays: dict[str, torch.Tensor], num_classes: int, device: torch.device) -> ModelOutput:
    def take(name):
        return arrays[name].to(device, non_blocking=True)

    logits = None
    if "logits" in arrays:
        logits = take("logits").float()
    elif "logits_topk" in arrays:
        # The rest of the distribution is below the k-th logit: a floor far under it keeps its mass ~0.
        top, index = take("logits_topk").float(), take("logits_index").long()
        logits = torch.full((len(top), num_classes), -1e4, device=device)
        logits.scatter_(1, index, top)
    pooled = take("pooled").float() if "pooled" in arrays else None
    tokens = take("tokens").float() if "tokens" in arrays else None
    return ModelOutput(pooled=pooled, logits=logits, patch_tokens=tokens)


def pack_views(view: ViewRecord) -> np.ndarray:
    columns = [view.crop_anchor, view.crop_shape, view.flip.float().unsqueeze(1), view.jitter]
    return torch.cat([c.detach().float().cpu() for c in columns], dim=1).numpy()


def unpack_views(rows: np.ndarray) -> ViewRecord:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    return ViewRecord(
        crop_anchor=t[:, 0:2], crop_shape=t[:, 2:4], flip=t[:, 4].round().long(), jitter=t[:, 5:9]
    )


def pack_mix(mix: MixRecord) -> np.ndarray:
    """A mix part as float32 rows: the partner's view (VIEW_FIELDS), λ, the box (the partner id is stored apart)."""
    columns = [torch.from_numpy(pack_views(mix.partner_view)), mix.lam.unsqueeze(1), mix.box]
    return torch.cat([c.detach().float().cpu() for c in columns], dim=1).numpy()


def unpack_mix(partner_id: np.ndarray, rows: np.ndarray) -> MixRecord:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    return MixRecord(
        partner_id=torch.from_numpy(partner_id).long(),
        partner_view=unpack_views(rows[:, :VIEW_FIELDS]),
        lam=t[:, VIEW_FIELDS].contiguous(),
        box=t[:, VIEW_FIELDS + 1 :].round().long(),
    )
