"""DINO multi-crop as two batched chains (MultiCropParams.graph "batched"; augment.multi_crop is the graph with a
chain per crop): every global crop of a sample as the frames of one sequence, every local crop as the frames of
another, each chain drawn and rendered by the same few operators whatever its crop count.

A chain of V crops draws V windows, flips and jitter factors per sample in array arithmetic (shape [V, ...]), stacks
the decoded image V times as frames, and renders all frames at once with per-frame arguments. fn.resize takes one
region of interest per sample, not per frame, so each frame's window, scale and flip are one affine map
(fn.warp_affine, per-frame matrix) onto a grid twice the crop's size; one antialiased resize halves that grid for
the whole sequence, so a window shrunk by up to 2x is still low-pass filtered. Replaying a record renders it as a
chain of one crop: the same operators, the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from nvidia.dali import fn
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import DataNode
from nvidia.dali.types import DALIDataType, DALIInterpType

from dali_kd.pipelines.augment import View, decode_full, image_hw, normalize, resized, to_pixels
from dali_kd.pipelines.params import (
    DEFAULT_DECODE,
    IDENTITY_JITTER,
    AugmentParams,
    DecodeParams,
    MultiCropParams,
)

# torchvision's RandomResizedCrop: this many tries at a random window before the centre crop.
NUM_ATTEMPTS = 10
# The affine map renders onto a grid this many times the crop's side; the antialiased resize brings it down.
SUPERSAMPLE = 2


def multi_crop(
    encoded: DataNode, params: MultiCropParams, decode_device: str, decode: DecodeParams = DEFAULT_DECODE
) -> tuple[DataNode, DataNode | None, View]:
    """DINO multi-crop from one decode: (global crops [G,3,S,S], local crops [N,3,s,s] or None, the records).

    Each crop draws its own window, flip and jitter; the records hold the G + N crops, globals first (anchor and
    shape [V,2], flip [V], jitter [V,4]). The image is always decoded whole, once (decode.mode is not consulted).
    """
    hw = image_hw(encoded)
    decoded = decode_full(encoded, decode_device, decode)
    global_views = draw_views(hw, params.global_view, params.num_global)
    global_crops = cut_views(decoded, global_views, params.global_view, params.num_global, hw, decode.dtype)
    if not params.num_local:
        return global_crops, None, global_views
    local_views = draw_views(hw, params.local_view, params.num_local)
    local_crops = cut_views(decoded, local_views, params.local_view, params.num_local, hw, decode.dtype)
    views = _view(
        fn.cat(a, b, axis=0) for a, b in zip(_fields(global_views), _fields(local_views), strict=True)
    )
    return global_crops, local_crops, views


def _fields(view: View) -> tuple[DataNode, DataNode, DataNode, DataNode]:
    return view.crop_anchor, view.crop_shape, view.flip, view.jitter


def _view(fields: Iterable[DataNode]) -> View:
    """A View of the four record fields in _fields' order (no pixel window)."""
    anchor, shape, flip, jitter = fields
    return View(anchor, shape, flip, jitter)


def draw_views(hw: DataNode, params: AugmentParams, num_views: int) -> View:
    """num_views random views per sample, by torchvision's RandomResizedCrop rule (10 tries at a random area and
    aspect ratio, then the centre crop of the nearest allowed ratio), each with its own flip bit and jitter.

    fn.random_crop_generator draws one window per sample; the same rule in array arithmetic draws all of a chain's
    windows with one set of operators. The window is kept in whole pixels too (View.window, float).
    """
    shape = [num_views, NUM_ATTEMPTS]
    height, width = hw[0], hw[1]
    area = fn.random.uniform(range=list(params.crop_scale), shape=shape) * (height * width)
    log_ratio = [math.log(r) for r in params.crop_ratio]
    aspect = dmath.exp(fn.random.uniform(range=log_ratio, shape=shape))  # width / height, as torchvision
    w = dmath.floor(dmath.sqrt(area * aspect) + 0.5)
    h = dmath.floor(dmath.sqrt(area / aspect) + 0.5)
    fits = fn.cast((w >= 1.0) & (w <= width) & (h >= 1.0) & (h <= height), dtype=DALIDataType.FLOAT)
    # The first try that fits: its index is the least of (index, or NUM_ATTEMPTS where it does not fit).
    attempt = np.arange(NUM_ATTEMPTS, dtype=np.float32)
    first = fn.reductions.min((1.0 - fits) * NUM_ATTEMPTS + attempt, axes=[1], keep_dims=True)
    chosen = fn.cast(first == attempt, dtype=DALIDataType.FLOAT)  # one-hot per view; all zero when no try fit
    found = fn.reductions.sum(chosen, axes=[1])
    # The centre crop's window: the whole image, narrowed to the nearest allowed aspect ratio.
    centre_w = dmath.min(width, dmath.floor(height * params.crop_ratio[1] + 0.5))
    centre_h = dmath.min(height, dmath.floor(width / params.crop_ratio[0] + 0.5))
    w = fn.reductions.sum(chosen * w, axes=[1]) + (1.0 - found) * centre_w
    h = fn.reductions.sum(chosen * h, axes=[1]) + (1.0 - found) * centre_h
    u = fn.random.uniform(range=[0.0, 1.0], shape=[num_views, 2])
    y = found * dmath.min(dmath.floor(u[:, 0] * (height - h + 1.0)), height - h)
    x = found * dmath.min(dmath.floor(u[:, 1] * (width - w + 1.0)), width - w)
    y = y + (1.0 - found) * dmath.floor((height - h) * 0.5)
    x = x + (1.0 - found) * dmath.floor((width - w) * 0.5)
    anchor, size = fn.stack(y, x, axis=1), fn.stack(h, w, axis=1)
    flip = fn.random.coin_flip(probability=params.flip_prob, dtype=DALIDataType.INT32, shape=[num_views])
    # Jitter factors as in augment.draw_view: centre + u * strength, or the identity (probability 1 - jitter_prob).
    apply = fn.random.coin_flip(
        probability=params.jitter_prob, dtype=DALIDataType.UINT8, shape=[num_views, 1]
    )
    strengths = np.array(
        [params.brightness, params.contrast, params.saturation, params.hue], dtype=np.float32
    )
    spread = fn.random.uniform(range=[-1.0, 1.0], shape=[num_views, 4]) * (apply * strengths)
    jitter = spread + np.array(IDENTITY_JITTER, dtype=np.float32)
    return View(
        crop_anchor=anchor / hw, crop_shape=size / hw, flip=flip, jitter=jitter, window=(anchor, size)
    )


