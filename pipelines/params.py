"""Plain-Python augmentation parameters shared by the DALI graphs and the torchvision backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    view_size: int = 224
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
    """Evaluation transform: resize the shorter side to resize_size, centre-crop view_size, normalise."""

    view_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# How the DALI pipelines cut multi-crop (MultiCropParams.graph): "per_crop", one resize → colour → normalise chain
# per crop; "batched", two chains (globals, locals) whose operator count does not grow with the crop count; "auto",
# batched on a GPU pipeline and per_crop in DALI's CPU mode.
MULTI_CROP_GRAPHS = ("auto", "batched", "per_crop")


def resolve_multi_crop_graph(graph: str, on_gpu: bool) -> str:
    """The graph "auto" stands for on this pipeline: batched on a GPU, where each operator costs a launch per crop,
    per_crop in DALI's CPU mode, where its warp_affine costs more than the resizes it replaces."""
    if graph not in MULTI_CROP_GRAPHS:
        raise ValueError(f"multi-crop graph must be one of {', '.join(MULTI_CROP_GRAPHS)}, got {graph!r}")
    if graph != "auto":
        return graph
    return "batched" if on_gpu else "per_crop"


@dataclass(frozen=True)
class MultiCropParams:
    """DINO-style multi-crop: each image is decoded once and cut into `num_global` global and `num_local` local crops.

    global_view and local_view are full AugmentParams (size, scale, flip, jitter), so each crop kind has its own
    size and scale range while every crop draws its own window, flip and jitter. Global crops come first in
    every per-crop record. graph: which DALI graph cuts them (MULTI_CROP_GRAPHS; the two draw different random
    windows, so a record replays only through the graph that drew it); the torchvision backend ignores it.
    """

    global_view: AugmentParams
    local_view: AugmentParams
    num_global: int = 2
    num_local: int = 8
    graph: str = "auto"

    def __post_init__(self) -> None:
        if self.num_global < 1 or self.num_local < 0:
            raise ValueError(
                f"need num_global >= 1 and num_local >= 0, got {self.num_global}, {self.num_local}"
            )
        resolve_multi_crop_graph(self.graph, on_gpu=False)  # refuses an unknown graph

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    def view_params(self, view: int) -> AugmentParams:
        """The parameters crop `view` (0-based, globals first) was drawn and rendered with."""
        return self.global_view if view < self.num_global else self.local_view


DECODE_MODES = ("window", "full")
OUTPUT_DTYPES = ("float32", "float16")
# DecodeParams' fields that only the GPU ("mixed") decoder takes, named as DALI's decoder arguments.
MIXED_DECODER_OPTIONS = (
    "hw_decoder_load",
    "device_memory_padding",
    "host_memory_padding",
    "preallocate_width_hint",
    "preallocate_height_hint",
)


@dataclass(frozen=True)
class DecodeParams:
    """How a pipeline decodes its images and what it hands out.

    mode: "window" decodes only the view's crop window (fn.decoders.image_slice; fewer pixels to decode and
    resize); "full" decodes the whole image and cuts the view from it (fn.decoders.image, then the resize reads
    the window as its region of interest — multi-crop's graph, which always decodes the whole image once). The two
    differ slightly at the window's edges, so a view replays to the same pixels only through the same mode.
    hw_decoder_load, the memory paddings and the preallocation hints tune the GPU ("mixed") decoder only and never
    change a pixel; CPU decoders are not given them. Their defaults are DALI 2.4's own, written out so that another
    DALI release (some shipped hw_decoder_load=0.9) does not change them silently.
    dtype: what crop_mirror_normalize writes, "float32" or "float16" (half the bytes per batch, rounded to fp16).
    """

    mode: str = "window"
    # Share of the JPEGs sent to the GPU's hardware JPEG decoder where it has one (A100, H100); the rest: CUDA + CPU.
    hw_decoder_load: float = 0.65
    # nvJPEG's device buffer per thread and its two pinned host buffers per thread, in bytes; 0 = no preallocation.
    device_memory_padding: int = 16 * 1024 * 1024
    host_memory_padding: int = 8 * 1024 * 1024
    # Image size the hardware decoder preallocates for, pixels; 0 = no hint.
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {self.mode!r}")
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:  # also refuses NaN
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        for name in MIXED_DECODER_OPTIONS[1:]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")

    def decoder_options(self, decode_device: str) -> dict[str, Any]:
        """Keyword arguments for a DALI image decoder on `decode_device`: the mixed-only tuning, or nothing."""
        if decode_device != "mixed":
            return {}
        return {name: getattr(self, name) for name in MIXED_DECODER_OPTIONS}


# The default decode as one shared (frozen) value, for function defaults.
DEFAULT_DECODE = DecodeParams()
