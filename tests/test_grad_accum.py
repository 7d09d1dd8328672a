"""Gradient accumulation (train.grad_accum_steps): N batches of B train one step like one batch of N × B — same
images, same losses, same weights, the schedule and the EMA counting steps —, DDP all-reduces once per step, and the
teacher cache keeps working. (A stop between a step's batches resumes exactly: tests/test_resume.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dali_kd.config import load_config
from dali_kd.data import make_train_stream
from dali_kd.data.dataset import ImageIndex
from dali_kd.training.callbacks import Callback
from dali_kd.training.trainer import Trainer
from tests.conftest import tiny_overrides

CPU = torch.device("cpu")

# Both sides sum in fp32 over different groupings: one batch of 32 sums its 32 samples' gradients (and losses) in
# one reduction, four batches of 8 sum four partial sums of 8. Each order rounds differently, by about one unit in
# the last place of a float32 (~1e-7 relative) per reduction, and four SGD steps carry that along (seen: 6e-8
# absolute on weights, 2e-7 absolute on losses). 1e-5 relative with 1e-6 absolute leaves that room: the absolute
# part for weights near 0 and for a small loss part such as the KL term (0.0006), a difference of nearly equal
# log-probabilities whose rounding error is the size of the total's, not of its own. A real change moves things by
# orders of magnitude more: an unscaled loss or a schedule stepped per batch moves the weights by 1e-3 and more.
RTOL, ATOL = 1e-5, 1e-6

MULTI_CROP = ["train.use_local_crops=true", "data.local_crop_size=16", "data.num_local_crops=2"]


class Record(Callback):
    """Every batch a step trains on: which micro-batch of which step it is, its sample ids and images."""

    def __init__(self):
        self.batches: list[tuple[int, int]] = []
        self.ids: dict[int, list[int]] = {}
        self.images: dict[int, list[torch.Tensor]] = {}

    def on_step(self, trainer, batch):
        step = trainer.step + 1
        self.batches.append((step, trainer.micro_batch))
        self.ids.setdefault(step, []).extend(batch.sample_ids.tolist())
        self.images.setdefault(step, []).append(batch.images.clone())


def train(image_tree: Path, out: Path, batch_size: int, accum: int, *extra: str):
    """Four steps of 32 images on the torchvision backend (its views are a function of the stream position alone,
    so both groupings see the same pixels), plain SGD (an update proportional to the gradient: Adam's would hide
    a wrongly scaled gradient), a warm-up that changes the lr every step, and an EMA. The default gradient clip
    (3.0) binds in the first two steps (gradient norms about 11 and 4) and not in the last two (2 and 1), so both
    a clip of the wrong gradient and a wrongly scaled one show."""
    cfg = load_config(
        overrides=[
            *tiny_overrides(image_tree, out),
            "data.backend=torchvision",
            "data.val_root=null",
            f"train.batch_size={batch_size}",
            f"train.grad_accum_steps={accum}",
            "train.epochs=4",
            "train.optimizer.name=sgd",
            "train.optimizer.lr=0.05",
            "train.optimizer.warmup_steps=2",
            "train.ema_decay=0.9",
            "train.run_name=run",
            *extra,
        ]  # fmt: skip
    )
    record = Record()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order on every machine
    try:
        trainer = Trainer(cfg, CPU, show_progress=False, callbacks=[record])
        summary = trainer.fit(out / "run")
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return trainer, summary, rows, record


@pytest.mark.parametrize("extra", [[], MULTI_CROP], ids=["one-view", "multi-crop"])
def test_four_batches_of_8_train_a_step_like_one_batch_of_32(image_tree, tmp_path, extra):
    one, one_summary, one_rows, one_seen = train(image_tree, tmp_path / "1x32", 32, 1, *extra)
    four, four_summary, four_rows, four_seen = train(image_tree, tmp_path / "4x8", 8, 4, *extra)
    # 48 images: one step of 32 per epoch either way (an epoch is a pass: 48 // 32), 4 steps.
    assert one_summary["steps"] == four_summary["steps"] == 4
    assert four_seen.batches == [(step, i) for step in range(1, 5) for i in range(4)]
    assert four_seen.ids == one_seen.ids, (
        "a step's 4 batches are not the 32 samples of the one batch, in order"
    )
    for step in range(1, 5):
        assert torch.equal(torch.cat(four_seen.images[step]), one_seen.images[step][0])
    # Everything counts steps: the rows, the lr of each step (warm-up then cosine), the images of a step.
    assert [r["step"] for r in four_rows] == [r["step"] for r in one_rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in four_rows] == [r["lr"] for r in one_rows]
    for row in four_rows:  # img/s × s/step = images per step
        assert row["img_per_s"] * row["step_ms"] / 1000 == pytest.approx(32)
    assert sum(r["images"] for r in four_rows) == 4 * 32, "img/s counts every image of a step"
    for key in [k for k in one_rows[0] if k.startswith("loss")]:
        got, want = [r[key] for r in four_rows], [r[key] for r in one_rows]
        assert got == pytest.approx(want, rel=RTOL, abs=ATOL), key
    for mine, theirs in (
        (four.parts.student, one.parts.student),
        (four.parts.ema.backbone, one.parts.ema.backbone),
    ):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=name)


def test_the_dali_stream_gives_a_step_of_4_batches_the_32_samples_of_one_batch_in_order(image_tree, tmp_path):
    """DALI's reader orders the files independently of the batch size, so a step's samples are the same; its random
    draws (crop, flip, jitter) are per position in a batch, so the views differ: the equivalence test above runs on
    the torchvision backend, whose views are a function of the stream position."""
    index = ImageIndex.from_folder(image_tree / "train")

    def stream(batch_size: int):
        cfg = load_config(overrides=[*tiny_overrides(image_tree, tmp_path), f"train.batch_size={batch_size}"])
        return iter(make_train_stream(cfg.stream_settings(), index, CPU))

    small, large = stream(8), stream(32)
    for _ in range(3):  # past the end of the first pass (48 images)
        four = torch.cat([next(small).sample_ids for _ in range(4)])
        assert torch.equal(four, next(large).sample_ids)


def test_the_teacher_cache_fills_and_replays_with_accumulated_steps(tiny_config, tmp_path):
    cfg = tiny_config(
        "train.cache_teacher_features=true", "train.cache_views_per_image=2", "train.batch_size=4",
        "train.grad_accum_steps=2", "train.max_steps_per_epoch=6", "train.epochs=4",
        "train.cache_probe_every_n_steps=5", f"train.teacher_feature_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    summary = Trainer(cfg, CPU, show_progress=False).fit(tmp_path / "run")
    # 48 images × 2 views = 96 rows, filled by 24 batches of 4 (steps 1-12); steps 13-24 replay 24 batches.
    assert summary["steps"] == 24
    assert summary["teacher_forward_batches"] == 24
    assert summary["cache_rows_done"] == summary["cache_rows_total"] == 96
    assert summary["cache_hits"] == 24 * 4 and summary["cache_missing_rows"] == 0
    assert summary["cache_fidelity_min"] > 0.999
    # The fidelity probe runs once a step, on its first replayed batch: at step 13 (the first replayed), 15 and 20.
    assert summary["teacher_probe_batches"] == 3


def test_a_nan_in_any_batch_of_a_step_skips_the_whole_update(tiny_config, tmp_path):
    class NanFirstBatch(Callback):
        def on_step(self, trainer, batch):
            if trainer.step + 1 == 2 and trainer.micro_batch == 0:  # the first of step 2's batches
                batch.images = batch.images * float("nan")

    cfg = tiny_config("train.grad_accum_steps=2", "train.batch_size=4", "train.on_nonfinite_loss=skip")
    trainer = Trainer(cfg, CPU, show_progress=False, callbacks=[NanFirstBatch()])
    summary = trainer.fit(tmp_path / "run")
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert all(torch.isfinite(p).all() for p in trainer.parts.student.parameters()), (
        "a NaN gradient was applied"
    )
