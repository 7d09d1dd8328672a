"""What a user would lose without a word: the EMA's update rule, a checkpoint's EMA and random streams, the
per-update learning rate, a teacher cache kept for another teacher input, and the offline setting."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from dali_kd.errors import UserError
from dali_kd.runs import checkpoint as ckpt
from dali_kd.training.callbacks import Callback
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")


def test_the_ema_follows_its_decay_step_by_step(tiny_config):
    cfg = tiny_config("train.ema_decay=0.9", "train.ema_warmup=false")
    trainer = Trainer(cfg, CPU, show_progress=False)
    stream = iter(trainer.parts.stream)

    def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    trainer.train_step(next(stream))  # step 1: the average starts from the weights after the first update
    expected = weights(trainer.parts.student.backbone)
    for _ in range(2):
        trainer.train_step(next(stream))
        student = weights(trainer.parts.student.backbone)
        expected = {k: 0.9 * expected[k] + 0.1 * student[k] for k in expected}
        ema = weights(trainer.parts.ema.backbone)
        for k in expected:
            torch.testing.assert_close(ema[k], expected[k], msg=f"{k}: not 0.9 × EMA + 0.1 × student")


def same_rng(saved: dict, now: dict) -> list[str]:
    """The names of the random streams that differ."""
    differ = []
    if saved["python"] != now["python"]:
        differ.append("python")
    if (
        not torch.equal(saved["numpy"]["keys"], now["numpy"]["keys"])
        or saved["numpy"]["pos"] != now["numpy"]["pos"]
    ):
        differ.append("numpy")
    if not torch.equal(saved["torch"], now["torch"]):
        differ.append("torch")
    return differ


def test_a_checkpoint_brings_back_the_ema_every_random_stream_and_the_data_streams_position(
    tiny_config, tmp_path
):
    cfg = tiny_config("train.ema_decay=0.9", "train.epochs=2", "train.max_steps_per_epoch=2")

    class Watch(Callback):
        """What the run holds when its first epoch's checkpoint is written, and the batch that comes next."""

        def __init__(self):
            self.at_checkpoint: dict | None = None
            self.next_batch = None

        def on_checkpoint(self, trainer, path):
            if self.at_checkpoint is None:
                self.at_checkpoint = {
                    "path": path,
                    "ema": trainer.parts.ema.state_dict(),
                    "rng": ckpt.rng_state(),
                }
                self.at_checkpoint["ema"] = {k: v.clone() for k, v in self.at_checkpoint["ema"].items()}

        def on_step(self, trainer, batch):
            # A part of the run that draws from every global stream (a user's callback, an augmentation), so
            # that no stream is still at its seeded start when the checkpoint is written.
            random.random(), np.random.rand(), torch.rand(1)
            if trainer.step == 2:  # the first batch after the checkpoint of step 2
                self.next_batch = (batch.images.clone(), batch.sample_ids.clone())

    watch = Watch()
    Trainer(cfg, CPU, show_progress=False, callbacks=[watch]).fit(tmp_path / "run")
    saved = watch.at_checkpoint
    assert saved is not None and saved["path"].name == "step_000000002.pt"

    resumed = Trainer(cfg, CPU, show_progress=False, resume_from=saved["path"])
    assert same_rng(saved["rng"], ckpt.rng_state()) == [], "a random stream was not restored"
    ema = resumed.parts.ema.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in saved["ema"].items()), "the EMA's weights were not restored"
    batch = next(iter(resumed.parts.stream))
    images, ids = watch.next_batch
    assert torch.equal(batch.sample_ids, ids), "the data stream did not continue where it stood"
    assert torch.equal(batch.images, images), "the data stream's augmentation draws were not restored"


def test_the_learning_rate_of_every_update_follows_warm_up_then_cosine(tiny_config, tmp_path):
    lr, min_lr, warmup, total = 0.01, 0.001, 2, 6
    cfg = tiny_config(
        "train.epochs=2", "train.max_steps_per_epoch=3", "train.log_every_n_steps=1",
        f"train.optimizer.lr={lr}", f"train.optimizer.min_lr={min_lr}", f"train.optimizer.warmup_steps={warmup}",
    )  # fmt: skip
    Trainer(cfg, CPU, show_progress=False).fit(tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, total + 1))

    def scheduled(n: int) -> float:
        if n < warmup:
            return lr * n / warmup
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (n - warmup) / (total - warmup)))

    assert [r["lr"] for r in rows] == pytest.approx([scheduled(n) for n in range(1, total + 1)], rel=1e-6)


CACHE = [
    "train.cache_teacher_features=true",
    "train.cache_views_per_image=1",
    "train.cache_probe_every_n_steps=null",
]


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (["model.teacher.mean=[0.5,0.5,0.5]", "model.teacher.std=[0.25,0.25,0.25]"],
         ["model.teacher.mean=[0.4,0.4,0.4]", "model.teacher.std=[0.2,0.2,0.2]"]),
        (["data.teacher_image_size=24"], ["data.teacher_image_size=16"]),
    ],
    ids=["teacher-normalisation", "teacher-size"],
)  # fmt: skip
def test_a_teacher_cache_is_refused_when_only_the_teachers_own_input_changed(
    tiny_config, tmp_path, first, then
):
    cache = f"train.teacher_feature_dir={tmp_path / 'cache'}"
    Trainer(tiny_config(*CACHE, cache, *first), CPU, show_progress=False)  # creates the cache's header
    with pytest.raises(UserError, match=r"built for something else \(.*teacher_input"):
        Trainer(tiny_config(*CACHE, cache, *then), CPU, show_progress=False)
