"""A broken file never ends a run in evaluation either: the k-NN bank and the held-out images skip what was set
aside, set aside what fails there (named in one line, recorded with its split), from folders and from shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dali_kd.data import shards as fmt
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.shard_writer import ShardOptions, make_shards
from dali_kd.evaluation.evaluator import Evaluator
from dali_kd.training.trainer import Trainer
from tests.conftest import write_tree
from tests.faults import ROOT, run_module, tiny_args, warning_said
from tests.test_evaluation import always
from tests.test_shards_training import _spoil_sample

CPU = torch.device("cpu")


def spoil_keeping_size_and_time(path: Path) -> None:
    """The file goes bad after it was scanned, its size and modification time unchanged: the scan cache trusts it."""
    st = path.stat()
    path.write_bytes((b"<html>gone</html>" * 10_000)[: st.st_size])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def quarantine_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "quarantine.jsonl").read_text().splitlines()]


def test_a_file_broken_after_the_scan_is_set_aside_in_evaluation_and_the_run_ends_well(tmp_path):
    data = tmp_path / "data"
    write_tree(data / "train", num_classes=4, per_class=6, seed=0)
    write_tree(data / "val", num_classes=4, per_class=3, seed=1)
    out = tmp_path / "runs"
    args = [*tiny_args(data, out), "train.batch_size=4"]
    env = {"PYTHONPATH": str(ROOT)}  # this checkout's code, wherever the package is installed from
    # The scan the run uses (its cache), while every file is good.
    for split in ("train", "val"):
        assert run_module("dali_kd.scan", [str(data / split)], tmp_path, env, timeout=120).returncode == 0
    bad_val, bad_bank = data / "val" / "class_2" / "0.jpg", data / "train" / "class_3" / "5.jpg"
    spoil_keeping_size_and_time(bad_val)
    spoil_keeping_size_and_time(bad_bank)
    result = run_module("dali_kd.train", args, tmp_path, env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    for path, split in ((bad_val, "val"), (bad_bank, "train")):
        said = [ln for ln in output.splitlines() if f"set aside {path} ({split} split)" in ln]
        assert len(said) == 1 and "failed to decode in evaluation" in said[0], output[-3000:]
    rows = [r for r in quarantine_rows(out / "fault") if r["found"] == "evaluation"]
    assert sorted((r["split"], r["path"]) for r in rows) == [("train", str(bad_bank)), ("val", str(bad_val))]
    summary = json.loads((out / "fault" / "summary.json").read_text())
    assert summary["teacher_knn_top1"] is not None and summary["student_knn_top1"] is not None


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_evaluation_skips_what_it_set_aside_and_reports_it_once(tiny_config, tmp_path, backend):
    write_tree(tmp_path / "train", num_classes=4, per_class=6, seed=0)
    write_tree(tmp_path / "val", num_classes=4, per_class=4, seed=1)
    cfg = tiny_config(f"data.backend={backend}")
    train, val = ImageIndex.from_folder(tmp_path / "train"), ImageIndex.from_folder(tmp_path / "val")
    # The last image of the val split's first batch and the first of its second: the pass goes on after each.
    for k in (7, 8):
        spoil_keeping_size_and_time(Path(val.files[k]))
    evaluator = Evaluator(cfg, train, val, CPU)
    result = evaluator.evaluate(always(2, 4))
    # 14 val images are left (class_1/3.jpg and class_2/0.jpg went), 3 of them class 2.
    assert result.head_top1 == pytest.approx(100 * 3 / 14)
    entries = evaluator.take_entries()
    assert [(e["split"], e["path"], e["found"]) for e in entries] == [
        ("val", val.files[7], "evaluation"), ("val", val.files[8], "evaluation")
    ]  # fmt: skip
    assert evaluator.evaluate(always(2, 4)).head_top1 == result.head_top1
    assert evaluator.take_entries() == [], "a file is set aside once"


def test_from_shards_evaluation_skips_what_training_set_aside_and_sets_aside_the_rest(tiny_config, tmp_path):
    write_tree(tmp_path / "images" / "train", num_classes=4, per_class=6, seed=0)
    write_tree(tmp_path / "images" / "val", num_classes=4, per_class=3, seed=1)
    for split in ("train", "val"):
        make_shards(tmp_path / "images" / split, tmp_path / split, ShardOptions(10**9), show_progress=False)
    bad_train, bad_val = 5, 3  # the last image of class 0 in train; the first of class 1 in val
    _spoil_sample(tmp_path / "train", bad_train)
    val_shard, _ = _spoil_sample(tmp_path / "val", bad_val)
    cfg = tiny_config(
        "data.format=shards", f"data.root={tmp_path / 'train'}", f"data.val_root={tmp_path / 'val'}",
        "train.batch_size=4",
    )  # fmt: skip
    trainer = Trainer(cfg, CPU, show_progress=False)
    # The training stream meets the spoilt training sample first and sets it aside.
    with warning_said("set aside"):
        for _ in zip(range(24), trainer.parts.stream, strict=False):
            if trainer.parts.stream.state_dict()["substitutions"]:
                break
    assert list(trainer.parts.stream.state_dict()["substitutions"]) == [str(bad_train)]
    results = trainer.evaluate_student()
    assert 0 <= results["student"].knn_top1 <= 100
    entries = trainer.parts.evaluator.take_entries()
    # The bank skipped the training stream's file (no second entry); the val sample was set aside by shard and key.
    assert [(e["split"], e["shard"], e["key"], e["found"]) for e in entries] == [
        ("val", val_shard, fmt.sample_key(bad_val), "evaluation")
    ]
    trainer.parts.stream.close()
