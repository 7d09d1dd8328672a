"""The batch both data backends yield, so the trainer never knows which one runs."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class ViewRecord:
    """The parameters of each sample's augmented view; feeding them back renders the same pixels.

    crop_anchor: float32 [B, 2], top-left corner (y, x) relative to the decoded image's height and width.
    crop_shape:  float32 [B, 2], crop (height, width) relative to the decoded image.
    flip:        int64 [B], 1 where the view is mirrored left-right.
    jitter:      float32 [B, 4], (brightness, contrast, saturation, hue) with torchvision's meaning:
                 multiplicative factors and a hue shift in turns; identity is (1, 1, 1, 0).
    With multi-crop every field gains a view axis after the batch axis ([B, V, 2], [B, V], [B, V, 4]): the
    global crops first, then the local ones.
    """

    crop_anchor: torch.Tensor
    crop_shape: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewRecord:
        return ViewRecord(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def select(self, view: int) -> ViewRecord:
        """One crop's record out of a multi-crop record: [B, ...] fields, as a one-view batch has."""
        return ViewRecord(**{f.name: getattr(self, f.name)[:, view] for f in fields(self)})


@dataclass
class Batch:
    """images: float32 [B, 3, S, S], normalised; labels and sample_ids: int64 [B]; view: how each image was made.

    Multi-crop: images holds the global crops, [B, G, 3, S, S], and local_images the local ones, [B, N, 3, s, s]
    (None without local crops); view has a record per crop.

    sample_ids index the dataset's sorted file list (dali_kd.data.dataset.ImageIndex), the same on every
    backend and rank, so a sample can be found again (teacher cache, quarantine, replay): the image shown.
    stream_ids (training streams; int64 [B], on sample_ids' device): the sample id the stream scheduled at each
    position, its slot. It differs from sample_ids only where the slot's file was set aside at runtime and a
    same-class stand-in was shown instead; teacher-cache rows are written per slot (see dali_kd.data.cache_stream).
    """

    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    view: ViewRecord | None = None
    local_images: torch.Tensor | None = None
    # With the teacher cache: the view slot of each sample, whether the teacher's outputs come from the cache,
    # and which rows a live teacher should store (see dali_kd.data.cache_stream).
    slots: torch.Tensor | None = None
    from_cache: bool = False
    store: torch.Tensor | None = None
    host_ids: np.ndarray | None = None  # sample ids already on the host (no device read needed)
    stream_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def multi_crop(self) -> bool:
        return self.images.ndim == 5

    def global_crops(self) -> torch.Tensor:
        """The views the teacher sees, [B, G, 3, S, S] (G = 1 for a one-view batch)."""
        return self.images if self.multi_crop else self.images.unsqueeze(1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            sample_ids=self.sample_ids.to(device, non_blocking=non_blocking),
            view=None if self.view is None else self.view.to(device, non_blocking=non_blocking),
            local_images=None
            if self.local_images is None
            else self.local_images.to(device, non_blocking=non_blocking),
            slots=self.slots,
            from_cache=self.from_cache,
            store=self.store,
            host_ids=self.host_ids,
            stream_ids=None
            if self.stream_ids is None
            else self.stream_ids.to(device, non_blocking=non_blocking),
        )
