"""The data section: where the images are, how they are read and decoded, their augmentation (data.augment) and
multi-crop; every key declared once, with its type, range, default and meaning."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from dali_kd.config.section import RGB, FloatRange, Section, free_on_resume
from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD, DecodeParams


def _check_area_range(v: FloatRange) -> FloatRange:
    if not 0 < v[0] <= v[1] <= 1:
        raise ValueError("need 0 < low <= high <= 1")
    return v


class AugmentConfig(Section):
    crop_scale: FloatRange = Field((0.08, 1.0), description="Random resized crop: area fraction range")
    crop_ratio: FloatRange = Field(
        (3 / 4, 4 / 3), description="Random resized crop: aspect ratio (w/h) range"
    )
    flip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip")
    jitter_prob: float = Field(0.8, ge=0, le=1, description="Probability that colour jitter is applied")
    brightness: float = Field(0.4, ge=0, le=1, description="Brightness factor drawn from [1-s, 1+s]")
    contrast: float = Field(0.4, ge=0, le=1, description="Contrast factor drawn from [1-s, 1+s]")
    saturation: float = Field(0.2, ge=0, le=1, description="Saturation factor drawn from [1-s, 1+s]")
    hue: float = Field(
        0.1, ge=0, le=0.5, description="Hue shift drawn from [-h, h], in turns of the colour wheel"
    )
    mean: RGB = Field(IMAGENET_MEAN, description="Normalisation mean (RGB, 0-1 scale)")
    std: RGB = Field(IMAGENET_STD, description="Normalisation std (RGB, 0-1 scale)")
    # Function matching (Beyer et al., CVPR 2022): a mixed image shown to the teacher and the student alike, after
    # the four augmentations above; done on the device by dali_kd.data.mixing, not by the pipelines.
    mix: Literal["none", "mixup", "cutmix", "both"] = Field(
        "none",
        description="Mix each image with another of its batch after augmentation, for teacher and student alike: "
        "mixup (a blend), cutmix (a box pasted from the partner), both (each mixed sample picks one of the two "
        "with probability 0.5) or none",
    )
    mix_alpha: float = Field(
        0.8, gt=0, description="mixup: the blend weight λ of the image itself is drawn from Beta(α, α)"
    )
    cutmix_alpha: float = Field(
        1.0, gt=0, description="cutmix: the kept area fraction λ is drawn from Beta(α, α) (box area 1 - λ)"
    )
    mix_prob: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Probability that a sample is mixed (per sample; the others pass unchanged)",
    )

    @field_validator("crop_scale")
    @classmethod
    def _check_scale(cls, v: FloatRange) -> FloatRange:
        return _check_area_range(v)

    @field_validator("crop_ratio")
    @classmethod
    def _check_ratio(cls, v: FloatRange) -> FloatRange:
        if not 0 < v[0] <= v[1]:
            raise ValueError("need 0 < low <= high")
        return v

    @field_validator("std")
    @classmethod
    def _check_std(cls, v: RGB) -> RGB:
        if any(s <= 0 for s in v):
            raise ValueError("every entry must be > 0")
        return v


# The AugmentConfig keys of the mixing step (the rest are the DALI/torchvision augmentations: AugmentParams).
MIX_KEYS = frozenset({"mix", "mix_alpha", "cutmix_alpha", "mix_prob"})


class DataConfig(Section):
    root: str = Field(description="Training images: an ImageFolder tree root/<class>/<image>")
    file_list: str | None = Field(
        None,
        description="Train on the files listed here (one <class>/<image> path per line, relative to root)",
    )
    val_root: str | None = free_on_resume(
        None,
        description="Held-out images (same classes) for the k-NN and head evaluation; null: the part of root "
        "that data.holdout_fraction holds out, or no evaluation when that is 0",
    )
    holdout_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="With data.val_root null: this fraction of each class's images under root is held out for "
        "evaluation and never trained on (chosen by a hash of each file's path relative to root: the same "
        "files on every run and every rank); 0: no evaluation. Folders only (shards: give data.val_root)",
    )
    backend: Literal["dali", "torchvision"] = Field(
        "dali", description="dali (GPU or DALI CPU) or torchvision (PIL)"
    )
    format: Literal["folder", "shards"] = Field(
        "folder",
        description="folder: image files (ImageFolder tree); shards: tar shards made by python -m dali_kd.shard "
        "(data.root and data.val_root then name a shard folder or its manifest.json)",
    )
    shuffle_buffer: int = Field(
        1024,
        ge=1,
        description="data.format shards: samples DALI's webdataset reader shuffles in a buffer (on top of a new "
        "shard order every pass); larger mixes more and holds more encoded images in host memory",
    )
    image_size: int = Field(
        224,
        ge=16,
        le=4096,
        description="Side of the student's input: the square training and eval crops, pixels",
    )
    eval_resize: int = Field(
        256, ge=16, le=4096, description="Eval: shorter side resized to this before the centre crop"
    )
    teacher_image_size: int | None = Field(
        None,
        ge=16,
        le=4096,
        description="Side of the teacher's input, pixels (e.g. a 224 px teacher and a 160 px student); null: "
        "data.image_size. The pipeline cuts each view once at the larger size; each model gets it resized "
        "(bilinear, antialiased) on the device, so both see the same view",
    )
    scan: Literal["header", "full", "off"] = Field(
        "header", description="Check every file before training: header/structure, full DALI decode, or off"
    )

    @field_validator("scan", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false (and `on` as true): take them as the words the user wrote.
        return {False: "off", True: "header"}.get(v, v) if isinstance(v, bool) else v

    scan_dir: str | None = Field(
        None, description="Where scans and their cache go; null: ~/.cache/dali_kd/scans/"
    )
    max_image_pixels: int = Field(100_000_000, ge=1, description="Images with more pixels are set aside")
    max_runtime_quarantine: int = Field(
        100, ge=0, description="Files set aside during a run (decode failures) before the run stops"
    )
    dali_threads: int = free_on_resume(4, ge=1, le=256, description="DALI CPU worker threads per process")
    prefetch_batches: int = free_on_resume(
        2, ge=1, le=16, description="Batches DALI prepares ahead (live or replayed)"
    )
    # Decoder choices (DALI backend). decode and output_dtype change the pixels a step sees (slightly), so a resume
    # keeps them; the GPU decoder's tuning only changes how fast the same pixels come.
    decode: Literal["window", "full"] = Field(
        "window",
        description="DALI one-view training: decode only the crop window (window: the decode alone measured 1.24x "
        "faster on 2 CPU cores) or the whole image and cut the view from it (full); views differ slightly at "
        "the window's edges; multi-crop and eval always decode the whole image",
    )
    hw_decoder_load: float = free_on_resume(
        DecodeParams.hw_decoder_load,
        ge=0,
        le=1,
        description="GPU decode: share of the JPEGs sent to the hardware JPEG decoder (A100/H100), the rest go "
        "to CUDA + CPU threads; DALI's default; ignored on the CPU",
    )
    device_memory_padding: int = free_on_resume(
        DecodeParams.device_memory_padding,
        ge=0,
        description="GPU decode: bytes of GPU memory preallocated per DALI thread for nvJPEG (avoids regrowing "
        "for a large image; costs that memory per thread); 0: none; DALI's default; ignored on the CPU",
    )
    host_memory_padding: int = free_on_resume(
        DecodeParams.host_memory_padding,
        ge=0,
        description="GPU decode: bytes of pinned host memory preallocated for nvJPEG, two buffers per DALI thread; "
        "0: none; DALI's default; ignored on the CPU",
    )
    preallocate_width_hint: int = free_on_resume(
        DecodeParams.preallocate_width_hint,
        ge=0,
        description="GPU decode: image width the hardware JPEG decoder preallocates for, pixels; 0: no hint "
        "(DALI's default); ignored on the CPU",
    )
    preallocate_height_hint: int = free_on_resume(
        DecodeParams.preallocate_height_hint,
        ge=0,
        description="GPU decode: image height the hardware JPEG decoder preallocates for, pixels; 0: no hint "
        "(DALI's default); ignored on the CPU",
    )
    output_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="dtype of the images both backends hand out: float16 halves the bytes each batch moves "
        "and rounds the pixels to fp16; needs bf16 autocast (train.precision)",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # Multi-crop (train.use_local_crops: true): every image is decoded once and cut into these crops, each with its
    # own window, flip and jitter (augment's ratio, flip and jitter settings); augment.crop_scale is then unused.
    num_global_crops: int = Field(
        2,
        ge=1,
        le=8,
        description="Multi-crop: global crops per image, image_size px (the teacher sees these)",
    )
    global_crop_scale: FloatRange = Field(
        (0.32, 1.0), description="Multi-crop: area fraction range of the global crops"
    )
    num_local_crops: int = Field(
        8, ge=0, le=64, description="Multi-crop: local crops per image (student only)"
    )
    local_crop_size: int = Field(96, ge=8, le=4096, description="Multi-crop: side of the local crops, pixels")
    local_crop_scale: FloatRange = Field(
        (0.05, 0.32), description="Multi-crop: area fraction range of the local crops"
    )
    # The two graphs draw different random windows: a resume keeps the key (and a DALI checkpoint restores only into
    # the graph that wrote it).
    multi_crop_graph: Literal["auto", "batched", "per_crop"] = Field(
        "auto",
        description="Multi-crop, DALI backend: cut the crops by one resize/colour/normalise chain per crop "
        "(per_crop) or by two chains whose operator count does not grow with the crop count (batched: the image "
        "as frames, one warp_affine per frame); auto: batched on a GPU, per_crop in DALI's CPU mode, whose "
        "warp_affine is slower than its resize",
    )

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _check_scales(cls, v: FloatRange) -> FloatRange:
        return _check_area_range(v)

    @property
    def holds_out(self) -> bool:
        """Whether evaluation takes a held-out part of root (no data.val_root, a data.holdout_fraction)."""
        return self.val_root is None and self.holdout_fraction > 0
