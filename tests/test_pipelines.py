"""The DALI pipelines in CPU-only mode (same graph code as the GPU): outputs, view records, replay, the stream."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_kd.config import StreamSettings
from dali_kd.data.batch import ViewRecord
from dali_kd.data.dali_loader import DaliTrainStream, dali_eval_batches
from dali_kd.data.dataset import ImageIndex
from dali_kd.errors import UserError
from dali_kd.pipelines.params import AugmentParams, EvalParams
from dali_kd.teacher_cache.renderer import DaliViewRenderer

MEAN = torch.tensor(AugmentParams().mean).view(1, 3, 1, 1)
STD = torch.tensor(AugmentParams().std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def index(image_tree) -> ImageIndex:
    return ImageIndex.from_folder(image_tree / "train")


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def stream_of(index, params, batch_size, seed) -> DaliTrainStream:
    """A CPU DALI stream over index with the data section's defaults."""
    return DaliTrainStream(StreamSettings.with_defaults(params, batch_size, seed), index)


def test_train_batch_shapes_dtypes_and_ranges(index):
    stream = stream_of(index, AugmentParams(view_size=40), 8, 0)
    (batch,) = take(stream, 1)
    assert batch.images.shape == (8, 3, 40, 40) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.sample_ids.dtype == torch.int64
    assert batch.view.crop_anchor.shape == (8, 2) and batch.view.jitter.shape == (8, 4)
    assert batch.view.flip.dtype == torch.int64
    pixels = batch.images * STD + MEAN
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    assert batch.images.std() > 0.1, "normalised images should not be flat"
    expected = torch.tensor([index.labels[i] for i in batch.sample_ids])
    assert torch.equal(batch.labels, expected)


def test_crop_windows_respect_scale_and_ratio(index):
    params = AugmentParams(view_size=16, crop_scale=(0.3, 0.6), crop_ratio=(0.8, 1.25))
    stream = stream_of(index, params, 16, 1)
    sizes = {i: Image.open(f).size for i, f in enumerate(index.files)}  # (W, H)
    in_range = total = 0
    for batch in take(stream, 6):
        anchor, shape = batch.view.crop_anchor, batch.view.crop_shape
        assert (anchor >= 0).all() and (anchor + shape <= 1 + 1e-6).all()
        for sid, (h, w) in zip(batch.sample_ids.tolist(), shape.tolist(), strict=True):
            W, H = sizes[sid]
            area, ratio = h * w, (w * W) / (h * H)
            # One pixel of rounding on each side of the window.
            tol = 2.0 / min(W, H)
            in_range += 0.3 - tol <= area <= 0.6 + tol and 0.8 - tol * 2 <= ratio <= 1.25 + tol * 2
            total += 1
    # RandomResizedCrop falls back to a centre crop when 10 tries fail; that is rare for these settings.
    assert in_range / total >= 0.9


def test_jitter_factors_in_range_and_identity_when_off(index):
    params = AugmentParams(
        view_size=16, jitter_prob=0.5, brightness=0.3, contrast=0.2, saturation=0.1, hue=0.05
    )
    jitter = torch.cat([b.view.jitter for b in take(stream_of(index, params, 16, 2), 6)])
    for column, strength, centre in zip(range(4), (0.3, 0.2, 0.1, 0.05), (1, 1, 1, 0), strict=True):
        values = jitter[:, column]
        assert (values >= centre - strength - 1e-6).all() and (values <= centre + strength + 1e-6).all()
    identity = (jitter == torch.tensor([1.0, 1.0, 1.0, 0.0])).all(dim=1).float().mean()
    assert 0.25 < identity < 0.75, "about half the views should be un-jittered with jitter_prob=0.5"
    off = AugmentParams(view_size=16, jitter_prob=0.0)
    jitter = take(stream_of(index, off, 16, 2), 1)[0].view.jitter
    assert (jitter == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()


def test_flip_probability_is_honoured(index):
    never = take(
        stream_of(index, AugmentParams(view_size=16, flip_prob=0.0), 16, 3),
        3,
    )
    always = take(
        stream_of(index, AugmentParams(view_size=16, flip_prob=1.0), 16, 3),
        3,
    )
    assert all((b.view.flip == 0).all() for b in never) and all((b.view.flip == 1).all() for b in always)


def test_replayed_views_render_the_same_pixels(index):
    params = AugmentParams(view_size=32)
    (batch,) = take(stream_of(index, params, 8, 4), 1)
    images = batch.images.clone()
    again = DaliViewRenderer(index, params, batch_size=8).render(batch.sample_ids, batch.view)
    assert torch.allclose(again, images, atol=1e-5)
    # A different view of the same files renders different pixels: the record, not the file, decides.
    other = ViewRecord(
        batch.view.crop_anchor * 0, batch.view.crop_shape * 0 + 1, batch.view.flip, batch.view.jitter
    )
    assert not torch.allclose(
        DaliViewRenderer(index, params, 8).render(batch.sample_ids, other), images, atol=1e-2
    )


def test_flip_really_mirrors(index):
    params = AugmentParams(view_size=24)
    renderer = DaliViewRenderer(index, params, batch_size=4)
    ids = torch.tensor([0, 5, 17, 30])
    view = ViewRecord(
        crop_anchor=torch.tensor([[0.1, 0.2]] * 4),
        crop_shape=torch.tensor([[0.7, 0.6]] * 4),
        flip=torch.zeros(4, dtype=torch.int64),
        jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 4),
    )
    plain = renderer.render(ids, view)
    view.flip = torch.ones(4, dtype=torch.int64)
    mirrored = renderer.render(ids, view)
    assert torch.equal(mirrored, plain.flip(-1))
    assert not torch.equal(mirrored, plain)


