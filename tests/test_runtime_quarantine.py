"""One runtime quarantine for every stream: chains of stand-ins (i → j → k), the shared limit, warning and entries,
the stream protocol, the one shard rule, and stream_ids (the slot) next to sample_ids (the image shown)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_kd.config import StreamSettings
from dali_kd.data.dali_loader import DaliTrainStream
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_train_stream
from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.sampling import min_share_size, share_bounds, share_sample_ids, share_size
from dali_kd.data.stream import TrainStream
from dali_kd.data.torchvision_loader import TorchvisionTrainStream
from dali_kd.errors import TrainingStopped
from dali_kd.pipelines.params import AugmentParams
from dali_kd.teacher_cache.stream import make_cached_train_stream
from tests.conftest import write_tree
from tests.faults import warning_said

PARAMS = AugmentParams(view_size=16)
GARBAGE = b"<html>gone</html>"


def tree_index(root: Path, num_classes: int = 2, per_class: int = 8) -> ImageIndex:
    return ImageIndex.from_folder(write_tree(root, num_classes=num_classes, per_class=per_class))


def break_file(path: str) -> None:
    Path(path).write_bytes(GARBAGE)


# ---- RuntimeQuarantine -------------------------------------------------------------------------------------------
def test_a_stand_in_that_fails_later_is_followed_to_the_end_of_its_chain(tmp_path):
    index = tree_index(tmp_path / "tree")
    quarantine = RuntimeQuarantine(index, max_files=10)
    a = index.files.index(str(tmp_path / "tree" / "class_1" / "3.jpg"))
    with warning_said("set aside .*3.jpg"):
        assert quarantine.set_aside(f"Error decoding {index.files[a]} : bad") == [a]
    b = quarantine.substitutions[a]
    assert b == a + 1 and index.labels[b] == index.labels[a]
    assert quarantine.resolve(a) == b
    # Slot a now reads b; b fails too. The error names b's file, which is what slot a (and slot b) read.
    files, shown = quarantine.effective()
    assert files[a] == index.files[b]
    with warning_said(f"set aside {index.files[b]}"):
        assert quarantine.set_aside(f"Error decoding {index.files[b]} : bad") == [b]
    c = quarantine.substitutions[b]
    assert c not in (a, b) and index.labels[c] == index.labels[a]
    files, shown = quarantine.effective()
    assert shown[a] == shown[b] == c and files[a] == files[b] == index.files[c], "a → b → c is followed"
    assert quarantine.shown_ids() == shown
    assert [e["path"] for e in quarantine.take_entries()] == [index.files[a], index.files[b]]
    # A quarantine built from the state reads the same chain.
    again = RuntimeQuarantine(index, 10, {int(k): v for k, v in quarantine.state_dict().items()})
    assert again.resolve(a) == c and again.effective() == (files, shown)


def test_the_limit_the_warning_and_the_entry_are_shared(tmp_path):
    index = tree_index(tmp_path / "tree")
    quarantine = RuntimeQuarantine(index, max_files=1)
    with warning_said(r"set aside .*0.jpg: it failed to decode \(OSError: x\); continuing"):
        assert quarantine.add(0, "OSError: x")
    with warning_said(None):
        assert not quarantine.add(0, "OSError: again"), "a file is set aside once"
    assert quarantine.take_entries() == [
        {"path": index.files[0], "reason": "decode failed during training: OSError: x", "found": "runtime"}
    ]
    assert quarantine.take_entries() == []
    with pytest.raises(TrainingStopped, match=r"more than data.max_runtime_quarantine=1 files .*1.jpg"):
        quarantine.add(1, "OSError: y")


def test_an_error_naming_no_file_stops_the_run(tmp_path):
    quarantine = RuntimeQuarantine(tree_index(tmp_path / "tree"), max_files=5)
    with pytest.raises(TrainingStopped, match="decoding failed and the file could not be identified"):
        quarantine.set_aside("decoding failed somewhere")


# ---- end to end: DALI ---------------------------------------------------------------------------------------------
def test_dali_stream_keeps_going_when_a_stand_in_breaks_mid_run(tmp_path):
    index = tree_index(tmp_path / "tree")
    n, per_pass = index.num_samples, index.num_samples // 4
    a = index.files.index(str(tmp_path / "tree" / "class_1" / "3.jpg"))
    stream = DaliTrainStream(
        StreamSettings.with_defaults(PARAMS, 4, 3, dali_threads=1, max_runtime_quarantine=5), index, "cpu"
    )
    # DALI's message names no file for content that is not an image: the quarantine finds the files that
    # changed since the stream started, so both files break after that.
    break_file(index.files[a])
    entries, batches = [], []
    with warning_said("set aside"):
        it = iter(stream)
        while not entries:
            batches.append(next(it))
            entries += stream.take_entries()
            assert len(batches) < 3 * per_pass, "file a was never set aside"
        b = stream.quarantine.substitutions[a]
        break_file(index.files[b])  # the stand-in breaks mid-run
        # At least four more passes, ending at a pass boundary.
        for batch in itertools.islice(it, 4 * per_pass + (-len(batches)) % per_pass):
            batches.append(batch)
            entries += stream.take_entries()
    substitutions = stream.state_dict()["substitutions"]
    stream.close()
    assert [e["path"] for e in entries] == [index.files[a], index.files[b]]
    assert all(e["found"] == "runtime" for e in entries)
    c = stream.quarantine.resolve(a)
    assert c not in (a, b) and stream.quarantine.resolve(b) == c and index.labels[c] == index.labels[a]
    assert all(len(batch) == 4 for batch in batches), "every batch full"
    # The last two passes: every slot once; slots a and b show c, everything else itself.
    last = batches[-2 * per_pass :]
    slots = torch.cat([x.stream_ids for x in last])
    shown = torch.cat([x.sample_ids for x in last])
    for p in range(2):
        assert sorted(slots[p * n : (p + 1) * n].tolist()) == list(range(n))
    expected = torch.where((slots == a) | (slots == b), torch.tensor(c), slots)
    assert torch.equal(shown, expected)
    assert torch.equal(torch.cat([x.labels for x in last]), torch.tensor(index.labels)[shown])
    assert substitutions == {str(a): b, str(b): c}


def test_stream_ids_equal_sample_ids_on_healthy_data(tmp_path):
    index = tree_index(tmp_path / "tree")
    stream = DaliTrainStream(StreamSettings.with_defaults(PARAMS, 4, 0, dali_threads=1), index, "cpu")
    for batch in itertools.islice(stream, 5):
        assert batch.stream_ids.dtype == torch.int64 and torch.equal(batch.stream_ids, batch.sample_ids)
        assert batch.stream_ids.device == batch.sample_ids.device
        moved = batch.to("cpu")
        assert torch.equal(moved.stream_ids, batch.stream_ids)
    stream.close()


# ---- end to end: torchvision --------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_torchvision_stream_sets_aside_through_the_runtime_quarantine(tmp_path, num_workers):
    index = tree_index(tmp_path / "tree")
    n = index.num_samples
    a = index.files.index(str(tmp_path / "tree" / "class_0" / "5.jpg"))
    break_file(index.files[a])

    def make(state: dict | None = None) -> TorchvisionTrainStream:
        settings = StreamSettings.with_defaults(PARAMS, 4, 1, num_workers=num_workers)
        return TorchvisionTrainStream(settings, index, state=state)

    stream = make()
    it = iter(stream)
    with warning_said("set aside .*5.jpg"):
        first = list(itertools.islice(it, n // 4))
    assert len(stream.worker_pids()) == num_workers
    entries = stream.take_entries()
    assert [(e["path"], e["found"]) for e in entries] == [(index.files[a], "runtime")]
    assert entries[0]["reason"].startswith("decode failed during training: ")
    b = stream.quarantine.resolve(a)
    assert b == a + 1
    slots, shown = torch.cat([x.stream_ids for x in first]), torch.cat([x.sample_ids for x in first])
    assert sorted(slots.tolist()) == list(range(n))
    assert torch.equal(shown, torch.where(slots == a, torch.tensor(b), slots))
    state = stream.state_dict()
    assert state["substitutions"] == {str(a): b}
    # The stand-in breaks too (workers may have read a pass ahead): slot a is read through a → b → c.
    break_file(index.files[b])
    with warning_said(f"set aside {index.files[b]}"):
        list(itertools.islice(it, 2 * n // 4))
    c = stream.quarantine.resolve(a)
    assert c == b + 1 and stream.quarantine.resolve(b) == c
    assert [e["path"] for e in stream.take_entries()] == [index.files[b]]
    state = stream.state_dict()
    final = list(itertools.islice(it, n // 4))
    stream.close()
    final_slots, final_shown = (
        torch.cat([x.stream_ids for x in final]),
        torch.cat([x.sample_ids for x in final]),
    )
    assert torch.equal(final_shown, torch.where((final_slots == a) | (final_slots == b), c, final_slots))
    # A stream resumed from that state reads c for slots a and b at once and reports nothing.
    resumed = make(state)
    with warning_said(None):
        again = list(itertools.islice(resumed, n // 4))
    resumed.close()
    assert resumed.take_entries() == []
    for x, y in zip(final, again, strict=True):
        assert torch.equal(x.sample_ids, y.sample_ids) and torch.equal(x.images, y.images)


# ---- the protocol and the shard rule ------------------------------------------------------------------------------
def test_every_backend_is_a_train_stream(tiny_config, tmp_path):
    from dali_kd.teacher_cache.layout import Part
    from dali_kd.teacher_cache.store import TeacherCache
    from dali_kd.teacher_cache.stream import CachedViewStream

    cfg = tiny_config()
    index = ImageIndex.from_folder(cfg.data.root)
    cpu = torch.device("cpu")
    for backend in ("dali", "torchvision"):
        stream = make_train_stream(tiny_config(f"data.backend={backend}").stream_settings(), index, cpu)
        assert isinstance(stream, TrainStream), backend
        assert isinstance(stream.num_samples, int) and stream.take_entries() == []
        stream.close()
    cache = TeacherCache(tmp_path / "cache", {"teacher": "t"}, [Part("pooled", (4,), "float16")],
                         index.num_samples, 1, create=True)  # fmt: skip
    stream = make_cached_train_stream(cfg.stream_settings(), index, cpu, cache=cache, mode="replay")
    assert isinstance(stream, CachedViewStream) and isinstance(stream, TrainStream)
    stream.close()
    assert not isinstance(object(), TrainStream)


def test_one_share_rule_for_the_reader_the_index_and_the_streams(tmp_path):
    index = tree_index(tmp_path / "tree", num_classes=2, per_class=5)  # 10 images over 3 shards: 3, 3, 4
    assert [share_size(10, r, 3) for r in range(3)] == [3, 3, 4] and min_share_size(10, 3) == 3
    assert [share_bounds(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    seen = []
    for r in range(3):
        assert index.share(r, 3).files == tuple(index.files[i] for i in share_sample_ids(10, r, 3))
        settings = StreamSettings.with_defaults(PARAMS, 1, 0, dali_threads=1)
        tv = TorchvisionTrainStream(settings, index, rank=r, world_size=3)
        dali = DaliTrainStream(settings, index, "cpu", rank=r, world_size=3)
        assert tv.num_samples == dali.num_samples == share_size(10, r, 3)
        # One pass of DALI's shard: as many images as the rule says, disjoint from the other shards' first pass.
        ids = [int(b.sample_ids[0]) for b in itertools.islice(dali, dali.num_samples)]
        assert len(set(ids)) == len(ids)
        seen += ids
        tv.close()
        dali.close()
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError, match="rank must be in"):
        share_bounds(10, 3, 3)
    assert np.array_equal(share_sample_ids(10, 2, 3), np.arange(6, 10))
