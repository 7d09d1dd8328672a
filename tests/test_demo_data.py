"""Tests of the demo dataset maker: layout, determinism, the completeness marker and that the task is learnable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dali_kd.commands.demo_data import (
    CLASS_NAMES,
    FINE_CLASS_NAMES,
    MARKER_NAME,
    demo_dataset_ready,
    make_demo_dataset,
)
from dali_kd.data.dataset import ImageIndex
from dali_kd.errors import UserError

SMALL = {"num_classes": 4, "train_per_class": 3, "val_per_class": 2, "image_size": 32, "seed": 7}


def _tree(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_layout_counts_and_marker(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    assert root == tmp_path / "demo"
    for split, per_class in (("train", 3), ("val", 2)):
        index = ImageIndex.from_folder(root / split)
        assert index.class_names == tuple(sorted(CLASS_NAMES[:4]))
        assert np.bincount(index.labels).tolist() == [per_class] * 4
        assert all(f.endswith(".jpg") for f in index.files)
        with Image.open(index.files[0]) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    marker = json.loads((root / MARKER_NAME).read_text())
    assert {k: marker[k] for k in SMALL} == SMALL
    assert demo_dataset_ready(root, **SMALL)
    # Nothing is left beside the dataset: the staging folder was renamed into place.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_deterministic_in_seed(tmp_path):
    a = _tree(make_demo_dataset(tmp_path / "a", **SMALL))
    b = _tree(make_demo_dataset(tmp_path / "b", **SMALL))
    c = _tree(make_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 8}))
    assert a == b
    images = [k for k in a if k.endswith(".jpg")]
    assert images and all(a[k] != c[k] for k in images)


def test_ready_false_for_changed_params_or_missing_marker(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    for key, value in (("num_classes", 3), ("train_per_class", 4), ("val_per_class", 1), ("image_size", 40)):
        assert not demo_dataset_ready(root, **{**SMALL, key: value}), key
    assert not demo_dataset_ready(root, **{**SMALL, "seed": 0})
    (root / MARKER_NAME).unlink()
    assert not demo_dataset_ready(root, **SMALL)
    assert not demo_dataset_ready(tmp_path / "missing", **SMALL)


def test_regenerates_after_interruption_or_changed_params(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    # An interrupted run leaves a tree without the marker, possibly short of files.
    (root / MARKER_NAME).unlink()
    for f in (root / "train" / CLASS_NAMES[0]).iterdir():
        f.unlink()
    make_demo_dataset(root, **SMALL)
    assert demo_dataset_ready(root, **SMALL)
    assert len(list((root / "train" / CLASS_NAMES[0]).iterdir())) == 3

    bigger = {**SMALL, "train_per_class": 5, "num_classes": 3}
    make_demo_dataset(root, **bigger)
    assert demo_dataset_ready(root, **bigger) and not demo_dataset_ready(root, **SMALL)
    index = ImageIndex.from_folder(root / "train")
    assert len(index.class_names) == 3 and index.num_samples == 15


def test_ready_dataset_is_not_rewritten(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    stamp = (root / MARKER_NAME).stat().st_mtime_ns
    (root / "train" / "note.txt").write_text("kept")
    make_demo_dataset(root, **SMALL)
    assert (root / MARKER_NAME).stat().st_mtime_ns == stamp
    assert (root / "train" / "note.txt").exists()


def test_refuses_to_replace_a_folder_with_foreign_files(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not demo data"):
        make_demo_dataset(root, **SMALL)
    assert (root / "thesis.tex").read_text() == "precious"


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_demo_dataset(tmp_path / "d", **{**SMALL, "num_classes": len(CLASS_NAMES) + 1})
    with pytest.raises(ValueError, match="train_per_class"):
        make_demo_dataset(tmp_path / "d", **{**SMALL, "train_per_class": 0})


def _features(index: ImageIndex, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(structure, colour): the log magnitude spectrum of the grey image, and the mean RGB colour.

    The spectrum's magnitude ignores where the shape sits and which of foreground/background is brighter.
    """
    structure, colour = [], []
    for path in index.files:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        if flip:
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        grey = np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
        grey = grey - grey.mean()
        grey /= np.linalg.norm(grey) + 1e-6
        structure.append(np.log1p(20 * np.abs(np.fft.fft2(grey))).ravel())
        colour.append(np.asarray(rgb, dtype=np.float32).reshape(-1, 3).mean(0))
    return np.array(structure), np.array(colour)


def _nearest_centroid_accuracy(x_train, y_train, x_test, y_test) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    centroids = np.stack([x_train[y_train == k].mean(0) for k in np.unique(y_train)])
    predicted = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((predicted == y_test).mean())


def test_classes_differ_in_structure_not_colour(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", train_per_class=16, val_per_class=8, image_size=48, seed=0)
    train = ImageIndex.from_folder(root / "train")
    val = ImageIndex.from_folder(root / "val", train.class_names)
    y_train, y_val = np.array(train.labels), np.array(val.labels)
    s_train, c_train = _features(train)
    s_val, c_val = _features(val)
    s_flipped, _ = _features(val, flip=True)
    chance = 1 / len(train.class_names)
    # Seen here: ~0.74 on these images and ~0.76 mirrored, colour ~0.12; a small CNN does far better.
    assert _nearest_centroid_accuracy(s_train, y_train, s_val, y_val) > 5 * chance
    # A mirrored image still belongs to its class: no class is the mirror image of another.
    assert _nearest_centroid_accuracy(s_train, y_train, s_flipped, y_val) > 5 * chance
    # The label must not be readable from colour, which the colour jitter would scramble anyway.
    assert _nearest_centroid_accuracy(c_train, y_train, c_val, y_val) < 3 * chance


def test_the_fine_set_names_its_classes_in_the_marker_and_the_demo_set_does_not(tmp_path):
    fine = make_demo_dataset(tmp_path / "fine", **SMALL, classes="fine")
    assert ImageIndex.from_folder(fine / "train").class_names == tuple(sorted(FINE_CLASS_NAMES[:4]))
    assert json.loads((fine / MARKER_NAME).read_text())["classes"] == "fine"
    assert demo_dataset_ready(fine, **SMALL, classes="fine") and not demo_dataset_ready(fine, **SMALL)
    # The demo's marker is as it was before the fine set existed: demo datasets already on disk stay valid.
    shapes = make_demo_dataset(tmp_path / "shapes", **SMALL)
    assert "classes" not in json.loads((shapes / MARKER_NAME).read_text())
    with pytest.raises(ValueError, match="classes must be one of shapes, fine"):
        make_demo_dataset(tmp_path / "d", **SMALL, classes="animals")


def test_the_fine_set_is_harder_than_the_demo_but_not_colour_coded(tmp_path):
    scores = {}
    for classes in ("shapes", "fine"):
        root = make_demo_dataset(
            tmp_path / classes, train_per_class=16, val_per_class=8, image_size=48, classes=classes
        )
        train = ImageIndex.from_folder(root / "train")
        val = ImageIndex.from_folder(root / "val", train.class_names)
        s_train, c_train = _features(train)
        s_val, c_val = _features(val)
        y_train, y_val = np.array(train.labels), np.array(val.labels)
        scores[classes] = _nearest_centroid_accuracy(s_train, y_train, s_val, y_val)
        if classes == "fine":
            assert _nearest_centroid_accuracy(c_train, y_train, c_val, y_val) < 3 / len(train.class_names)
    # Seen here: the spectral nearest centroid gets ~0.74 on the demo classes and ~0.43 on the fine ones.
    assert scores["fine"] < scores["shapes"] - 0.1, scores
