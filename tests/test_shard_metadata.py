"""Shard metadata edited by hand: a wrong type or a value out of range is one line naming the file and the field, and
the manifest's class list must be the samples' classes (an extra class would quietly skew head top-1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dali_kd.data import shards as fmt
from dali_kd.data.prepare import prepare_data
from dali_kd.data.shard_writer import ShardOptions, make_shards
from dali_kd.errors import UserError
from tests.faults import ROOT, assert_one_line_error, run_train, tiny_args


@pytest.fixture(scope="module")
def made_shards(image_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "train"
    make_shards(image_tree / "train", out, ShardOptions(10**9), show_progress=False)
    return out


def edited(src: Path, dst: Path, change: str) -> Path:
    """A copy of the shard folder with one hand edit to its manifest or samples.jsonl."""
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((dst / fmt.MANIFEST_NAME).read_text())
    rows = (dst / fmt.SAMPLES_NAME).read_text().splitlines()
    if change == "label_out_of_range":
        row = json.loads(rows[2])
        row[4] = 7
        rows[2] = json.dumps(row)
    elif change == "label_as_text":
        row = json.loads(rows[2])
        row[4] = "1"
        rows[2] = json.dumps(row)
    elif change == "num_samples_as_text":
        manifest["num_samples"] = str(manifest["num_samples"])
    elif change == "extra_class":
        manifest["class_names"].append("class_9")
    elif change == "bytes_as_text":
        manifest["shards"][0]["bytes"] = str(manifest["shards"][0]["bytes"])
    elif change == "class_names_not_a_list":
        manifest["class_names"] = "class_0"
    elif change == "label_changed":  # another class that exists: every field still in range
        row = json.loads(rows[2])
        row[4] = (row[4] + 1) % len(manifest["class_names"])
        rows[2] = json.dumps(row)
    elif change == "samples_sha256_missing":
        del manifest["samples_sha256"]
    (dst / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    (dst / fmt.SAMPLES_NAME).write_text("\n".join(rows) + "\n")
    if change == "manifest_random_bytes":
        (dst / fmt.MANIFEST_NAME).write_bytes(RANDOM_BYTES)
    elif change == "samples_random_bytes":
        (dst / fmt.SAMPLES_NAME).write_bytes(RANDOM_BYTES)
    elif change == "index_random_bytes":
        (dst / "shard-000000.idx").write_bytes(RANDOM_BYTES)
    return dst


RANDOM_BYTES = b"\x9c" + bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ("label_out_of_range", r"samples\.jsonl:3: field 'label' is 7, but the manifest's class_names has 4"),
        ("label_as_text", r"samples\.jsonl:3: field 'label' must be a whole number, not \"1\""),
        ("num_samples_as_text", r"manifest\.json: field 'num_samples' must be a whole number, not \"48\""),
        (
            "extra_class",
            r"manifest\.json: field 'class_names' lists 'class_9', which no sample of samples\.jsonl",
        ),
        ("bytes_as_text", r"manifest\.json: field 'shards\[0\]\.bytes' must be a whole number"),
        ("class_names_not_a_list", r"manifest\.json: field 'class_names' must be a list of class names"),
        (
            "label_changed",
            r"train/samples\.jsonl is not the file the manifest was made with \(its sha256 differs from "
            r"samples_sha256 in manifest\.json\)",
        ),
        (
            "samples_sha256_missing",
            r"manifest\.json: field 'samples_sha256' must be the sha256 of the samples file",
        ),
        ("manifest_random_bytes", r"train/manifest\.json: not a valid manifest \(not UTF-8 text: byte 0\)"),
        ("samples_random_bytes", r"train/samples\.jsonl is damaged \(not UTF-8 text: byte 0\)"),
        ("index_random_bytes", r"bad index .*train/shard-000000\.idx: not text \(byte 0\)"),
    ],
)
def test_hand_edited_shard_metadata_is_one_line_naming_file_and_field(
    made_shards, tmp_path, tiny_config, change, pattern
):
    folder = edited(made_shards, tmp_path / "train", change)
    cfg = tiny_config("data.format=shards", f"data.root={folder}", "data.val_root=null")
    with pytest.raises(UserError, match=pattern) as info:
        prepare_data(cfg.data)
    assert "\n" not in str(info.value)


def test_the_run_says_it_in_one_line_and_exits_2(made_shards, image_tree, tmp_path):
    folder = edited(made_shards, tmp_path / "train", "label_out_of_range")
    args = [
        *tiny_args(image_tree, tmp_path / "runs"),
        "data.format=shards",
        f"data.root={folder}",
        "data.val_root=null",
    ]
    result = run_train(args, tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert_one_line_error(result, 2, r"samples\.jsonl:3: field 'label' is 7")


def test_a_val_split_that_lacks_a_class_keeps_the_training_label_of_every_other_class(
    made_shards, image_tree, tmp_path, tiny_config
):
    val_src = tmp_path / "val_src"
    for folder in (image_tree / "val").iterdir():
        if folder.name != "class_1":
            shutil.copytree(folder, val_src / folder.name)
    make_shards(val_src, tmp_path / "val", ShardOptions(10**9), show_progress=False)
    cfg = tiny_config("data.format=shards", f"data.root={made_shards}", f"data.val_root={tmp_path / 'val'}")
    splits = prepare_data(cfg.data)
    val = splits.val
    assert val.class_names == splits.train.class_names == ("class_0", "class_1", "class_2", "class_3")
    # The class each val sample came from, by its original path: its label must name that class.
    paths = [json.loads(line)[5] for line in (tmp_path / "val" / fmt.SAMPLES_NAME).read_text().splitlines()]
    assert [val.class_names[label] for label in val.labels] == [p.split("/")[0] for p in paths]
    assert set(val.labels) == {0, 2, 3}
