"""Training from tar shards (data.format shards): the same samples and pixels as the folder, exact resume, disjoint
ranks, corrupt shards refused at start or set aside at run time, the teacher cache from shards."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dali_kd.data import shards as fmt
from dali_kd.data.dali_loader import DaliTrainStream
from dali_kd.data.loaders import make_eval_batches, make_train_stream
from dali_kd.data.prepare import prepare_data
from dali_kd.data.shard_writer import ShardOptions, make_shards
from dali_kd.errors import TrainingStopped, UserError
from dali_kd.teacher_cache.renderer import DaliViewRenderer
from dali_kd.training.trainer import Trainer
from tests.faults import warning_said
from tests.test_resume import SETTINGS, run
from tests.test_resume import losses as run_losses

CPU = torch.device("cpu")
SHARD_SIZE = 40_000  # about six images of the test tree per shard


@pytest.fixture(scope="module")
def shard_tree(image_tree, tmp_path_factory) -> Path:
    """image_tree's train and val splits as shards (train: several shards; val: one)."""
    out = tmp_path_factory.mktemp("shards")
    make_shards(image_tree / "train", out / "train", ShardOptions(SHARD_SIZE), show_progress=False)
    make_shards(image_tree / "val", out / "val", ShardOptions(10**9), show_progress=False)
    return out


def shards_config(tiny_config, root: Path, *overrides: str):
    return tiny_config(
        "data.format=shards", f"data.root={root / 'train'}", f"data.val_root={root / 'val'}", *overrides
    )


def passes(stream, num_batches: int) -> list[int]:
    ids = []
    for batch, _ in zip(stream, range(num_batches), strict=False):
        ids += batch.host_ids.tolist()
    return ids


def test_folder_and_shards_give_the_same_samples_per_pass_and_the_same_pixels(tiny_config, shard_tree):
    folder = prepare_data(tiny_config().data).train
    shards = prepare_data(shards_config(tiny_config, shard_tree).data).train
    assert shards.labels == folder.labels and shards.class_names == folder.class_names
    assert all(shards.read_bytes(i) == Path(folder.files[i]).read_bytes() for i in range(folder.num_samples))
    cfg = shards_config(tiny_config, shard_tree)
    stream = make_train_stream(cfg.stream_settings(), shards, CPU)
    ids = passes(stream, 18)  # 3 passes of 48
    for k in range(3):
        assert sorted(ids[48 * k : 48 * (k + 1)]) == list(range(48)), f"pass {k} is not every sample once"
    assert ids[:48] != ids[96:], "the order changes from pass to pass"
    # The same view record renders to the same pixels from either format.
    batch = next(iter(make_train_stream(cfg.stream_settings(), shards, CPU)))
    params = cfg.augment_params()
    from_folder = DaliViewRenderer(folder, params, len(batch)).render(batch.host_ids, batch.view)
    from_shards = DaliViewRenderer(shards, params, len(batch)).render(batch.host_ids, batch.view)
    assert torch.equal(from_folder, from_shards)
    assert torch.equal(from_shards, batch.images), "the stream's images are the rendered record"
    # Eval reads every sample once, in index order, with the folder's labels.
    for backend in ("dali", "torchvision"):
        c = shards_config(tiny_config, shard_tree, f"data.backend={backend}")
        got = [b.host_ids if b.host_ids is not None else b.sample_ids.numpy() for b in make_eval_batches(
            replace(c.stream_settings(), batch_size=8), shards, CPU)]  # fmt: skip
        assert np.concatenate(got).tolist() == list(range(48))


def test_torchvision_reads_the_shards_by_offset_with_the_folder_ids(tiny_config, shard_tree):
    overrides = ("data.backend=torchvision",)
    folder = make_train_stream(
        tiny_config(*overrides).stream_settings(), prepare_data(tiny_config().data).train, CPU
    )
    cfg = shards_config(tiny_config, shard_tree, *overrides)
    shards = make_train_stream(cfg.stream_settings(), prepare_data(cfg.data).train, CPU)
    a, b = next(iter(folder)), next(iter(shards))
    assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.images, b.images)
    folder.close()
    shards.close()


