"""The teacher-feature cache: fill then replay, cached targets equal a live teacher on the replayed view (flip and
jitter included), kill during fill then resume, a cache replayed by another process than the one that filled it,
refusing a foreign cache, disk space, ranks filling disjoint rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_kd.errors import UserError
from dali_kd.teacher_cache.renderer import DaliViewRenderer
from dali_kd.teacher_cache.store import TeacherCache
from dali_kd.training.trainer import Trainer
from tests.faults import warning_said

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "drivers" / "run_with_fault.py"
CPU = torch.device("cpu")
CACHE = [
    "train.cache_teacher_features=true", "train.cache_views_per_image=2", "train.batch_size=8",
    "train.max_steps_per_epoch=6", "train.epochs=4", "train.cache_probe_every_n_steps=5",
]  # fmt: skip


def open_cache(trainer: Trainer) -> TeacherCache:
    return trainer.parts.targets.cache


def live_rows(trainer: Trainer, ids: np.ndarray, slots: np.ndarray):
    """What the teacher gives, now, on the stored views of these rows."""
    cache = trainer.parts.targets.cache
    view = cache.read_views(ids, slots)
    images = DaliViewRenderer(trainer.parts.train_index, trainer.cfg.augment_params(), len(ids)).render(
        torch.from_numpy(ids), view
    )
    return trainer.parts.teacher(images), view, images


@pytest.fixture
def cached_run(tiny_config, tmp_path):
    cfg = tiny_config(*CACHE, f"train.teacher_feature_dir={tmp_path / 'cache'}")
    trainer = Trainer(cfg, CPU, show_progress=False)
    summary = trainer.fit(tmp_path / "run")
    return trainer, summary


def test_fill_then_replay_stops_the_teacher(cached_run):
    trainer, summary = cached_run
    # 48 images × 2 views = 96 rows = 12 fill batches of 8; the remaining 12 steps are replayed.
    assert summary["steps"] == 24
    assert summary["teacher_forward_batches"] == math.ceil(48 * 2 / 8)
    assert summary["cache_rows_done"] == summary["cache_rows_total"] == 96
    assert summary["cache_hits"] == 12 * 8 and summary["cache_missing_rows"] == 0
    assert summary["teacher_probe_batches"] >= 1 and summary["cache_fidelity_min"] > 0.999
    assert summary["cache_write_mb_s"] > 0 and summary["cache_read_mb_s"] > 0
    rows = [json.loads(r) for r in (Path(trainer.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert any("cache_fidelity_cosine" in r for r in rows)


def test_cached_targets_equal_the_live_teacher_on_the_replayed_view(cached_run):
    trainer, _ = cached_run
    cache = trainer.parts.targets.cache
    ids = np.arange(16)
    slots = np.array([0, 1] * 8)
    live, view, images = live_rows(trainer, ids, slots)
    stored = cache.read(ids, slots, CPU)
    assert torch.allclose(stored.pooled, live.pooled, rtol=2e-3, atol=2e-3)  # fp16 storage
    assert torch.allclose(stored.logits, live.logits, rtol=2e-3, atol=2e-3)
    # Flips and colour jitter are part of the record, not only the crop: the views really vary in both...
    all_views = cache.read_views(np.arange(48).repeat(2), np.tile([0, 1], 48))
    assert 0 < int(all_views.flip.sum()) < 96
    assert (all_views.jitter != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1).float().mean() > 0.3
    # ...and changing them changes the teacher's answer, so matching targets means matching flips and jitter.
    flipped = DaliViewRenderer(trainer.parts.train_index, trainer.cfg.augment_params(), 16).render(
        torch.from_numpy(ids), type(view)(view.crop_anchor, view.crop_shape, 1 - view.flip, view.jitter)
    )
    assert not torch.allclose(trainer.parts.teacher(flipped).pooled, stored.pooled, rtol=2e-3, atol=2e-3)
    no_jitter = DaliViewRenderer(trainer.parts.train_index, trainer.cfg.augment_params(), 16).render(
        torch.from_numpy(ids),
        type(view)(
            view.crop_anchor, view.crop_shape, view.flip, view.jitter * 0 + torch.tensor([1.0, 1, 1, 0])
        ),
    )
    jittered = (view.jitter != torch.tensor([1.0, 1, 1, 0])).any(dim=1)
    assert not torch.allclose(
        trainer.parts.teacher(no_jitter).pooled[jittered], stored.pooled[jittered], rtol=2e-3, atol=2e-3
    )


def test_a_complete_cache_is_reused_without_running_the_teacher(cached_run, tiny_config, tmp_path):
    cfg = tiny_config(
        *CACHE, f"train.teacher_feature_dir={tmp_path / 'cache'}", "train.cache_probe_every_n_steps=null"
    )
    summary = Trainer(cfg, CPU, show_progress=False).fit(tmp_path / "again")
    # Only the first replayed batch is probed (once per process start); the teacher never trains the student.
    assert summary["teacher_forward_batches"] == 0 and summary["teacher_probe_batches"] == 1
    assert summary["cache_hits"] == 24 * 8


def test_a_cache_built_for_another_teacher_is_refused(cached_run, tiny_config, tmp_path):
    cfg = tiny_config(
        *CACHE, f"train.teacher_feature_dir={tmp_path / 'cache'}", "model.teacher.name=resnet10t"
    )
    with pytest.raises(
        UserError, match=r"built for something else \(.*teacher.*\); set train.cache_rebuild=true"
    ):
        Trainer(cfg, CPU, show_progress=False)
    rebuilt = Trainer(tiny_config(*CACHE, f"train.teacher_feature_dir={tmp_path / 'cache'}", "model.teacher.name=resnet10t",
                                  "train.cache_rebuild=true"), CPU, show_progress=False)  # fmt: skip
    assert rebuilt.parts.targets.cache.rows_done() == 0


def test_too_small_a_disk_is_refused_before_any_work(tiny_config, tmp_path, monkeypatch):
    import shutil

    from dali_kd.teacher_cache import store as teacher_cache

    monkeypatch.setattr(
        teacher_cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000)
    )
    cfg = tiny_config(*CACHE, f"train.teacher_feature_dir={tmp_path / 'cache'}")
    with pytest.raises(UserError, match=r"the cache needs 0\.00 GiB but only 0\.00 GiB are free"):
        Trainer(cfg, CPU, show_progress=False)
    assert not (tmp_path / "cache" / "header.json").exists()


def test_fixed_mode_warns_and_reuses_one_view(tiny_config, tmp_path):
    cfg = tiny_config(*CACHE, f"train.teacher_feature_dir={tmp_path / 'cache'}", "train.cache_mode=fixed",
                      "train.cache_probe_every_n_steps=null")  # fmt: skip
    with warning_said("cache_mode=fixed"):
        trainer = Trainer(cfg, CPU, show_progress=False)
    summary = trainer.fit(tmp_path / "run")
    assert summary["cache_rows_total"] == 48 and summary["teacher_forward_batches"] == 6  # one pass
    assert summary["cache_hits"] == (24 - 6) * 8


def cache_args(image_tree: Path, out: Path) -> list[str]:
    return [
        "--data_config", str(ROOT / "configs" / "demo" / "data_config.yaml"), "--device", "cpu", "--no-progress",
        f"data.root={image_tree / 'train'}", "data.val_root=null", "data.image_size=32", "data.dali_threads=1",
        "model.teacher.name=test_resnet", "model.teacher.checkpoint=null", "model.teacher.num_classes=4",
        "model.student.name=test_vit", "train.compile_student=false", "train.run_name=run",
        f"train.output_dir={out}", f"train.teacher_feature_dir={out / 'cache'}", "train.save_every_n_steps=2",
        "train.log_every_n_steps=1", *CACHE,
    ]  # fmt: skip


@pytest.mark.slow
def test_kill_during_fill_then_resume_leaves_every_row_done_and_right(image_tree, tmp_path, tiny_config):
    args = cache_args(image_tree, tmp_path)
    killed = subprocess.run([sys.executable, str(DRIVER), "kill-before-step", "6", "--", *args],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "dali_kd.train", *args, "--resume", "auto"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cache_rows_done"] == summary["cache_rows_total"] == 96
    # No garbage: every row holds what the teacher gives on its stored view.
    cfg = tiny_config(*CACHE, f"train.teacher_feature_dir={tmp_path / 'cache'}")
    trainer = Trainer(cfg, CPU, show_progress=False)
    ids, slots = np.arange(48).repeat(2), np.tile([0, 1], 48)
    for chunk in range(0, 96, 16):
        live, _, _ = live_rows(trainer, ids[chunk : chunk + 16], slots[chunk : chunk + 16])
        stored = trainer.parts.targets.cache.read(ids[chunk : chunk + 16], slots[chunk : chunk + 16], CPU)
        assert torch.allclose(stored.pooled, live.pooled, rtol=2e-3, atol=2e-3)


def losses(run_dir: Path) -> list[dict[str, float]]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in rows]


@pytest.mark.slow
def test_a_cache_filled_by_one_process_replays_in_the_next_exactly_as_in_its_own(image_tree, tmp_path):
    """The run is stopped once the fill is over (12 steps, checkpointed) and resumed in a new process, which replays
    only rows the first one wrote: every loss bit-equal to the run that filled and replayed in one process."""
    whole = subprocess.run([sys.executable, "-m", "dali_kd.train", *cache_args(image_tree, tmp_path / "whole")],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-2000:]
    args = cache_args(image_tree, tmp_path / "split")
    killed = subprocess.run([sys.executable, str(DRIVER), "kill-before-step", "13", "--", *args],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "dali_kd.train", *args, "--resume", "auto"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "split" / "run" / "summary.json").read_text())
    # The 12 fill batches are all the teacher ever ran on (the count is carried over by the checkpoint).
    assert summary["resumed_from"].endswith("step_000000012.pt") and summary["teacher_forward_batches"] == 12
    assert losses(tmp_path / "split" / "run") == losses(tmp_path / "whole" / "run")


@pytest.mark.slow
def test_two_ranks_fill_disjoint_rows(image_tree, tmp_path):
    record = tmp_path / "record"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
               str(DRIVER), "record", "0", "--", *cache_args(image_tree, tmp_path), "train.batch_size=6",
               "train.max_steps_per_epoch=4"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "FAULT_RECORD_DIR": str(record), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Each pass over the data gives each rank 24 images (DALI reshards every pass): 2 views = 8 fill steps of 6,
    # and the row a rank fills is (image, pass).
    fill = [json.loads((record / f"ids_rank{r}.json").read_text())[:8] for r in (0, 1)]
    rows = [{(i, step // 4) for step, ids in enumerate(rank_fill) for i in ids} for rank_fill in fill]
    assert len(rows[0]) == len(rows[1]) == 48 and not rows[0] & rows[1], "ranks fill disjoint rows"
    assert rows[0] | rows[1] == {(i, k) for i in range(48) for k in (0, 1)}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cache_rows_done"] == summary["cache_rows_total"] == 96
    assert summary["world_size"] == 2