def cut_views(
    decoded: DataNode,
    views: View,
    params: AugmentParams,
    num_views: int,
    hw: DataNode | None,
    dtype: str = "float32",
) -> DataNode:
    """A chain's crops [V,3,S,S] (decode `dtype`) from the decoded image [H,W,3] and its records ([V,...] fields):
    each window resampled to S x S, mirrored where its flip bit says, colour-jittered and normalised.

    hw may be None only for views drawn in this graph (they carry their window in pixels).
    """
    if views.window is not None:
        anchor, size = views.window
    elif hw is None:
        raise ValueError("replayed views need their images' (height, width) to find their crop windows")
    else:
        anchor = fn.cast(to_pixels(views.crop_anchor, hw), dtype=DALIDataType.FLOAT)
        size = fn.cast(to_pixels(views.crop_shape, hw), dtype=DALIDataType.FLOAT)
    if num_views == 1:
        frames = fn.expand_dims(decoded, axes=[0], new_axis_names="F")  # a view of the image, no copy
    else:
        frames = fn.stack(*[decoded] * num_views, axis=0, axis_name="F")
    grid = SUPERSAMPLE * params.view_size
    frames = fn.warp_affine(
        frames,
        matrix=fn.per_frame(_grid_to_window(anchor, size, grid)),
        size=[grid, grid],
        interp_type=DALIInterpType.INTERP_LINEAR,
        fill_value=0,
    )
    side = params.view_size
    frames = resized(frames, size=[side, side], interp_type=DALIInterpType.INTERP_LINEAR, antialias=True)
    # The flip as a map of whole pixels (x -> side-1-x, samples at pixel centres exactly): a flipped crop is the
    # exact mirror of the same crop unflipped, which folding the flip into the window's map would not give.
    frames = fn.warp_affine(
        frames,
        matrix=fn.per_frame(_mirror(views.flip, side)),
        size=[side, side],
        interp_type=DALIInterpType.INTERP_LINEAR,
    )
    jitter = views.jitter
    frames = fn.color_twist(
        frames,
        brightness=fn.per_frame(jitter[:, 0]),
        contrast=fn.per_frame(jitter[:, 1]),
        saturation=fn.per_frame(jitter[:, 2]),
        hue=fn.per_frame(jitter[:, 3] * 360.0),
    )
    return normalize(frames, params.mean, params.std, dtype=dtype, layout="FCHW")


def _grid_to_window(anchor: DataNode, size: DataNode, grid: int) -> DataNode:
    """Per frame, the 2x3 matrix taking a point (x, y) of the grid x grid output to its point in the image: the
    window's corner plus (x, y) scaled by window / grid."""
    zero = size[:, 0] * 0.0
    row_x = fn.stack(size[:, 1] / float(grid), zero, anchor[:, 1], axis=1)
    row_y = fn.stack(zero, size[:, 0] / float(grid), anchor[:, 0], axis=1)
    return fn.stack(row_x, row_y, axis=1)


def _mirror(flip: DataNode, side: int) -> DataNode:
    """Per frame, [[1, 0, 0], [0, 1, 0]] (unchanged) or [[-1, 0, side], [0, 1, 0]] (mirrored left to right)."""
    flip = fn.cast(flip, dtype=DALIDataType.FLOAT)
    zero = flip * 0.0
    row_x = fn.stack(1.0 - 2.0 * flip, zero, flip * float(side), axis=1)
    row_y = fn.stack(zero, zero + 1.0, zero, axis=1)
    return fn.stack(row_x, row_y, axis=1)


def replay_crop(
    encoded: DataNode,
    view: View,
    params: AugmentParams,
    decode_device: str,
    decode: DecodeParams = DEFAULT_DECODE,
) -> DataNode:
    """One recorded multi-crop view per sample (anchor and shape [2], flip [], jitter [4]) rendered again: a chain
    of one crop through cut_views, [3,S,S]."""
    hw = image_hw(encoded)
    one = _view(fn.expand_dims(field, axes=[0]) for field in _fields(view))
    crops = cut_views(decode_full(encoded, decode_device, decode), one, params, 1, hw, decode.dtype)
    return fn.squeeze(crops, axes=[0])
