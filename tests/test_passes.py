"""What each pass over the training data shows: every slot exactly once (a set-aside sample's slot too, under its own
id), in a new order from tar shards, and in a set-aside image's place one of its own class, also at a class boundary."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from dali_kd.config import StreamSettings
from dali_kd.data.dali_loader import DaliTrainStream
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.shard_index import index_from_shards
from dali_kd.data.shard_writer import ShardOptions, make_shards
from dali_kd.data.torchvision_loader import TorchvisionTrainStream
from dali_kd.pipelines.params import AugmentParams
from tests.conftest import write_tree
from tests.faults import warning_said
from tests.test_shards_training import _spoil_sample

PARAMS = AugmentParams(view_size=16)
NUM_SAMPLES = 48  # 4 classes of 12


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("passes") / "images", num_classes=4, per_class=12)


def shards_of(images: Path, out: Path, shard_bytes: int) -> ImageIndex:
    make_shards(images, out, ShardOptions(shard_bytes), show_progress=False)
    return index_from_shards(out, "test")


def slots_per_pass(stream, num_passes: int, batch_size: int) -> list[list[int]]:
    ids = []
    for batch in itertools.islice(stream, num_passes * NUM_SAMPLES // batch_size):
        ids += batch.host_stream_ids.tolist()
    return [ids[k * NUM_SAMPLES : (k + 1) * NUM_SAMPLES] for k in range(num_passes)]


def test_tar_shards_are_read_in_a_new_order_every_pass(images, tmp_path):
    index = shards_of(images, tmp_path / "shards", 40_000)  # 8 shards of about 6 images
    # A one-sample shuffle buffer: the order of a pass is the order its shards are read in.
    stream = DaliTrainStream(
        StreamSettings.with_defaults(PARAMS, 4, 0, dali_threads=1, shuffle_buffer=1), index
    )
    passes = slots_per_pass(stream, 3, 4)
    stream.close()
    shard_orders = [[index.shards.shard_of[i] for i in ids] for ids in passes]
    for ids in passes:
        assert sorted(ids) == list(range(NUM_SAMPLES))
    assert shard_orders[0] != shard_orders[1] != shard_orders[2] != shard_orders[0], (
        "the shards are reshuffled"
    )


def test_with_a_sample_set_aside_each_pass_shows_every_slot_once_under_its_own_id(images, tmp_path):
    # Two shards: every class has other samples in the spoilt sample's tar to stand in.
    index = shards_of(images, tmp_path / "shards", 200_000)
    bad = 20
    _spoil_sample(tmp_path / "shards", bad)
    with warning_said("set aside"):
        settings = StreamSettings.with_defaults(PARAMS, 4, 1, dali_threads=1, max_runtime_quarantine=5)
        stream = DaliTrainStream(settings, index)
        batches = list(itertools.islice(stream, 3 * NUM_SAMPLES // 4))
    standin = stream.quarantine.resolve(bad)
    stream.close()
    assert standin != bad
    slots = torch.cat([b.stream_ids for b in batches])
    shown = torch.cat([b.sample_ids for b in batches])
    # The last two passes (the first may hold batches from before the file was set aside).
    for k in (1, 2):
        ids = slots[k * NUM_SAMPLES : (k + 1) * NUM_SAMPLES].tolist()
        assert sorted(ids) == list(range(NUM_SAMPLES)), f"pass {k}: a slot reported twice or missing"
    late = slots[NUM_SAMPLES:]
    assert torch.equal(shown[NUM_SAMPLES:], torch.where(late == bad, torch.tensor(standin), late))


def class_edges(index: ImageIndex) -> list[int]:
    """The first and the last sample of every class."""
    edges = []
    for label in range(index.num_classes):
        ids = [i for i, lb in enumerate(index.labels) if lb == label]
        edges += [ids[0], ids[-1]]
    return edges


def test_a_stand_in_at_a_class_boundary_is_of_the_same_class(images, tmp_path):
    folder = ImageIndex.from_folder(images)
    sharded = shards_of(images, tmp_path / "shards", 200_000)
    for index in (folder, sharded):
        quarantine = RuntimeQuarantine(index, max_files=100)
        for i in class_edges(index):
            with warning_said("set aside"):
                quarantine.add(i, "test")
            standin = quarantine.resolve(i)
            assert index.labels[standin] == index.labels[i], (
                f"sample {i} stood in for by another class's image"
            )
            assert index.can_stand_in(i, standin)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_streams_show_a_same_class_image_for_the_last_image_of_a_class(tmp_path, backend):
    root = write_tree(tmp_path / "images", num_classes=4, per_class=4)
    index = ImageIndex.from_folder(root)
    last_of_class_1 = max(i for i, lb in enumerate(index.labels) if lb == 1)
    Path(index.files[last_of_class_1]).write_bytes(b"<html>gone</html>")
    with warning_said("set aside"):
        if backend == "dali":
            # The file changed after the stream started: that is how the DALI stream finds it.
            stream = DaliTrainStream(StreamSettings.with_defaults(PARAMS, 4, 2, dali_threads=1), index)
            Path(index.files[last_of_class_1]).write_bytes(b"<html>gone again</html>")
        else:
            stream = TorchvisionTrainStream(StreamSettings.with_defaults(PARAMS, 4, 2), index)
        batches = list(itertools.islice(stream, 3 * index.num_samples // 4))
    assert stream.quarantine.is_set_aside(last_of_class_1)
    stream.close()
    labels = torch.tensor(index.labels)
    for batch in batches:
        assert torch.equal(labels[batch.sample_ids], labels[batch.stream_ids]), "a slot shows another class"
        assert torch.equal(batch.labels, labels[batch.stream_ids])