def test_a_stream_resumed_mid_pass_from_shards_continues_bit_identically(tiny_config, shard_tree):
    cfg = shards_config(tiny_config, shard_tree)
    index = prepare_data(cfg.data).train
    stream = make_train_stream(cfg.stream_settings(), index, CPU)
    it = iter(stream)
    for _ in range(4):  # 32 of 48 samples: mid-pass
        next(it)
    state = stream.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = iter(make_train_stream(cfg.stream_settings(), index, CPU, state=state))
    for want, got in zip(expected, (next(resumed) for _ in range(5)), strict=True):
        assert torch.equal(want.sample_ids, got.sample_ids) and torch.equal(want.images, got.images)


def test_two_ranks_read_disjoint_samples_each_pass(tiny_config, shard_tree):
    cfg = shards_config(tiny_config, shard_tree, "train.batch_size=6")
    index = prepare_data(cfg.data).train
    ranks = [
        passes(make_train_stream(cfg.stream_settings(), index, CPU, rank=r, world_size=2), 8) for r in (0, 1)
    ]
    for k in range(2):
        seen = [set(ids[24 * k : 24 * (k + 1)]) for ids in ranks]
        assert len(seen[0]) == len(seen[1]) == 24 and not seen[0] & seen[1], f"pass {k}: ranks overlap"
        assert seen[0] | seen[1] == set(range(48))


def _copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        ("truncate", r"shard .*shard-000001\.tar is \d+ bytes, the manifest says \d+"),
        ("index-count", r"bad index .*shard-000001\.idx"),
        ("index-offset", r"index .*shard-000001\.idx does not match the manifest"),
        ("no-manifest", r"no shard manifest at"),
    ],
)
def test_a_damaged_shard_folder_is_a_one_line_error_at_start(
    tiny_config, shard_tree, tmp_path, damage, pattern
):
    train = _copy_shards(shard_tree / "train", tmp_path / "train")
    (tmp_path / "val").symlink_to(shard_tree / "val")
    tar, idx = train / "shard-000001.tar", train / "shard-000001.idx"
    if damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:-2000])
    elif damage == "index-count":
        lines = idx.read_text().splitlines()
        idx.write_text("\n".join([f"{fmt.INDEX_VERSION} 99", *lines[1:]]) + "\n")
    elif damage == "index-offset":
        idx.write_text(idx.read_text().replace(" 1536 ", " 1024 ", 1))
    else:
        (train / fmt.MANIFEST_NAME).unlink()
    with pytest.raises(UserError, match=pattern) as info:
        prepare_data(shards_config(tiny_config, tmp_path).data)
    assert "\n" not in str(info.value)


def _spoil_sample(folder: Path, sample_id: int) -> tuple[str, int]:
    """Overwrite sample_id's image in its tar with bytes that are not an image (same size: the manifest still
    matches, so only decoding finds it). Returns its shard's name and its size."""
    row = json.loads((folder / fmt.SAMPLES_NAME).read_text().splitlines()[sample_id])
    name = fmt.read_manifest(folder)["shards"][row[1]]["name"]
    with open(folder / name, "r+b") as f:
        f.seek(row[2])
        f.write((b"<html>not an image</html>" * 1000)[: row[3]])
    return name, row[3]


