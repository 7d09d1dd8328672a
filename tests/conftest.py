"""Shared test fixtures: small generated image trees and configs (no downloads, no ../shared needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_kd.config import load_config

# Real odd and broken image files from Pillow's and DALI_extra's test assets (sources and licences: SOURCES.md there).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Scans and other caches go to a temporary folder, never to the user's ~/.cache (subprocesses inherit it)."""
    previous = os.environ.get("DALI_KD_CACHE")
    os.environ["DALI_KD_CACHE"] = str(tmp_path_factory.mktemp("dali_kd_cache"))
    yield
    if previous is None:
        os.environ.pop("DALI_KD_CACHE", None)
    else:
        os.environ["DALI_KD_CACHE"] = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_tree(root: Path, num_classes: int, per_class: int, seed: int = 0) -> Path:
    """root/class_<c>/<i>.jpg: varied sizes and aspect ratios; class c is a bright square in one of 4 places."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
            img = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
            y, x = (c // 2) % 2, c % 2
            img[y * h // 2 : (y + 1) * h // 2, x * w // 2 : (x + 1) * w // 2] += 150
            Image.fromarray(img).save(root / f"class_{c}" / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """12 train images per class in 4 classes, plus a 4-per-class val split."""
    base = tmp_path_factory.mktemp("images")
    write_tree(base / "train", num_classes=4, per_class=12, seed=0)
    write_tree(base / "val", num_classes=4, per_class=4, seed=1)
    return base


def tiny_overrides(image_tree: Path, tmp_path: Path) -> list[str]:
    """Overrides for a valid config over image_tree's train split with tiny random-init models, on the CPU."""
    return [
        f"data.root={image_tree / 'train'}",
        "data.image_size=32",
        "data.eval_resize=36",
        "data.dali_threads=1",
        "model.teacher.name=test_resnet",
        "model.teacher.checkpoint=null",
        "model.teacher.num_classes=4",
        "model.student.name=test_vit",
        "train.batch_size=8",
        "train.compile_student=false",
        "train.num_workers=0",
        "train.log_every_n_steps=1",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.device=cpu",
    ]


@pytest.fixture
def tiny_config(image_tree, tmp_path):
    """A valid config over image_tree with tiny random-init models: builds overrides, returns a loader function."""

    def make(*overrides: str):
        base = [
            *tiny_overrides(image_tree, tmp_path),
            f"data.val_root={image_tree / 'val'}",
            "train.epochs=2",
            "train.max_steps_per_epoch=3",
            "train.run_name=test",
        ]
        return load_config(overrides=base + list(overrides))

    return make
