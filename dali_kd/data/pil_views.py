"""The torchvision backend's views in PIL: an image decoded as DALI decodes it, a random view drawn as torchvision's
transforms draw it, and a view rendered from its record (so a recorded view can be rendered again)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from dali_kd.pipelines.params import IDENTITY_JITTER, AugmentParams

# torchvision's RandomResizedCrop draws this many windows before it falls back to a centre crop.
CROP_ATTEMPTS = 10


def decode_rgb(path: str | BinaryIO) -> Image.Image:
    """Decode (a file's path, or a sample's bytes from a shard) as DALI does: EXIF orientation applied, 16-bit scaled (not clipped) to 8 bits, alpha dropped."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            # Pillow's convert() clips values above 255, turning most 16-bit greys white. Mode "I" is how older
            # Pillow versions open 16-bit grey PNGs, so it is read as 16-bit too.
            deep = np.asarray(img).astype(np.int64).clip(0, 65535)
            img = Image.fromarray(((deep * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        elif img.mode == "P":
            # A palette with transparency warns when converted straight to RGB; via RGBA it drops alpha cleanly.
            img = img.convert("RGBA")
        return img.convert("RGB")


def sample_crop(
    height: int, width: int, params: AugmentParams, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, height, width) in pixels."""
    area = height * width
    log_ratio = (math.log(params.crop_ratio[0]), math.log(params.crop_ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(params.crop_scale[0], params.crop_scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(params.crop_ratio):
        w = width
        h = int(round(w / min(params.crop_ratio)))
    elif in_ratio > max(params.crop_ratio):
        h = height
        w = int(round(h * max(params.crop_ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_jitter(params: AugmentParams, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue) as torchvision's ColorJitter draws them, or the identity."""
    # All draws are made whether or not the jitter applies, so each sample uses a fixed number of draws.
    apply = rng.uniform() < params.jitter_prob
    strengths = (params.brightness, params.contrast, params.saturation)
    b, c, s = (rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength) for strength in strengths)
    hue = rng.uniform(-params.hue, params.hue)
    if not apply:
        return IDENTITY_JITTER
    # Rounded to float32 here because the view record stores float32: replaying it must use the same numbers.
    b, c, s, hue = np.array([b, c, s, hue], dtype=np.float32).tolist()
    return b, c, s, hue


def _pixel_box(
    anchor: Sequence[float], shape: Sequence[float], height: int, width: int
) -> tuple[int, int, int, int]:
    h = min(max(1, round(float(shape[0]) * height)), height)
    w = min(max(1, round(float(shape[1]) * width)), width)
    top = min(max(0, round(float(anchor[0]) * height)), height - h)
    left = min(max(0, round(float(anchor[1]) * width)), width - w)
    return top, left, h, w


def render_pil(
    img: Image.Image,
    anchor: Sequence[float],
    shape: Sequence[float],
    flip: bool,
    jitter: Sequence[float],
    params: AugmentParams,
) -> torch.Tensor:
    """Render a view of a decoded image (relative anchor and shape, flip, jitter): float32 [3, S, S], normalised."""
    top, left, h, w = _pixel_box(anchor, shape, img.height, img.width)
    size = [params.view_size, params.view_size]
    # On a PIL image this is crop-then-resize with PIL's bilinear filter, which antialiases when shrinking.
    out = TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
    if flip:
        out = TF.hflip(out)
    brightness, contrast, saturation, hue = (float(f) for f in jitter)
    # Identity factors are skipped rather than applied: PIL's hue round trip through HSV is not lossless.
    if brightness != 1.0:
        out = TF.adjust_brightness(out, brightness)
    if contrast != 1.0:
        out = TF.adjust_contrast(out, contrast)
    if saturation != 1.0:
        out = TF.adjust_saturation(out, saturation)
    if hue != 0.0:
        out = TF.adjust_hue(out, hue)
    return TF.normalize(TF.to_tensor(out), params.mean, params.std)


def draw_view(
    img: Image.Image, params: AugmentParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, bool, tuple[float, float, float, float]]:
    """One random view of img as a record: relative anchor and shape (float32), flip, jitter."""
    top, left, h, w = sample_crop(img.height, img.width, params, rng)
    flip = bool(rng.uniform() < params.flip_prob)
    jitter = sample_jitter(params, rng)
    # The record is what gets rendered, so replaying the float32 record cannot land on another pixel box.
    anchor = np.array([top / img.height, left / img.width], dtype=np.float32)
    shape = np.array([h / img.height, w / img.width], dtype=np.float32)
    return anchor, shape, flip, jitter