def test_a_sample_that_fails_to_decode_is_set_aside_by_shard_and_key(tiny_config, image_tree, tmp_path):
    # Two shards, so every class has other samples in the spoilt sample's tar to stand in.
    make_shards(image_tree / "train", tmp_path / "train", ShardOptions(200_000), show_progress=False)
    (tmp_path / "val").symlink_to(image_tree / "val")
    bad = 7
    shard, _ = _spoil_sample(tmp_path / "train", bad)
    cfg = tiny_config("data.format=shards", f"data.root={tmp_path / 'train'}", "data.val_root=null")
    index = prepare_data(cfg.data).train
    for backend in ("dali", "torchvision"):
        with warning_said(f"set aside .*{shard}.*000000007"):
            # The DALI iterator runs the first batch already when it is made.
            settings = cfg.model_copy(update={"data": cfg.data.model_copy(update={"backend": backend})})
            stream = make_train_stream(settings.stream_settings(), index, CPU)
            ids = passes(stream, 12)
        entries = stream.take_entries()
        assert [(e["shard"], e["key"], e["found"]) for e in entries] == [
            (shard, fmt.sample_key(bad), "runtime")
        ]
        assert len(ids) == 96 and bad not in ids, "the slot shows a stand-in, the stream keeps its length"
        standin = stream.quarantine.resolve(bad)
        assert index.labels[standin] == index.labels[bad]
        assert index.shards.shard_of[standin] == index.shards.shard_of[bad]
        assert ids.count(standin) == 4, "two passes: the stand-in shows in its own slot and in the spoilt one"
        stream.close()


def _spoil_in_place(folder: Path, sample_id: int, start: int, end: int) -> tuple[str, int]:
    """Zero bytes start..end of sample_id's image inside its tar and put the tar's mtime back: the same size and
    time, as a disk or a careless tool leaves it. DALI decodes such a JPEG without an error. Returns the shard's
    name and the image's offset."""
    row = json.loads((folder / fmt.SAMPLES_NAME).read_text().splitlines()[sample_id])
    tar = folder / fmt.read_manifest(folder)["shards"][row[1]]["name"]
    before = tar.stat()
    with open(tar, "r+b") as f:
        f.seek(row[2] + start)
        f.write(bytes(end - start))
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert tar.stat().st_size == before.st_size and tar.stat().st_mtime_ns == before.st_mtime_ns
    return tar.name, row[2]


@pytest.fixture
def two_shards(image_tree, tmp_path) -> Path:
    # Two shards, so every class has other samples in a spoilt sample's tar to stand in.
    make_shards(image_tree / "train", tmp_path / "train", ShardOptions(200_000), show_progress=False)
    return tmp_path / "train"


