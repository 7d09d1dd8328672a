"""Pure DALI graph functions: draw a random view, render a view (crop, flip, jitter, normalise), multi-crop from one
decode with a chain per crop, eval transform (multi-crop's batched chains: pipelines.multi_crop).

Each function takes DataNodes and returns DataNodes; none owns a reader, so the same code serves the training
pipeline, the replay pipeline, CPU-only mode and the GPU (only `decode_device` differs). A DecodeParams says how
each decodes (crop window or whole image, the GPU decoder's tuning) and the dtype it hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from nvidia.dali import fn
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import DataNode
from nvidia.dali.types import DALIDataType, DALIImageType, DALIInterpType  # types.FLOAT etc. are untyped

from dali_kd.pipelines.params import (
    DEFAULT_DECODE,
    IDENTITY_JITTER,
    AugmentParams,
    DecodeParams,
    EvalParams,
    MultiCropParams,
)

_OUTPUT_TYPES = {"float32": DALIDataType.FLOAT, "float16": DALIDataType.FLOAT16}


@dataclass
class View:
    """A view record as DataNodes, per sample: relative crop anchor (y, x) and shape (h, w), flip, jitter[4].

    window: the crop's (anchor, shape) in whole pixels when the view was just drawn (the relative record rounds
    back to exactly these); a replayed view has none and converts its record.
    """

    crop_anchor: DataNode
    crop_shape: DataNode
    flip: DataNode
    jitter: DataNode
    window: tuple[DataNode, DataNode] | None = None


def image_hw(encoded: DataNode) -> DataNode:
    """(height, width) of each encoded image, read from its header without decoding (float32)."""
    shape = fn.peek_image_shape(encoded, dtype=DALIDataType.FLOAT)
    return shape[0:2]


def draw_view(encoded: DataNode, params: AugmentParams, hw: DataNode | None = None) -> View:
    """Draw each sample's random view: torchvision's RandomResizedCrop window, flip bit and jitter factors.

    hw: image_hw(encoded) when the caller has it already (the header is then parsed once per sample).
    Few operators per view on purpose: each costs a few microseconds per sample on the CPU, and multi-crop draws
    ten views per image.
    """
    hw = image_hw(encoded) if hw is None else hw
    # random_crop_generator implements RandomResizedCrop's 10 tries + centre fallback on the (H, W) shape;
    # its aspect ratio is width/height as in torchvision.
    anchor, shape = fn.random_crop_generator(
        fn.cast(hw, dtype=DALIDataType.INT64),
        random_area=list(params.crop_scale),
        random_aspect_ratio=list(params.crop_ratio),
        num_attempts=10,
    )
    flip = fn.random.coin_flip(probability=params.flip_prob, dtype=DALIDataType.INT32)
    # Jitter factors: centre + u * strength with u ~ U[-1, 1] per factor, or exactly the centre (identity) when
    # the jitter is not applied (probability 1 - jitter_prob).
    apply = fn.random.coin_flip(probability=params.jitter_prob, dtype=DALIDataType.UINT8)
    strengths = np.array(
        [params.brightness, params.contrast, params.saturation, params.hue], dtype=np.float32
    )
    spread = fn.random.uniform(range=[-1.0, 1.0], shape=[4]) * (apply * strengths)
    jitter = spread + np.array(IDENTITY_JITTER, dtype=np.float32)
    return View(
        crop_anchor=fn.cast(anchor, dtype=DALIDataType.FLOAT) / hw,
        crop_shape=fn.cast(shape, dtype=DALIDataType.FLOAT) / hw,
        flip=flip,
        jitter=jitter,
        window=(anchor, shape),
    )


def _window(view: View, hw: DataNode | None) -> tuple[DataNode, DataNode]:
    """The view's crop window in whole pixels: as drawn, or converted back from the relative record (which needs
    the image's size, hw)."""
    if view.window is not None:
        return view.window
    if hw is None:
        raise ValueError("a replayed view needs its image's (height, width) to find its crop window")
    return to_pixels(view.crop_anchor, hw), to_pixels(view.crop_shape, hw)


def resized(images: DataNode, **options: Any) -> DataNode:
    """fn.resize of one input, which gives one output (DALI's stubs type the result as any number of them)."""
    return cast(DataNode, fn.resize(images, **options))


def to_pixels(relative: DataNode, hw: DataNode) -> DataNode:
    # Rounding recovers the generator's integer window exactly: a/H in float32 times H is within 0.5 of a.
    return fn.cast(dmath.floor(relative * hw + 0.5), dtype=DALIDataType.INT32)


def render_view(
    encoded: DataNode,
    view: View,
    params: AugmentParams,
    decode_device: str,
    hw: DataNode | None = None,
    decode: DecodeParams = DEFAULT_DECODE,
) -> DataNode:
    """Decode the view (decode.mode "window": its crop window only; "full": the whole image, then cut_view), then
    finish it (resize, colour-jitter, flip, normalise) to CHW in decode.dtype.

    decode_device: "mixed" (GPU, hardware JPEG decoder where present) or "cpu" (DALI CPU-only mode).
    """
    hw = image_hw(encoded) if hw is None and view.window is None else hw
    if decode.mode == "full":
        return cut_view(decode_full(encoded, decode_device, decode), view, params, hw, decode.dtype)
    anchor, shape = _window(view, hw)
    images = fn.decoders.image_slice(
        encoded,
        anchor,
        shape,
        axis_names="HW",
        device=decode_device,
        output_type=DALIImageType.RGB,
        **decode.decoder_options(decode_device),
    )
    return finish_view(images, view, params, dtype=decode.dtype)


