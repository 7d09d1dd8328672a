"""The batch both data backends yield, so the trainer never knows which one runs."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np
import torch


@dataclass
class MixRecord:
    """How each image was mixed with a partner image of its batch (data.augment.mix; dali_kd.data.mixing).

    partner_id:   int64 [B], the sample id of the partner image (the sample's own id where it was not mixed).
    partner_view: the partner's ViewRecord (its crops, in the same layout as the sample's own record).
    lam:          float32 [B], the weight of the sample's own image in the blend outside the box (mixup: λ;
                  cutmix and unmixed samples: 1).
    box:          int64 [B, 4], (top, left, bottom, right) in view pixels (the pipeline's view size), where the
                  partner's pixels replace the sample's (cutmix); empty (top == bottom) otherwise.
    mixed = where(in box, partner, lam * own + (1 - lam) * partner).
    """

    partner_id: torch.Tensor
    partner_view: ViewRecord
    lam: torch.Tensor
    box: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MixRecord:
        return MixRecord(
            self.partner_id.to(device, non_blocking=non_blocking),
            self.partner_view.to(device, non_blocking=non_blocking),
            self.lam.to(device, non_blocking=non_blocking),
            self.box.to(device, non_blocking=non_blocking),
        )

    def take(self, rows: torch.Tensor) -> MixRecord:
        return MixRecord(self.partner_id[rows], self.partner_view.take(rows), self.lam[rows], self.box[rows])

    def shows_partner(self) -> torch.Tensor:
        """bool [B]: the rows whose pixels hold some of the partner (λ < 1 or a box with an area); the others are
        their own view exactly."""
        box = self.box
        return (self.lam < 1) | ((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "partner_id": self.partner_id,
            **{f"partner_view.{k}": v for k, v in self.partner_view.tensors().items()},
            "lam": self.lam,
            "box": self.box,
        }


@dataclass
class ViewRecord:
    """The parameters of each sample's augmented view; feeding them back renders the same pixels.

    crop_anchor: float32 [B, 2], top-left corner (y, x) relative to the decoded image's height and width.
    crop_shape:  float32 [B, 2], crop (height, width) relative to the decoded image.
    flip:        int64 [B], 1 where the view is mirrored left-right.
    jitter:      float32 [B, 4], (brightness, contrast, saturation, hue) with torchvision's meaning:
                 multiplicative factors and a hue shift in turns; identity is (1, 1, 1, 0).
    mix:         with data.augment.mix, how the rendered view was then mixed with a partner (else None).
    With multi-crop every field gains a view axis after the batch axis ([B, V, 2], [B, V], [B, V, 4]): the
    global crops first, then the local ones (the mix part's per-sample fields keep [B]: one partner, λ and box
    for all of a sample's crops).
    """

    crop_anchor: torch.Tensor
    crop_shape: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    mix: MixRecord | None = None

    CROP_FIELDS = ("crop_anchor", "crop_shape", "flip", "jitter")

    def _crop_fields(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.CROP_FIELDS}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewRecord:
        return ViewRecord(
            **{k: v.to(device, non_blocking=non_blocking) for k, v in self._crop_fields().items()},
            mix=None if self.mix is None else self.mix.to(device, non_blocking=non_blocking),
        )

    def select(self, view: int) -> ViewRecord:
        """One crop's record out of a multi-crop record: [B, ...] fields, as a one-view batch has."""
        mix = self.mix
        if mix is not None:
            mix = MixRecord(mix.partner_id, mix.partner_view.select(view), mix.lam, mix.box)
        return ViewRecord(**{k: v[:, view] for k, v in self._crop_fields().items()}, mix=mix)

    def take(self, rows: torch.Tensor) -> ViewRecord:
        """The records of these rows (an index or a boolean mask over the batch), mix part included."""
        return ViewRecord(
            **{k: v[rows] for k, v in self._crop_fields().items()},
            mix=None if self.mix is None else self.mix.take(rows),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the record by name (the mix part's as mix.<field>)."""
        found = dict(self._crop_fields())
        if self.mix is not None:
            found.update({f"mix.{k}": v for k, v in self.mix.tensors().items()})
        return found


class BatchFields(Protocol):
    """Fields a feature adds to the batches of its own stream (the teacher cache's), moved with the batch."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BatchFields:
        """The fields with their torch tensors on `device`; host (numpy) fields kept."""
        ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """Their torch tensors by name."""
        ...


@dataclass
class Batch:
    """images: float32 (or the pipeline's output dtype) [B, 3, S, S], normalised; labels and sample_ids: int64 [B];
    view: how each image was made.

    Multi-crop: images holds the global crops, [B, G, 3, S, S], and local_images the local ones, [B, N, 3, s, s]
    (None without local crops); view has a record per crop.

    The device contract: every torch tensor of a Batch a stream yields is on the trainer's device (the stream moves
    them; the trainer never does). What only the host reads (cache rows to write or replay) is numpy: host_ids,
    host_stream_ids, cache.slots, cache.store. So the loop never waits for the device to learn an id.

    sample_ids index the dataset's sorted file list (dali_kd.data.dataset.ImageIndex), the same on every
    backend and rank, so a sample can be found again (teacher cache, quarantine, replay): the image shown.
    stream_ids (training streams; int64 [B]): the sample id the stream scheduled at each position, its slot. It
    differs from sample_ids only where the slot's file was set aside at runtime and a same-class stand-in was shown
    instead; teacher-cache rows are written per slot (see dali_kd.teacher_cache.stream).
    """

    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    view: ViewRecord | None = None
    local_images: torch.Tensor | None = None
    host_ids: np.ndarray | None = None  # sample_ids on the host
    stream_ids: torch.Tensor | None = None
    host_stream_ids: np.ndarray | None = None  # stream_ids on the host
    cache: BatchFields | None = None  # the teacher cache's (dali_kd.teacher_cache.batch_fields.CacheFields)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def multi_crop(self) -> bool:
        return self.images.ndim == 5

    def global_crops(self) -> torch.Tensor:
        """The views the teacher sees, [B, G, 3, S, S] (G = 1 for a one-view batch)."""
        return self.images if self.multi_crop else self.images.unsqueeze(1)

    def ids_on_host(self) -> np.ndarray:
        """sample_ids as numpy, without a device read where the stream kept a host copy."""
        return self.host_ids if self.host_ids is not None else self.sample_ids.cpu().numpy()

    def stream_ids_on_host(self) -> np.ndarray:
        if self.host_stream_ids is not None:
            return self.host_stream_ids
        return self.stream_ids.cpu().numpy() if self.stream_ids is not None else self.ids_on_host()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every torch tensor of the batch by name (view record fields as view.<field>)."""
        found = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        if self.view is not None:
            found.update({f"view.{name}": t for name, t in self.view.tensors().items()})
        if self.cache is not None:
            found.update({f"cache.{name}": t for name, t in self.cache.tensors().items()})
        found = {name: t for name, t in found.items() if t is not None}
        return found

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with every tensor on `device` (tensors already there are not copied); host fields kept."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            sample_ids=self.sample_ids.to(device, non_blocking=non_blocking),
            view=None if self.view is None else self.view.to(device, non_blocking=non_blocking),
            local_images=move(self.local_images),
            stream_ids=move(self.stream_ids),
            cache=None if self.cache is None else self.cache.to(device, non_blocking=non_blocking),
        )