def test_a_sample_spoilt_in_place_mid_run_is_set_aside_not_trained_on(tiny_config, two_shards):
    # A small shuffle buffer, so the reader reads the spoilt bytes after the spoil (a large one may hold them).
    cfg = tiny_config(
        "data.format=shards", f"data.root={two_shards}", "data.val_root=null", "data.shuffle_buffer=4"
    )
    index = prepare_data(cfg.data).train
    stream = make_train_stream(cfg.stream_settings(), index, CPU)
    batches = iter(stream)
    next(batches)
    tar = two_shards / index.shards.tar_paths[0].rsplit("/", 1)[1]
    os.utime(tar)  # touched, not changed: nothing is set aside
    passes(batches, 6)
    assert stream.take_entries() == []
    bad = next(i for i in range(index.num_samples) if index.shards.shard_of[i] == 0)
    size = index.shards.sizes[bad]
    # Everything after the first half zeroed (the end-of-image marker too): the scan's header check finds it.
    shard, offset = _spoil_in_place(two_shards, bad, size // 2, size)
    with warning_said(rf"set aside \S*{shard}:{offset}:{fmt.sample_key(bad)}\.jpg: .*changed"):
        ids = passes(batches, 12)
    assert bad not in ids and len(ids) == 96, "the slot shows a stand-in from the first batch after the spoil"
    (entry,) = stream.take_entries()
    assert (entry["shard"], entry["key"], entry["found"]) == (shard, fmt.sample_key(bad), "runtime")
    assert "truncated JPEG" in entry["reason"]
    standin = stream.quarantine.resolve(bad)
    assert index.labels[standin] == index.labels[bad] and index.shards.shard_of[standin] == 0
    stream.close()


def test_a_tar_changed_mid_run_where_no_check_finds_the_sample_stops_the_run(tiny_config, two_shards):
    cfg = tiny_config(
        "data.format=shards", f"data.root={two_shards}", "data.val_root=null", "data.shuffle_buffer=4"
    )
    index = prepare_data(cfg.data).train
    stream = make_train_stream(cfg.stream_settings(), index, CPU)
    batches = iter(stream)
    next(batches)
    bad = next(i for i in range(index.num_samples) if index.shards.shard_of[i] == 0)
    size = index.shards.sizes[bad]
    # The middle of the image data zeroed, the end-of-image marker kept: it passes the checks and decodes.
    shard, _ = _spoil_in_place(two_shards, bad, size // 2, size - 2)
    with pytest.raises(
        TrainingStopped, match=rf"shard \S*{shard} changed during the run .* make the shards again"
    ):
        passes(batches, 12)
    stream.close()


def test_the_teacher_cache_fills_and_replays_from_shards(tiny_config, shard_tree, tmp_path):
    cfg = shards_config(
        tiny_config, shard_tree, "train.cache_teacher_features=true", "train.cache_views_per_image=2",
        "train.max_steps_per_epoch=6", "train.epochs=4", "train.cache_probe_every_n_steps=5",
        f"train.teacher_feature_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    trainer = Trainer(cfg, CPU, show_progress=False)
    summary = trainer.fit(tmp_path / "run")
    assert summary["steps"] == 24
    assert summary["teacher_forward_batches"] == math.ceil(48 * 2 / 8)
    assert summary["cache_rows_done"] == summary["cache_rows_total"] == 96
    assert summary["cache_missing_rows"] == 0 and summary["cache_fidelity_min"] > 0.999


@pytest.mark.slow
def test_a_run_from_shards_killed_mid_pass_resumes_bit_identically(image_tree, shard_tree, tmp_path):
    root = Path(__file__).resolve().parents[1]
    args = [
        "--data_config", str(root / "configs" / "demo" / "data_config.yaml"),
        "--train_config", str(root / "configs" / "demo" / "train_config_kd.yaml"),
        "--model_config", str(root / "configs" / "demo" / "model_config_kd.yaml"),
        "data.format=shards", f"data.root={shard_tree / 'train'}", f"data.val_root={shard_tree / 'val'}",
        "data.image_size=32", "data.eval_resize=36", "data.dali_threads=1", "model.teacher.name=test_resnet",
        "model.teacher.checkpoint=null", "model.teacher.num_classes=4", "model.student.name=test_vit",
        "train.compile_student=false", "train.num_workers=0", *SETTINGS,
    ]  # fmt: skip
    reference = run(args, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    # Killed before step 5: the resume starts at the step-4 checkpoint, 32 of 48 samples into the first pass.
    killed = run(args, tmp_path / "cut", "kill-before-step", 5)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run([*args, "--resume", "auto"], tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_losses(tmp_path / "cut" / "run") == run_losses(tmp_path / "ref" / "run")
    mine, theirs = (load_file(tmp_path / d / "run" / "student.safetensors") for d in ("cut", "ref"))
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "final weights are not bit-identical"


def test_a_half_made_config_is_refused_in_one_line(tiny_config, shard_tree):
    with pytest.raises(UserError, match=r"data.file_list=/x with data.format=shards"):
        shards_config(tiny_config, shard_tree, "data.file_list=/x")


def test_the_dali_stream_is_a_train_stream_from_shards(tiny_config, shard_tree):
    cfg = shards_config(tiny_config, shard_tree)
    stream = make_train_stream(cfg.stream_settings(), prepare_data(cfg.data).train, CPU)
    assert isinstance(stream, DaliTrainStream) and stream.num_samples == 48
    stream.close()