def decode_full(encoded: DataNode, decode_device: str, decode: DecodeParams = DEFAULT_DECODE) -> DataNode:
    """The whole image, decoded once (multi-crop cuts every view from it). decode.mode plays no part here."""
    return fn.decoders.image(
        encoded, device=decode_device, output_type=DALIImageType.RGB, **decode.decoder_options(decode_device)
    )


def cut_view(
    decoded: DataNode, view: View, params: AugmentParams, hw: DataNode | None, dtype: str = "float32"
) -> DataNode:
    """A view cut from an already decoded image: its window resized straight out of the image, then jittered,
    flipped and normalised (to `dtype`).

    The resize reads the window as its region of interest (no copy of the crop first: one operator fewer per crop,
    about 8% faster on the CPU, measured); near the window's edges its filter may weigh the pixels just outside, so
    these pixels can differ slightly from the window decode's crop-then-resize. Replaying a record through this
    same graph gives identical pixels. hw may be None only for a view drawn in this graph (it has its window).
    """
    anchor, shape = _window(view, hw)
    start = fn.cast(anchor, dtype=DALIDataType.FLOAT)
    return finish_view(
        decoded, view, params, roi=(start, start + fn.cast(shape, dtype=DALIDataType.FLOAT)), dtype=dtype
    )


def finish_view(
    images: DataNode,
    view: View,
    params: AugmentParams,
    roi: tuple[DataNode, DataNode] | None = None,
    dtype: str = "float32",
) -> DataNode:
    """uint8 crop (or the `roi` (start, end) window of an image, in pixels) → resized to params.view_size,
    colour-jittered, flipped and normalised CHW in `dtype` ("float32" or "float16").

    Colour jitter is DALI's color_twist: brightness and saturation as in torchvision, hue in degrees
    (the record keeps turns), contrast centred on mid-grey rather than on the image mean.
    """
    size = params.view_size
    window: dict[str, Any] = {"roi_start": roi[0], "roi_end": roi[1]} if roi is not None else {}
    images = resized(
        images, size=[size, size], interp_type=DALIInterpType.INTERP_LINEAR, antialias=True, **window
    )
    images = fn.color_twist(
        images,
        brightness=view.jitter[0],
        contrast=view.jitter[1],
        saturation=view.jitter[2],
        hue=view.jitter[3] * 360.0,
    )
    return normalize(images, params.mean, params.std, mirror=view.flip, dtype=dtype)


def multi_crop(
    encoded: DataNode, params: MultiCropParams, decode_device: str, decode: DecodeParams = DEFAULT_DECODE
) -> tuple[DataNode, DataNode | None, list[View]]:
    """DINO multi-crop from one decode: (global crops [G,3,S,S], local crops [N,3,s,s] or None, the G+N views).

    Each crop draws its own window, flip and jitter; globals come first in the list of views. The image is always
    decoded whole, once (decode.mode is not consulted: one window decode per crop would decode it G+N times).
    """
    hw = image_hw(encoded)
    decoded = decode_full(encoded, decode_device, decode)
    views = [draw_view(encoded, params.view_params(i), hw) for i in range(params.num_views)]
    crops = [cut_view(decoded, view, params.view_params(i), hw, decode.dtype) for i, view in enumerate(views)]
    global_crops = fn.stack(*crops[: params.num_global])
    local_crops = fn.stack(*crops[params.num_global :]) if params.num_local else None
    return global_crops, local_crops, views


def stack_views(views: list[View]) -> View:
    """Per-crop records stacked per sample: anchor/shape [V,2], flip [V], jitter [V,4]."""
    return View(
        crop_anchor=fn.stack(*(v.crop_anchor for v in views)),
        crop_shape=fn.stack(*(v.crop_shape for v in views)),
        flip=fn.stack(*(v.flip for v in views)),
        jitter=fn.stack(*(v.jitter for v in views)),
    )


def normalize(
    images: DataNode,
    mean,
    std,
    mirror: DataNode | int = 0,
    crop: tuple[int, int] | None = None,
    dtype: str = "float32",
    layout: str = "CHW",
):
    """uint8 HWC → float CHW, (x/255 - mean)/std, optionally mirrored and centre-cropped, in one kernel.

    dtype "float16" rounds the float32 result to half precision inside the same kernel (half the bytes out).
    layout "FCHW" for a sequence of frames (FHWC in).
    """
    kwargs: dict[str, Any] = {"crop": list(crop)} if crop else {}
    return fn.crop_mirror_normalize(
        images,
        mirror=mirror,
        mean=[m * 255.0 for m in mean],
        std=[s * 255.0 for s in std],
        dtype=_OUTPUT_TYPES[dtype],
        output_layout=layout,
        **kwargs,
    )


def eval_transform(
    encoded: DataNode, params: EvalParams, decode_device: str, decode: DecodeParams = DEFAULT_DECODE
) -> DataNode:
    """Decode the whole image (decode.mode is not consulted), resize the shorter side to resize_size, centre-crop
    view_size, normalise to decode.dtype."""
    images = decode_full(encoded, decode_device, decode)
    images = resized(
        images, resize_shorter=params.resize_size, interp_type=DALIInterpType.INTERP_LINEAR, antialias=True
    )
    return normalize(
        images, params.mean, params.std, crop=(params.view_size, params.view_size), dtype=decode.dtype
    )
