"""Plain-Python augmentation parameters shared by the DALI graphs and the torchvision backend."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Columns of the jitter factors in a view record, in this order.
JITTER_FIELDS = ("brightness", "contrast", "saturation", "hue")
# The jitter factors that change nothing.
IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)


@dataclass(frozen=True)
class AugmentParams:
    """The four training augmentations, with torchvision's meaning for every number.

    brightness/contrast/saturation are strengths s: a factor is drawn uniformly from [1-s, 1+s].
    hue is a strength h in [0, 0.5]: a shift is drawn from [-h, h] in turns of the colour wheel
    (torchvision's convention; DALI wants degrees, so the graph multiplies by 360).
    With probability 1 - jitter_prob no jitter is applied and the recorded factors are the identity (1, 1, 1, 0).
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class EvalParams:
    """Evaluation transform: resize the shorter side to resize_size, centre-crop image_size, normalise."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class MultiCropParams:
    """DINO-style multi-crop: each image is decoded once and cut into `num_global` global and `num_local` local crops.

    global_view and local_view are full AugmentParams (size, scale, flip, jitter), so each crop kind has its own
    size and scale range while every crop draws its own window, flip and jitter. Global crops come first in
    every per-crop record.
    """

    global_view: AugmentParams
    local_view: AugmentParams
    num_global: int = 2
    num_local: int = 8

    def __post_init__(self) -> None:
        if self.num_global < 1 or self.num_local < 0:
            raise ValueError(
                f"need num_global >= 1 and num_local >= 0, got {self.num_global}, {self.num_local}"
            )

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    def view_params(self, view: int) -> AugmentParams:
        """The parameters crop `view` (0-based, globals first) was drawn and rendered with."""
        return self.global_view if view < self.num_global else self.local_view
