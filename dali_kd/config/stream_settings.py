"""What the data layer is given to make its streams: its own section, and from the others what a stream must know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dali_kd.config.data_section import DataConfig
from dali_kd.pipelines.params import (
    MIXED_DECODER_OPTIONS,
    AugmentParams,
    DecodeParams,
    EvalParams,
    MultiCropParams,
)


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

    @classmethod
    def with_defaults(
        cls,
        crops: AugmentParams | MultiCropParams,
        batch_size: int,
        seed: int,
        *,
        num_workers: int = 0,
        persistent_workers: bool = False,
        **data: Any,
    ) -> StreamSettings:
        """Settings for a stream made straight over an ImageIndex (tests, benchmarks): the data section's defaults
        but for the keys given in `data` (data.root stays empty: the index says what is read). The decode follows
        the data section, as a run's does; the eval view is EvalParams' default."""
        section = DataConfig(root="", **data)
        return cls(
            data=section, crops=crops, eval=EvalParams(), decode=decode_params(section), batch_size=batch_size,
            seed=seed, num_workers=num_workers, persistent_workers=persistent_workers,
        )  # fmt: skip


def decode_params(data: DataConfig) -> DecodeParams:
    """How the DALI pipelines decode (window or whole image, the GPU decoder's tuning) and their output dtype."""
    # The GPU decoder's tuning keys are named as DecodeParams' fields (and DALI's arguments), defaults included.
    tuning = {name: getattr(data, name) for name in MIXED_DECODER_OPTIONS}
    return DecodeParams(mode=data.decode, dtype=data.output_dtype, **tuning)
