"""The teacher cache's replay runs ahead of the consumer: DALI is handed the next batches' views before the current
batch is handed out (data.prefetch_batches), and looking ahead changes no pixel, no row and no resume position."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.shard_index import index_from_shards
from dali_kd.data.shard_writer import ShardOptions, make_shards
from dali_kd.data.shards import sample_key
from dali_kd.errors import TrainingStopped
from dali_kd.teacher_cache.replay_ahead import ViewsAhead
from dali_kd.teacher_cache.store import TeacherCache
from dali_kd.teacher_cache.stream import CachedViewStream
from tests.conftest import write_tree
from tests.faults import warning_said
from tests.test_cache_quarantine import BATCH, CPU, PARAMS, VIEWS, fill_directly, open_cache
from tests.test_shards_training import _spoil_sample


class RecordsRead:
    """A teacher cache that notes the rows whose view records are read: a replayed batch's records are read once,
    when the batch is planned and handed to DALI to render."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        self.batches: list[np.ndarray] = []

    def read_views(self, sample_ids, slots):
        self.batches.append(np.array(sample_ids))
        return self.cache.read_views(sample_ids, slots)

    def __getattr__(self, name):
        return getattr(self.cache, name)


@pytest.fixture
def index(tmp_path) -> ImageIndex:
    return ImageIndex.from_folder(write_tree(tmp_path / "tree", num_classes=2, per_class=8))


def replay(index, cache, prefetch_batches: int, state: dict | None = None) -> CachedViewStream:
    """A replay from the first batch on (a cache with rows not done would otherwise be filled first)."""
    settings = StreamSettings.with_defaults(
        PARAMS, BATCH, 0, dali_threads=1, prefetch_batches=prefetch_batches
    )
    return CachedViewStream(
        settings, index, CPU, state=state or {"replay_start": 0}, cache=cache, mode="replay"
    )


def same(x: Batch, y: Batch) -> bool:
    return (
        np.array_equal(x.host_ids, y.host_ids)
        and np.array_equal(x.cache.slots, y.cache.slots)
        and torch.equal(x.stream_ids, y.stream_ids)
        and torch.equal(x.images, y.images)
        and all(
            torch.equal(a.pooled, b.pooled) for a, b in zip(x.cache.targets, y.cache.targets, strict=True)
        )
    )


@pytest.mark.parametrize("prefetch_batches", [1, 2, 3])
def test_dali_has_the_next_batches_before_the_current_one_is_handed_out(index, tmp_path, prefetch_batches):
    cache = open_cache(tmp_path / "cache", index)
    fill_directly(cache, index)
    spy = RecordsRead(cache)
    stream = replay(index, spy, prefetch_batches)
    try:
        for n, batch in enumerate(itertools.islice(stream, 6)):
            # Batches 0..n were handed out; DALI holds the records of n + 1 .. n + prefetch_batches - 1 too.
            assert len(spy.batches) == n + prefetch_batches
            assert np.array_equal(spy.batches[n], batch.host_ids), (
                "batches are handed out in the order planned"
            )
            assert stream.state_dict()["position"] == (n + 1) * BATCH, (
                "the position of the batches handed out"
            )
    finally:
        stream.close()


def test_looking_ahead_changes_no_pixel_row_or_resume_position(index, tmp_path):
    cache = open_cache(tmp_path / "cache", index)
    # Two images lack a row (another view slot stands in), one lacks both (a same-class image stands in).
    fill_directly(cache, index, skip={(1, 0), (5, 1), (9, 0), (9, 1)})
    with warning_said("not done"):  # rows that stand in for missing ones
        in_turn_stream = replay(index, cache, 1)
        it = iter(in_turn_stream)
        in_turn = [next(it) for _ in range(3)]
        expected_state = in_turn_stream.state_dict()
        in_turn += [next(it) for _ in range(5)]
        in_turn_stream.close()
        ahead = replay(index, cache, 3)
        it = iter(ahead)
        first = [next(it) for _ in range(3)]
        state = ahead.state_dict()
        ahead.close()
        resumed = replay(index, cache, 3, state)
        it = iter(resumed)
        rest = [next(it) for _ in range(5)]
        resumed.close()
    assert state == expected_state and state["position"] == 3 * BATCH, (
        "the position of the batches handed out"
    )
    assert state["missing_rows"] > 0, "rows stood in before the resume"
    assert all(same(x, y) for x, y in zip(in_turn, first + rest, strict=True))
    assert any(not np.array_equal(b.host_ids, b.stream_ids.numpy()) for b in in_turn), (
        "a stand-in image shown"
    )


def test_a_batch_that_cannot_be_planned_stops_the_run_at_its_turn(index, tmp_path):
    """No row of class_1 is done: the first batch holding a class_1 slot stops the run, and every batch before it
    is handed out, however far ahead DALI was asked to render."""
    cache = open_cache(tmp_path / "cache", index)
    fill_directly(cache, index, skip={(i, k) for i in range(8, 16) for k in range(VIEWS)})

    def handed_out(prefetch_batches: int) -> list[Batch]:
        stream, batches = replay(index, cache, prefetch_batches), []
        with pytest.raises(TrainingStopped, match="no row of class class_1 can be replayed"):
            for batch in stream:
                batches.append(batch)
        stream.close()
        return batches

    in_turn, ahead = handed_out(1), handed_out(3)
    assert len(in_turn) == len(ahead) and all(same(x, y) for x, y in zip(in_turn, ahead, strict=True))


@dataclass
class Job:
    render_ids: np.ndarray
    render_view: ViewRecord


def whole_views(n: int) -> ViewRecord:
    return ViewRecord(crop_anchor=torch.zeros(n, 2), crop_shape=torch.ones(n, 2),
                      flip=torch.zeros(n, dtype=torch.int64), jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n))  # fmt: skip


@pytest.mark.parametrize("prefetch_batches", [1, 2])
def test_a_sample_spoilt_in_its_shard_is_named_by_the_replay(tmp_path, prefetch_batches):
    """DALI's own message names no sample (its bytes were fed, not read from a file): the replay names the sample
    as `<tar>:<offset>:<member>`, the name the runtime quarantine sets aside (and reports by shard and key)."""
    make_shards(write_tree(tmp_path / "tree", num_classes=2, per_class=8), tmp_path / "shards", ShardOptions(10**9), show_progress=False)  # fmt: skip
    victim = 6
    _spoil_sample(tmp_path / "shards", victim)
    index = index_from_shards(tmp_path / "shards", "data.root")
    jobs = (Job(np.arange(k, k + BATCH), whole_views(BATCH)) for k in range(0, index.num_samples, BATCH))
    ahead = ViewsAhead(jobs, index, PARAMS, BATCH, CPU, depth=prefetch_batches, num_threads=1)
    job, images = next(ahead)  # samples 0-3
    assert images.shape == (BATCH, 3, 16, 16) and np.array_equal(job.render_ids, np.arange(BATCH))
    with pytest.raises(RuntimeError) as info:
        next(ahead)  # samples 4-7
    message = str(info.value)
    assert message.startswith(f"failed to decode {index.files[victim]} (") and "\n" not in message, message
    quarantine = RuntimeQuarantine(index, 5)
    with warning_said("set aside"):
        quarantine.set_aside(message, candidates=lambda: [])  # the name alone: no other sample is checked
    assert [(e["shard"], e["key"]) for e in quarantine.take_entries()] == [
        (index.shards.where(victim)["shard"], sample_key(victim))
    ]
