"""The teacher cache and the runtime quarantine: rows per stream slot (so a fill with a stand-in completes the
cache), replay renders the resolved image with that image's own row, never a row that is not done, and a file
that breaks during replay is set aside and replaced — with no Trainer: the cache is filled here, as a trainer
fills it (rows at Batch.stream_ids, the shown image's ids as shown_ids)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.outputs import ModelOutput
from dali_kd.pipelines.params import AugmentParams
from dali_kd.teacher_cache.layout import Part
from dali_kd.teacher_cache.renderer import DaliViewRenderer
from dali_kd.teacher_cache.store import DONE, STAND_IN, TeacherCache
from dali_kd.teacher_cache.stream import CachedViewStream
from tests.conftest import write_tree
from tests.faults import warning_said

PARAMS = AugmentParams(view_size=16)
CPU = torch.device("cpu")
BATCH = 4
VIEWS = 2
GARBAGE = b"<html>gone</html>"


@pytest.fixture
def index(tmp_path) -> ImageIndex:
    return ImageIndex.from_folder(write_tree(tmp_path / "tree", num_classes=2, per_class=8))


def open_cache(directory: Path, index: ImageIndex) -> TeacherCache:
    # A stand-in teacher output: the row's image id and view slot, so each read shows whose row it is.
    return TeacherCache(directory, {"teacher": "ids"}, [Part("pooled", (2,), "float32")], index.num_samples,
                        VIEWS, create=True)  # fmt: skip


def signature(shown: np.ndarray, slots: np.ndarray) -> ModelOutput:
    return ModelOutput(pooled=torch.from_numpy(np.stack([shown, slots], 1).astype(np.float32)), logits=None,
                       patch_tokens=None)  # fmt: skip


def fill_directly(cache: TeacherCache, index: ImageIndex, skip: set[tuple[int, int]] = frozenset()) -> None:
    """Every row but `skip`, each a view of its own image (a fixed window, flip and jitter per view slot)."""
    rows = [(i, k) for i in range(index.num_samples) for k in range(VIEWS) if (i, k) not in skip]
    ids, slots = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    n = len(ids)
    view = ViewRecord(
        crop_anchor=torch.tensor([[0.1, 0.05]] * n) * torch.from_numpy(slots).float()[:, None],
        crop_shape=torch.tensor([[0.8, 0.9]] * n),
        flip=torch.from_numpy(slots % 2),
        jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n),
    )
    cache.write(ids, slots, signature(ids, slots), view)


def check_rows(cache: TeacherCache, index: ImageIndex, batch: Batch, renderer: DaliViewRenderer) -> None:
    """The batch's rows are done views of the images shown, and the images are those views of those files."""
    ids, slots = batch.host_ids, batch.cache.slots
    assert len(batch) == BATCH and torch.equal(batch.sample_ids, torch.from_numpy(ids))
    assert cache.holds_own_view(ids, slots).all(), "only rows that hold a view of their own image"
    stored = cache.read(ids, slots, CPU).pooled
    assert torch.equal(stored, signature(ids, slots).pooled)
    assert torch.equal(batch.images, renderer.render(batch.sample_ids, cache.read_views(ids, slots)))
    assert torch.equal(batch.labels, torch.tensor([index.labels[i] for i in ids]))


def replay_stream(
    index: ImageIndex, cache: TeacherCache, state: dict | None = None, prefetch_batches: int = 2
) -> CachedViewStream:
    settings = StreamSettings.with_defaults(
        PARAMS, BATCH, 0, dali_threads=1, max_runtime_quarantine=5, prefetch_batches=prefetch_batches
    )
    return CachedViewStream(settings, index, CPU, state=state, cache=cache, mode="replay")


