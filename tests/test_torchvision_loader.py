"""Tests of the torchvision backend: batch structure, the step stream, view records and their replay, decode."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dali_kd.commands.demo_data import make_demo_dataset
from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.pil_views import decode_rgb, render_pil, sample_crop, sample_jitter
from dali_kd.data.sampling import share_sample_ids
from dali_kd.data.torchvision_loader import TorchvisionTrainStream, torchvision_eval_batches
from dali_kd.pipelines.params import AugmentParams, EvalParams

PARAMS = AugmentParams(view_size=24, crop_scale=(0.25, 1.0))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(
        tmp_path_factory.mktemp("data") / "demo",
        num_classes=3,
        train_per_class=4,
        val_per_class=3,
        image_size=40,
        seed=0,
    )


@pytest.fixture(scope="module")
def train_index(demo_root) -> ImageIndex:
    return ImageIndex.from_folder(demo_root / "train")


def _take(index, num_batches, params=PARAMS, batch_size=5, seed=1) -> list[Batch]:
    stream = TorchvisionTrainStream(StreamSettings.with_defaults(params, batch_size, seed), index)
    try:
        return list(itertools.islice(stream, num_batches))
    finally:
        stream.close()


def _stream_ids(batches: list[Batch]) -> list[int]:
    return torch.cat([b.sample_ids for b in batches]).tolist()


def _denormalise(images: torch.Tensor, params) -> torch.Tensor:
    mean = torch.tensor(params.mean).view(1, 3, 1, 1)
    std = torch.tensor(params.std).view(1, 3, 1, 1)
    return images * std + mean


def test_train_batch_structure(train_index):
    batch = _take(train_index, 1, batch_size=6)[0]
    assert isinstance(batch, Batch) and len(batch) == 6
    assert batch.images.shape == (6, 3, 24, 24) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.sample_ids.dtype == torch.int64
    assert batch.labels.tolist() == [train_index.labels[i] for i in batch.sample_ids.tolist()]
    view = batch.view
    assert view.crop_anchor.shape == (6, 2) and view.crop_anchor.dtype == torch.float32
    assert view.crop_shape.shape == (6, 2) and view.crop_shape.dtype == torch.float32
    assert view.flip.shape == (6,) and view.flip.dtype == torch.int64
    assert view.jitter.shape == (6, 4) and view.jitter.dtype == torch.float32
    assert ((view.crop_anchor >= 0) & (view.crop_anchor + view.crop_shape <= 1 + 1e-6)).all()
    pixels = _denormalise(batch.images, PARAMS)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # Normalised, not raw: the de-normalised values span most of [0, 1] while the stored ones leave it.
    assert pixels.max() - pixels.min() > 0.5 and batch.images.min() < -0.5


def test_stream_passes_are_reshuffled_permutations(train_index):
    n = train_index.num_samples
    batches = _take(train_index, 8, batch_size=5)
    assert all(len(b) == 5 for b in batches)
    ids = _stream_ids(batches)
    passes = [ids[p * n : (p + 1) * n] for p in range(3)]
    for order in passes:
        assert sorted(order) == list(range(n))
    assert passes[0] != passes[1] != passes[2]
    # Batch 2 holds positions 10..14: the last two of pass 0 and the first three of pass 1.
    assert batches[2].sample_ids.tolist() == passes[0][10:] + passes[1][:3]


def test_same_seed_same_stream_other_seed_other_stream(train_index):
    a, b = _take(train_index, 3, seed=3), _take(train_index, 3, seed=3)
    c = _take(train_index, 3, seed=4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.sample_ids, y.sample_ids)
        assert torch.equal(x.view.crop_anchor, y.view.crop_anchor) and torch.equal(
            x.view.jitter, y.view.jitter
        )
    assert _stream_ids(a) != _stream_ids(c)
    assert not torch.equal(a[0].view.crop_shape, c[0].view.crop_shape)


def test_worker_count_does_not_change_the_stream(train_index):
    serial = _take(train_index, 4)
    stream = TorchvisionTrainStream(
        StreamSettings.with_defaults(PARAMS, 5, 1, num_workers=2, persistent_workers=True), train_index
    )
    try:
        parallel = list(itertools.islice(stream, 4))
        # A second iter() restarts the stream at position 0, also on the reused persistent workers.
        again = list(itertools.islice(stream, 2))
    finally:
        stream.close()
    for x, y in zip(serial, parallel + again, strict=False):
        assert torch.equal(x.sample_ids, y.sample_ids) and torch.equal(x.images, y.images)
        assert torch.equal(x.view.crop_anchor, y.view.crop_anchor) and torch.equal(x.view.flip, y.view.flip)
        assert torch.equal(x.view.jitter, y.view.jitter)
    for x, y in zip(serial, again, strict=False):
        assert torch.equal(x.images, y.images)


def test_recorded_views_render_again_exactly(train_index):
    params = AugmentParams(view_size=24, crop_scale=(0.25, 1.0), jitter_prob=1.0, flip_prob=0.5)
    batches = _take(train_index, 2, params=params, batch_size=6, seed=5)
    views = 0
    for batch in batches:
        v = batch.view
        for k, sample_id in enumerate(batch.sample_ids.tolist()):
            again = render_pil(
                decode_rgb(train_index.files[sample_id]),
                v.crop_anchor[k],
                v.crop_shape[k],
                bool(v.flip[k]),
                v.jitter[k],
                params,
            )
            assert torch.equal(again, batch.images[k])
            views += 1
    assert views == 12


def test_flip_mirrors_the_same_crop(train_index):
    path = train_index.files[0]
    anchor, shape, identity = (0.1, 0.2), (0.7, 0.6), (1.0, 1.0, 1.0, 0.0)
    plain = render_pil(decode_rgb(path), anchor, shape, False, identity, PARAMS)
    mirrored = render_pil(decode_rgb(path), anchor, shape, True, identity, PARAMS)
    assert not torch.equal(plain, mirrored)
    assert torch.equal(mirrored, plain.flip(-1))


def test_jitter_factors_have_torchvision_meaning(train_index):
    path, anchor, shape = train_index.files[0], (0.0, 0.0), (1.0, 1.0)

    def render(jitter) -> torch.Tensor:
        view = render_pil(decode_rgb(path), anchor, shape, False, jitter, PARAMS)
        return _denormalise(view[None], PARAMS)[0]

    plain = render((1.0, 1.0, 1.0, 0.0))
    # Brightness multiplies; one 8-bit level of rounding is allowed.
    assert (render((0.5, 1.0, 1.0, 0.0)) - plain * 0.5).abs().max() <= 1 / 255 + 1e-6
    # Saturation 0 is grey; contrast 0 is a flat image; a half turn of hue moves the colours.
    grey = render((1.0, 1.0, 0.0, 0.0))
    assert (grey.max(dim=0).values - grey.min(dim=0).values).max() <= 1 / 255 + 1e-6
    flat = render((1.0, 0.0, 1.0, 0.0))
    assert flat.amax(dim=(1, 2)).sub(flat.amin(dim=(1, 2))).max() <= 1 / 255 + 1e-6
    assert (render((1.0, 1.0, 1.0, 0.5)) - plain).abs().mean() > 0.05


def test_sample_crop_respects_scale_and_ratio():
    params = AugmentParams(crop_scale=(0.2, 0.9), crop_ratio=(0.6, 1.5))
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for height, width in ((300, 400), (480, 320), (256, 256)):
        for _ in range(500):
            top, left, h, w = sample_crop(height, width, params, rng)
            assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
            areas.append(h * w / (height * width))
            ratios.append(w / h)
    # Whole-pixel rounding moves area and aspect by a fraction of a percent at these sizes.
    assert 0.2 * 0.99 <= min(areas) < 0.25 and 0.85 < max(areas) <= 0.9 * 1.01
    assert 0.6 * 0.99 <= min(ratios) < 0.65 and 1.4 < max(ratios) <= 1.5 * 1.01


def test_sample_crop_falls_back_to_a_centre_crop():
    # No window of at least 90% of a 10x100 strip has an aspect within [3/4, 4/3]: all 10 tries fail.
    params = AugmentParams(crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3))
    rng = np.random.default_rng(0)
    assert sample_crop(10, 100, params, rng) == (0, 43, 10, 13)
    assert sample_crop(100, 10, params, rng) == (43, 0, 13, 10)
    square = AugmentParams(crop_scale=(2.0, 3.0))
    assert sample_crop(50, 50, square, rng) == (0, 0, 50, 50)


def test_stream_crop_records_respect_scale_and_ratio(train_index):
    params = AugmentParams(view_size=16, crop_scale=(0.3, 0.8), crop_ratio=(0.75, 4 / 3))
    view = _take(train_index, 1, params=params, batch_size=24)[0].view
    area = view.crop_shape[:, 0] * view.crop_shape[:, 1]
    # The demo images are square, so the relative aspect is the pixel aspect; 40 px rounding allows ~5%.
    aspect = view.crop_shape[:, 1] / view.crop_shape[:, 0]
    assert area.min() >= 0.3 * 0.93 and area.max() <= 0.8 * 1.07
    assert aspect.min() >= 0.75 * 0.94 and aspect.max() <= 4 / 3 * 1.06
    assert area.max() - area.min() > 0.2


def test_jitter_factors_in_range_and_applied_with_jitter_prob():
    params = AugmentParams(jitter_prob=0.6, brightness=0.4, contrast=0.3, saturation=0.2, hue=0.1)
    rng = np.random.default_rng(0)
    draws = np.array([sample_jitter(params, rng) for _ in range(2000)])
    identity = np.all(draws == (1.0, 1.0, 1.0, 0.0), axis=1)
    assert abs(identity.mean() - 0.4) < 0.05
    applied = draws[~identity]
    for column, strength in enumerate((0.4, 0.3, 0.2)):
        assert applied[:, column].min() >= 1 - strength and applied[:, column].max() <= 1 + strength
        assert applied[:, column].max() - applied[:, column].min() > 1.8 * strength
    assert np.abs(applied[:, 3]).max() <= 0.1 and applied[:, 3].max() - applied[:, 3].min() > 0.18
    # Stored as float32 in the record, so the draw itself is already float32-exact.
    assert np.array_equal(applied.astype(np.float32).astype(np.float64), applied)


def test_stream_jitter_identity_when_off_and_in_range_when_on(train_index):
    off = _take(train_index, 1, params=AugmentParams(view_size=16, jitter_prob=0.0), batch_size=12)[0]
    assert torch.equal(off.view.jitter, torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(12, 4))
    on = _take(train_index, 1, params=AugmentParams(view_size=16, jitter_prob=1.0), batch_size=12)[0]
    j = on.view.jitter
    assert (j[:, 0] - 1).abs().max() <= 0.4 and (j[:, 1] - 1).abs().max() <= 0.4
    assert (j[:, 2] - 1).abs().max() <= 0.2 and j[:, 3].abs().max() <= 0.1
    assert not (j == torch.tensor([1.0, 1.0, 1.0, 0.0])).all(dim=1).any()


def test_flip_share_follows_flip_prob(train_index):
    def share(flip_prob: float) -> float:
        params = AugmentParams(view_size=8, flip_prob=flip_prob, jitter_prob=0.0)
        return (
            torch.cat([b.view.flip for b in _take(train_index, 4, params=params, batch_size=100)])
            .float()
            .mean()
        )

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    # 400 draws: a standard deviation of about 0.023 around 0.3.
    assert abs(share(0.3) - 0.3) < 0.08


def test_shards_are_disjoint_contiguous_and_cover_everything(train_index):
    for num_samples, world_size in ((12, 3), (13, 4), (7, 7), (1000, 6)):
        shards = [share_sample_ids(num_samples, r, world_size) for r in range(world_size)]
        assert np.array_equal(np.concatenate(shards), np.arange(num_samples))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    seen = []
    for rank in range(3):
        stream = TorchvisionTrainStream(
            StreamSettings.with_defaults(AugmentParams(view_size=8), 4, 0),
            train_index,
            rank=rank,
            world_size=3,
        )
        try:
            assert stream.num_samples == 4
            # One batch of 4 is exactly one pass over this shard's 4 samples.
            ids = _stream_ids(list(itertools.islice(stream, 1)))
        finally:
            stream.close()
        assert sorted(ids) == list(range(4 * rank, 4 * rank + 4))
        seen += ids
    assert sorted(seen) == list(range(train_index.num_samples))


def test_bad_stream_arguments(train_index):
    with pytest.raises(ValueError, match="rank"):
        TorchvisionTrainStream(StreamSettings.with_defaults(PARAMS, 4, 0), train_index, rank=3, world_size=3)
    with pytest.raises(ValueError, match="empty"):
        share_sample_ids(2, 0, 3)
    with pytest.raises(ValueError, match="batch_size"):
        TorchvisionTrainStream(StreamSettings.with_defaults(PARAMS, 0, 0), train_index)


def test_eval_batches_cover_the_index_in_order(demo_root, train_index):
    val = ImageIndex.from_folder(demo_root / "val", train_index.class_names)
    params = EvalParams(view_size=16, resize_size=20)
    batches = list(torchvision_eval_batches(val, params, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 1]
    assert _stream_ids(batches) == list(range(val.num_samples))
    assert torch.cat([b.labels for b in batches]).tolist() == list(val.labels)
    for b in batches:
        assert b.view is None and b.images.shape[1:] == (3, 16, 16) and b.images.dtype == torch.float32
        assert b.labels.dtype == torch.int64 and b.sample_ids.dtype == torch.int64
        pixels = _denormalise(b.images, params)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    parallel = list(torchvision_eval_batches(val, params, batch_size=4, num_workers=2))
    assert all(torch.equal(x.images, y.images) for x, y in zip(batches, parallel, strict=True))


def test_decode_scales_16_bit_drops_alpha_and_applies_exif(tmp_path):
    deep = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.asarray(decode_rgb(str(tmp_path / "deep.png")))[0, :, 0].tolist() == [0, 1, 128, 255]

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "clear.png")
    decoded = decode_rgb(str(tmp_path / "clear.png"))
    assert decoded.mode == "RGB" and np.asarray(decoded)[0, 0].tolist() == [200, 100, 50]

    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    assert decode_rgb(str(tmp_path / "rotated.jpg")).size == (10, 30)


def test_view_is_relative_to_the_exif_transposed_image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 60, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.png", exif=exif)
    index = ImageIndex(root=tmp_path, files=(str(tmp_path / "r.png"),), labels=(0,), class_names=("a",))
    params = AugmentParams(view_size=8, crop_scale=(1.0, 1.0), crop_ratio=(1 / 3, 1 / 3), jitter_prob=0.0)
    view = _take(index, 1, params=params, batch_size=1)[0].view
    # The decoded image is 20 wide and 60 tall, so a 1:3 window covers it whole.
    assert torch.allclose(view.crop_shape, torch.tensor([[1.0, 1.0]]))
    assert math.isclose(float(view.crop_anchor.abs().sum()), 0.0)