def test_stream_reshuffles_each_pass_and_crosses_pass_boundaries(index):
    n = index.num_samples  # 48
    stream = stream_of(index, AugmentParams(view_size=16), 10, 5)
    ids = torch.cat([b.sample_ids for b in take(stream, 15)]).tolist()  # 150 ids = 3 passes + 6
    passes = [ids[p * n : (p + 1) * n] for p in range(3)]
    for order in passes:
        assert sorted(order) == list(range(n)), "each pass covers every sample exactly once"
    assert passes[0] != passes[1] != passes[2], "each pass is shuffled differently"
    again = torch.cat([b.sample_ids for b in take(stream_of(index, AugmentParams(16), 10, 5), 15)])
    assert again.tolist() == ids, "same seed, same stream"


def first_pass(index, seed, rank=0, world_size=1) -> list[int]:
    """The sample ids of a stream's first pass over its share, in order."""
    settings = StreamSettings.with_defaults(AugmentParams(16), 4, seed, dali_threads=1)
    stream = DaliTrainStream(settings, index, rank=rank, world_size=world_size)
    batches = take(stream, -(-stream.num_samples // 4))
    return torch.cat([b.sample_ids for b in batches]).tolist()[: stream.num_samples]


def test_the_seed_sets_the_file_order_and_the_shards_stay_disjoint(index):
    """DALI's reader ignores its seed when it reshuffles every pass, so runs that differ only in train.seed saw
    the same images in the same order; the seed now permutes the list the reader reads."""
    seed_0, seed_1, seed_7 = first_pass(index, 0), first_pass(index, 1), first_pass(index, 7)
    assert sorted(seed_0) == sorted(seed_1) == list(range(index.num_samples))
    assert seed_0 != seed_1 and seed_0 != seed_7 and seed_1 != seed_7
    assert first_pass(index, 1) == seed_1, "same seed, same order"
    # Two ranks: augmentations seeded per rank (seed + rank), one file shuffle (seed); their shares split the data.
    rank_0 = first_pass(index, 3, rank=0, world_size=2)
    rank_1 = first_pass(index, 3, rank=1, world_size=2)
    assert sorted(rank_0 + rank_1) == list(range(index.num_samples))
    # Each rank's share is a subset chosen by the seed (not one fixed subset for every seed).
    assert set(first_pass(index, 4, rank=0, world_size=2)) != set(rank_0)


def test_eval_batches_cover_each_sample_once_in_order(image_tree):
    val = ImageIndex.from_folder(image_tree / "val")
    batches = list(dali_eval_batches(val, EvalParams(view_size=24, resize_size=28), batch_size=5))
    ids = torch.cat([b.sample_ids for b in batches]).tolist()
    assert ids == list(range(val.num_samples))
    assert [len(b) for b in batches] == [5, 5, 5, 1]
    assert batches[0].images.shape[1:] == (3, 24, 24) and batches[0].view is None
    # Deterministic: the eval transform has no randomness.
    again = next(iter(dali_eval_batches(val, EvalParams(view_size=24, resize_size=28), batch_size=5)))
    assert torch.equal(again.images, batches[0].images)


def test_eval_centre_crop_matches_a_hand_made_reference(tmp_path):
    # A 40x80 image whose left half is black and right half white: resize shorter side to 20 → 20x40,
    # centre crop 20x20 → columns 10..29 of the resized image: left half black, right half white.
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, 40:] = 255
    (tmp_path / "a").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    index = ImageIndex.from_folder(tmp_path)
    (batch,) = list(dali_eval_batches(index, EvalParams(view_size=20, resize_size=20), batch_size=1))
    pixels = batch.images * STD + MEAN
    assert pixels[0, :, :, :8].max() < 0.05 and pixels[0, :, :, 12:].min() > 0.95


def test_file_list_index_trains_on_listed_files_only(image_tree, tmp_path):
    listed = ["class_1/3.jpg", "# a comment", "", "class_0/2.jpg", "class_0/5.jpg"]
    file_list = tmp_path / "good.txt"
    file_list.write_text("\n".join(listed) + "\n")
    index = ImageIndex.from_config(str(image_tree / "train"), str(file_list))
    assert index.class_names == ("class_0", "class_1")
    assert [Path(f).relative_to(image_tree / "train").as_posix() for f in index.files] == [
        "class_0/2.jpg",
        "class_0/5.jpg",
        "class_1/3.jpg",
    ]
    assert index.labels == (0, 0, 1)
    ids = torch.cat([b.sample_ids for b in take(stream_of(index, AugmentParams(16), 3, 0), 2)])
    assert sorted(ids.tolist()[:3]) == [0, 1, 2]
    file_list.write_text("/etc/passwd\n")
    with pytest.raises(UserError, match=r"good\.txt:1: expected a path <class>/<image>"):
        ImageIndex.from_config(str(image_tree / "train"), str(file_list))
