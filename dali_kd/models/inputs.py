"""What each model sees: the pipeline's view turned into the model's own input size and normalisation on the device.

The pipeline decodes and cuts every view once (at the larger of the two models' sizes) and normalises it with
data.augment's mean/std. A teacher with other statistics (CLIP, SigLIP) or another resolution (a 224 px teacher
for a 160 px student) gets the same view resized and re-normalised here, in one antialiased resize and one fused
multiply-add, so the view record, the teacher cache and the student all stay about the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

RGB = tuple[float, float, float]


def rgb(values: Sequence[float]) -> RGB:
    """Three per-channel values (red, green, blue) as floats."""
    r, g, b = values
    return float(r), float(g), float(b)


@dataclass(frozen=True)
class InputSpec:
    """A model's input: a size × size RGB image normalised as (pixel / 255 - mean) / std."""

    size: int
    mean: RGB
    std: RGB

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def pretrained_normalisation(model: nn.Module) -> tuple[RGB, RGB] | None:
    """The mean/std the model's pretrained weights were trained with (timm's pretrained_cfg), if it names them."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return None
    return rgb(mean), rgb(std)


class InputAdapter(nn.Module):
    """Pipeline images → this model's input: resized to `model.size` when they differ, re-normalised when the
    statistics differ; the identity (the same tensor back) when neither does."""

    scale: torch.Tensor  # buffers (see __init__)
    shift: torch.Tensor

    def __init__(self, pipeline: InputSpec, model: InputSpec):
        super().__init__()
        self.pipeline, self.model = pipeline, model
        p_mean, p_std = torch.tensor(pipeline.mean), torch.tensor(pipeline.std)
        m_mean, m_std = torch.tensor(model.mean), torch.tensor(model.std)
        # (x * p_std + p_mean - m_mean) / m_std = x * scale + shift, per channel.
        scale, shift = p_std / m_std, (p_mean - m_mean) / m_std
        self.renormalise = not (
            torch.allclose(scale, torch.ones(3)) and torch.allclose(shift, torch.zeros(3))
        )
        # Not persistent: derived from the config, so checkpoints and exported weights do not carry them.
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    @property
    def is_identity(self) -> bool:
        return not self.renormalise and self.pipeline.size == self.model.size

    def forward(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """images: [B, 3, H, W] from the pipeline; resize=False keeps the size (multi-crop's local crops)."""
        size = self.model.size
        if resize and tuple(images.shape[-2:]) != (size, size):
            # Antialiased bilinear, as the pipelines' own resize; half precision is resized in fp32 on the CPU,
            # which has no half kernel for it.
            half_on_cpu = images.dtype in (torch.float16, torch.bfloat16) and images.device.type == "cpu"
            resized = F.interpolate(
                images.float() if half_on_cpu else images,
                size=(size, size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            images = resized.to(images.dtype) if half_on_cpu else resized
        if self.renormalise:
            images = torch.addcmul(self.shift.to(images.dtype), images, self.scale.to(images.dtype))
        return images

    def extra_repr(self) -> str:
        return f"pipeline={self.pipeline}, model={self.model}"
