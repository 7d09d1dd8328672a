"""Two gloo ranks on the CPU under torchrun: disjoint shards, identical student weights, one summary from rank 0,
and a NaN on one rank stopping both cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "drivers" / "run_with_fault.py"


def torchrun(args: list[str], fault: str, step: int, rank, record: Path, port: int):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(DRIVER), fault, str(step), *([str(rank)] if rank is not None else []), "--", *args,
    ]  # fmt: skip
    env = {**os.environ, "FAULT_RECORD_DIR": str(record), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def args_for(image_tree: Path, out: Path) -> list[str]:
    return [
        "--data_config", str(ROOT / "configs" / "demo" / "data_config.yaml"),
        "--device", "cpu", "--no-progress",
        f"data.root={image_tree / 'train'}", f"data.val_root={image_tree / 'val'}", "data.image_size=32",
        "data.eval_resize=36", "data.dali_threads=1", "model.teacher.name=test_resnet", "model.teacher.checkpoint=null",
        "model.teacher.num_classes=4", "model.student.name=test_vit", "train.compile_student=false",
        "train.batch_size=6", "train.epochs=2", "train.max_steps_per_epoch=4", "train.log_every_n_steps=2",
        "train.save_every_n_steps=2", f"train.output_dir={out}", "train.run_name=run",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "port"),
    [
        ([], 29611),
        # Multi-crop: both resolutions go through one DDP forward; the gradients must still agree across ranks.
        (["train.use_local_crops=true", "data.local_crop_size=16", "data.num_local_crops=2"], 29613),
    ],
    ids=["one-view", "multi-crop"],
)
def test_two_gloo_ranks_disjoint_shards_identical_weights(image_tree, tmp_path, extra, port):
    record = tmp_path / "record"
    result = torchrun([*args_for(image_tree, tmp_path), *extra], "record", 0, None, record, port)
    assert result.returncode == 0, result.stderr[-4000:]
    ids = [json.loads((record / f"ids_rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(steps) for steps in ids] == [8, 8], "every rank takes the same number of steps"
    # 48 images, 2 shards of 24, 4 steps of 6 per epoch: each epoch is one pass over each rank's shard.
    for epoch in range(2):
        shard = [{i for step in rank_ids[4 * epoch : 4 * epoch + 4] for i in step} for rank_ids in ids]
        assert len(shard[0]) == len(shard[1]) == 24 and not shard[0] & shard[1], "shards are disjoint"
    weights = [torch.load(record / f"student_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), (
        "ranks ended with different weights"
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["student_knn_top1"] is not None
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [2, 4, 6, 8], "rank 0 alone writes the metrics"
    if extra:
        assert {"loss_global", "loss_local"} <= set(json.loads(rows[0]))


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(image_tree, tmp_path):
    result = torchrun(args_for(image_tree, tmp_path), "nan-at-step", 3, 1, tmp_path / "record", 29612)
    assert result.returncode != 0
    # Both ranks stop with the same one-line reason (torchrun reports each failed rank's exit code 1).
    assert result.stderr.count("loss became NaN/Inf") == 2, result.stderr[-4000:]
    assert "step_000000002.pt" in result.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert checkpoints == ["step_000000002.pt"]


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_each_rank_where_it_stopped(image_tree, tmp_path):
    """Each rank restores its own stream position and RNGs: the resumed steps see the same images per rank as an
    uninterrupted run, and the weights end bit-identical (a rank taking another rank's state would not)."""
    reference = tmp_path / "reference"
    args = [*args_for(image_tree, reference), "model.student.drop_path_rate=0.2"]
    result = torchrun(args, "record", 0, None, reference / "record", 29614)
    assert result.returncode == 0, result.stderr[-4000:]
    interrupted = tmp_path / "interrupted"
    args = [*args_for(image_tree, interrupted), "model.student.drop_path_rate=0.2"]
    killed = torchrun(args, "kill-before-step", 7, 1, interrupted / "record-killed", 29615)
    assert killed.returncode != 0
    assert (interrupted / "run" / "checkpoints" / "step_000000006.pt").is_file()
    resumed = torchrun([*args, "--resume", "auto"], "record", 0, None, interrupted / "record", 29616)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in (0, 1):
        before = json.loads((reference / "record" / f"ids_rank{rank}.json").read_text())
        after = json.loads((interrupted / "record" / f"ids_rank{rank}.json").read_text())
        assert after == before[6:], f"rank {rank} resumed on other images"
    weights = [
        torch.load(d / "record" / "student_rank0.pt", weights_only=True) for d in (reference, interrupted)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the resumed weights differ"
    rows = [
        [json.loads(r)["loss"] for r in (d / "run" / "metrics.jsonl").read_text().splitlines()]
        for d in (reference, interrupted)
    ]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_an_accumulated_step_all_reduces_once_and_the_ranks_stay_identical(image_tree, tmp_path):
    """With train.grad_accum_steps=2 the first batch of a step trains under DDP's no_sync (no all-reduce), the second
    all-reduces the summed gradients: the ranks' weights stay bit-identical."""
    record = tmp_path / "record"
    args = [*args_for(image_tree, tmp_path), "train.grad_accum_steps=2", "train.batch_size=3"]
    result = torchrun(args, "record", 0, None, record, 29617)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        # All-reduces (bucket by bucket) done before each of the 16 batches (8 steps of 2), then at the end.
        counts = json.loads((record / f"allreduces_rank{rank}.json").read_text())
        during = [after - before for before, after in zip(counts, counts[1:], strict=False)]
        assert len(during) == 16
        assert during[0::2] == [0] * 8, "a step's first batch all-reduced its gradients"
        # (DDP rebuilds its buckets after the first step: the count per step may change once.)
        assert min(during[1::2]) > 0, "a step's last batch did not all-reduce"
    weights = [torch.load(record / f"student_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), (
        "ranks ended with different weights"
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["steps_per_epoch"] == 4
