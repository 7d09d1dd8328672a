"""What the data layer is given to make its streams: its own section, and from the others what a stream must know."""

from __future__ import annotations

from dataclasses import dataclass

from dali_kd.config.data_section import DataConfig
from dali_kd.pipelines.params import AugmentParams, DecodeParams, EvalParams, MultiCropParams


@dataclass(frozen=True)
class StreamSettings:
    """data: the data section. crops / eval: the views the pipelines cut, sized for the models (the larger of the
    teacher's and the student's input), one per image or DINO multi-crop (train.use_local_crops); decode: how they
    decode. batch_size, seed, num_workers, persistent_workers: the train section's, as a stream uses them."""

    data: DataConfig
    crops: AugmentParams | MultiCropParams
    eval: EvalParams
    decode: DecodeParams
    batch_size: int
    seed: int
    num_workers: int
    persistent_workers: bool