@pytest.mark.parametrize("prefetch_batches", [1, 2, 3], ids=["in-turn", "ahead", "two-ahead"])
def test_a_file_broken_after_the_fill_is_set_aside_in_replay(index, tmp_path, prefetch_batches):
    """Rendering in turn or DALI rendering batches ahead sets the same file aside at the same batch and resumes to
    the same batches."""
    cache = open_cache(tmp_path / "cache", index)
    fill_directly(cache, index)
    assert cache.is_complete()
    stream = replay_stream(index, cache, prefetch_batches=prefetch_batches)
    assert stream.replaying, "a complete cache is replayed from the start"
    renderer = DaliViewRenderer(index, PARAMS, BATCH)
    victim = index.files.index(str(tmp_path / "tree" / "class_0" / "2.jpg"))
    Path(index.files[victim]).write_bytes(GARBAGE)
    n = index.num_samples
    it = iter(stream)
    entries, batches = [], []
    with warning_said("set aside .*class_0/2.jpg"):
        for batch in itertools.islice(it, 2 * n // BATCH):
            batches.append(batch)
            entries += stream.take_entries()
    assert [(e["path"], e["found"]) for e in entries] == [(index.files[victim], "runtime")], "reported once"
    stand_in = stream.quarantine.resolve(victim)
    assert stand_in == victim + 1
    for batch in batches:
        check_rows(cache, index, batch, renderer)
        slot_ids = batch.stream_ids.numpy()
        assert np.array_equal(batch.host_ids, np.where(slot_ids == victim, stand_in, slot_ids))
    assert sorted(torch.cat([b.stream_ids for b in batches[: n // BATCH]]).tolist()) == list(range(n))
    # A stream resumed from the state continues identically, without meeting the broken file again.
    state = stream.state_dict()
    assert state["substitutions"] == {str(victim): stand_in}
    following = list(itertools.islice(it, 2))
    resumed = replay_stream(index, cache, state, prefetch_batches)
    with warning_said(None):
        again = list(itertools.islice(resumed, 2))
    assert resumed.take_entries() == []
    for x, y in zip(following, again, strict=True):
        assert np.array_equal(x.host_ids, y.host_ids) and np.array_equal(x.cache.slots, y.cache.slots)
        assert torch.equal(x.images, y.images) and torch.equal(x.stream_ids, y.stream_ids)
    stream.close()
    resumed.close()


def test_a_row_that_is_not_done_is_never_replayed(index, tmp_path):
    cache = open_cache(tmp_path / "cache", index)
    half, none = 3, 12  # image 3 lacks view slot 0; image 12 (class 1) has no row at all
    fill_directly(cache, index, skip={(half, 0), (none, 0), (none, 1)})
    assert not cache.is_complete() and cache.rows_done() == index.num_samples * VIEWS - 3
    # As an earlier run that stopped filling early would leave it, then went on replaying.
    stream = replay_stream(index, cache, {"position": 0, "replay_start": 0})
    renderer = DaliViewRenderer(index, PARAMS, BATCH)
    n = index.num_samples
    with warning_said("not done") as said:
        batches = list(itertools.islice(stream, 3 * n // BATCH))
    assert len([line for line in said if "not done" in line]) == 1, "one warning"
    seen_none = seen_half = 0
    for batch in batches:
        check_rows(cache, index, batch, renderer)
        rows = zip(
            batch.stream_ids.tolist(), batch.host_ids.tolist(), batch.cache.slots.tolist(), strict=True
        )
        for slot_id, shown, slot in rows:
            if slot_id == none:
                seen_none += 1
                assert shown == none + 1 and index.labels[shown] == index.labels[none]
            if slot_id == half:
                seen_half += 1
                assert shown == half and slot == 1
    assert seen_none == 3 and seen_half == 3
    # Image 12's row always stood in; image 3's only when its slot 0 was scheduled.
    assert 3 <= stream.state_dict()["missing_rows"] <= 6
    assert stream.take_entries() == [], "a missing row is not a broken file"
    stream.close()


def test_a_fill_with_a_substituted_slot_completes_the_cache(index, tmp_path):
    cache = open_cache(tmp_path / "cache", index)
    stream = replay_stream(index, cache)
    assert not stream.replaying
    victim = index.files.index(str(tmp_path / "tree" / "class_1" / "5.jpg"))
    Path(index.files[victim]).write_bytes(GARBAGE)
    it = iter(stream)
    fills = 0
    with warning_said("set aside .*class_1/5.jpg"):
        while not stream.replaying:
            batch = next(it)
            fills += 1
            assert batch.stream_ids is not None and not batch.cache.from_cache
            # What the trainer does with a fill batch: store the marked rows at the stream slots.
            mask = batch.cache.store
            slot_ids, shown = batch.stream_ids.numpy()[mask], batch.sample_ids.numpy()[mask]
            picked = torch.from_numpy(mask)
            view = ViewRecord(*(getattr(batch.view, f)[picked] for f in ("crop_anchor", "crop_shape", "flip",
                                                                            "jitter")))  # fmt: skip
            slots = batch.cache.slots[mask]
            cache.write(slot_ids, slots, signature(shown, slots), view, shown_ids=shown)
    assert fills == index.num_samples * VIEWS // BATCH
    assert cache.is_complete() and cache.rows_done() == index.num_samples * VIEWS
    stand_in = stream.quarantine.resolve(victim)
    assert stand_in != victim
    # The slot's rows written after its file broke hold its stand-in's views (marked so); a row written before
    # (the stream may have read the file in time) holds its own.
    done, owner = (
        np.asarray(cache.done[victim]),
        cache.read(np.full(VIEWS, victim), np.arange(VIEWS), CPU).pooled,
    )
    assert STAND_IN in done.tolist() and set(done.tolist()) <= {DONE, STAND_IN}
    assert owner[:, 0].tolist() == [victim if d == DONE else stand_in for d in done.tolist()]
    assert (np.delete(np.asarray(cache.done), victim, axis=0) == DONE).all()
    assert [e["path"] for e in stream.take_entries()] == [index.files[victim]]
    # Replay: slot `victim` shows its stand-in with the stand-in's own rows, never its own rows.
    renderer = DaliViewRenderer(index, PARAMS, BATCH)
    replayed = list(itertools.islice(it, index.num_samples // BATCH))
    for batch in replayed:
        check_rows(cache, index, batch, renderer)
        slot_ids = batch.stream_ids.numpy()
        assert np.array_equal(batch.host_ids, np.where(slot_ids == victim, stand_in, slot_ids))
    assert stream.state_dict()["missing_rows"] == 0
    stream.close()
