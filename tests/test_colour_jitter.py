"""Colour jitter as recorded: the view record keeps the hue shift in turns of the colour wheel (torchvision's
meaning); DALI's colour twist takes degrees and turns the chroma in YIQ space. A record of h turns must turn every
saturated pixel's chroma by 360·h degrees — a turns/degrees mix-up would leave the hue almost untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dali_kd.data.batch import ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.pipelines.params import AugmentParams
from dali_kd.teacher_cache.renderer import DaliViewRenderer

PARAMS = AugmentParams(view_size=32)


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    """One saturated image holding every hue (a colour wheel unrolled), at several brightnesses."""
    root = tmp_path_factory.mktemp("wheel")
    height, width = 48, 64
    hue = np.linspace(0, 1, width, endpoint=False)[None, :].repeat(height, 0)
    value = np.linspace(0.5, 1.0, height)[:, None].repeat(width, 1)
    hsv = np.stack([hue, np.full_like(hue, 0.9), value], axis=-1)
    (root / "wheel").mkdir()
    Image.fromarray((hsv * 255).astype(np.uint8), mode="HSV").convert("RGB").save(root / "wheel" / "0.png")
    return DaliViewRenderer(ImageIndex.from_folder(root), PARAMS, batch_size=1)


def render(renderer, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0) -> torch.Tensor:
    view = ViewRecord(
        crop_anchor=torch.zeros(1, 2), crop_shape=torch.ones(1, 2), flip=torch.zeros(1, dtype=torch.int64),
        jitter=torch.tensor([[brightness, contrast, saturation, hue]], dtype=torch.float32),
    )  # fmt: skip
    images = renderer.render(torch.tensor([0]), view)
    return images * torch.tensor(PARAMS.std).view(1, 3, 1, 1) + torch.tensor(PARAMS.mean).view(1, 3, 1, 1)


def chroma(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(angle, length) of each pixel's (I, Q) chroma vector in YIQ space."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    i = 0.596 * r - 0.274 * g - 0.322 * b
    q = 0.211 * r - 0.523 * g + 0.312 * b
    return torch.atan2(q, i), torch.sqrt(i * i + q * q)


@pytest.mark.parametrize("turns", [0.05, 0.1, -0.2, 0.3])
def test_hue_turns_the_colour_wheel_by_the_recorded_turns(renderer, turns):
    angle0, length0 = chroma(render(renderer))
    angle, _ = chroma(render(renderer, hue=turns))
    turned = torch.remainder(angle0 - angle + math.pi, 2 * math.pi) - math.pi  # DALI turns (I, Q) clockwise
    saturated = length0 > 0.1
    assert saturated.float().mean() > 0.5
    assert math.degrees(float(turned[saturated].median())) == pytest.approx(360 * turns, abs=2.0)


def test_saturation_and_contrast_scale_as_recorded(renderer):
    _, length0 = chroma(render(renderer))
    _, length = chroma(render(renderer, saturation=0.5))
    saturated = length0 > 0.1
    assert float((length[saturated] / length0[saturated]).median()) == pytest.approx(0.5, abs=0.05)
    flat, strong = render(renderer, contrast=0.5), render(renderer, contrast=1.5)
    assert float(flat.std()) < float(render(renderer).std()) < float(strong.std())
