"""The trainer's parts on their own: teacher targets (live, cached, constant), the distillation task, the run state,
the checkpointer's timing, the NaN guard, callbacks, and what a finished run leaves behind."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dali_kd.config import LossConfig
from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.outputs import ModelOutput
from dali_kd.distributed import DistInfo
from dali_kd.errors import TrainingStopped
from dali_kd.models import FrozenTeacher, Student, create_model
from dali_kd.runs import checkpoint as ckpt
from dali_kd.teacher_cache.batch_fields import CacheFields
from dali_kd.teacher_cache.store import TeacherCache, parts_for
from dali_kd.teacher_cache.targets import CachedTeacher, LiveTeacher
from dali_kd.training.callbacks import Callback
from dali_kd.training.checkpointer import Checkpointer, RunProgress, restore
from dali_kd.training.nonfinite import NonFiniteGuard
from dali_kd.training.run_state import RunState
from dali_kd.training.task import DistillTask
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")


def views(n: int, seed: int = 0) -> ViewRecord:
    g = torch.Generator().manual_seed(seed)
    return ViewRecord(
        crop_anchor=torch.rand(n, 2, generator=g), crop_shape=torch.rand(n, 2, generator=g),
        flip=torch.randint(0, 2, (n,), generator=g), jitter=torch.rand(n, 4, generator=g),
    )  # fmt: skip


def batch_of(images: torch.Tensor, ids, **kw) -> Batch:
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return Batch(images=images, labels=ids % 2, sample_ids=ids, view=views(len(ids)), **kw)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return FrozenTeacher(create_model("test_resnet", 32, 4), None)


def open_cache(tmp_path, teacher, num_samples=8, num_views=1) -> TeacherCache:
    probe = teacher(torch.zeros(1, 3, 32, 32))
    parts = parts_for(["pooled", "logits"], probe, None, "float32")
    identity = {"teacher": "t", "num_classes": 4}
    return TeacherCache(tmp_path / "cache", identity, parts, num_samples, num_views, create=True)


def test_live_teacher_counts_batches_and_sees_global_crops_only(teacher):
    live = LiveTeacher([teacher], with_patches=[False])
    crops = torch.randn(3, 2, 3, 32, 32)  # multi-crop: [B, G, ...]
    [out] = live.targets(batch_of(crops, [0, 1, 2], local_images=torch.randn(3, 4, 3, 16, 16)))
    assert out.pooled.shape[0] == 6 and live.summary()["teacher_forward_batches"] == 1
    # View-major: crop 0 of every sample first.
    assert torch.allclose(out.pooled[:3], teacher(crops[:, 0]).pooled, atol=1e-5)


def test_cached_teacher_fills_rows_at_stream_slots_then_replays_them(tmp_path, teacher):
    cache = open_cache(tmp_path, teacher)
    cached = CachedTeacher(LiveTeacher([teacher], [False]), cache, "replay", probe_every=None, device=CPU)
    images = torch.randn(4, 3, 32, 32)
    # Slot 3's file was set aside: the stream showed sample 2 there.
    fill = batch_of(images, [0, 1, 2, 2], stream_ids=torch.tensor([0, 1, 2, 3]),
                    cache=CacheFields(np.zeros(4, dtype=np.int64), store=np.ones(4, dtype=bool)))  # fmt: skip
    [live] = cached.targets(fill, step=1)
    assert cache.is_done(np.arange(4), np.zeros(4, dtype=np.int64)).all()
    replay = batch_of(images, [0, 1, 2, 2], cache=CacheFields(np.zeros(4, dtype=np.int64), from_cache=True),
                      host_ids=np.array([0, 1, 2, 3]))  # fmt: skip
    [out] = cached.targets(replay, step=2)
    assert torch.allclose(out.pooled, live.pooled, atol=1e-6) and torch.allclose(
        out.logits, live.logits, atol=1e-6
    )
    summary = cached.summary()
    assert summary["teacher_forward_batches"] == 1  # the fill; the probe counts apart
    assert summary["cache_hits"] == 4 and summary["teacher_probe_batches"] == 1
    assert summary["cache_fidelity_min"] > 0.9999
    assert cached.interval_metrics()["cache_fidelity_cosine"] > 0.9999 and cached.interval_metrics() == {}


def test_a_moved_cache_batch_keeps_its_cache_fields(tmp_path, teacher):
    cache = open_cache(tmp_path, teacher)
    cached = CachedTeacher(LiveTeacher([teacher], [False]), cache, "replay", probe_every=None, device=CPU)
    slots, store = np.zeros(4, dtype=np.int64), np.ones(4, dtype=bool)
    fill = batch_of(torch.randn(4, 3, 32, 32), [0, 1, 2, 3], cache=CacheFields(slots, store=store)).to(CPU)
    assert fill.cache is not None and fill.cache.slots is slots and fill.cache.store is store
    cached.targets(fill, step=1)
    assert cache.is_done(np.arange(4), slots).all(), "a moved fill batch still writes its rows"
    # A replayed batch: the cached outputs go to the device, the host fields stay numpy on the host.
    outputs = ModelOutput(pooled=torch.randn(4, 8), logits=None, patch_tokens=None)
    damaged = np.zeros(4, dtype=bool)
    replay = batch_of(torch.randn(4, 3, 32, 32), [0, 1, 2, 3],
                      cache=CacheFields(slots, from_cache=True, targets=outputs, read_s=0.5, damaged=damaged))  # fmt: skip
    moved = replay.to("meta")
    assert moved.images.device.type == "meta" and moved.cache.targets.pooled.device.type == "meta"
    assert moved.cache.slots is slots and moved.cache.damaged is damaged and moved.cache.from_cache
    assert moved.cache.read_s == 0.5 and moved.cache.targets.logits is None
    assert replay.cache.targets.pooled.device == CPU, "the batch moved is left as it was"


def test_the_fidelity_probe_fails_when_cached_rows_do_not_match_the_views(tmp_path, teacher, capsys):
    """The probe compares the live teacher with the cache: rows of other views must show up, loudly."""
    cache = open_cache(tmp_path, teacher)
    cached = CachedTeacher(LiveTeacher([teacher], [False]), cache, "replay", probe_every=None, device=CPU)
    images = torch.randn(4, 3, 32, 32)
    slots = np.zeros(4, dtype=np.int64)
    cached.targets(
        batch_of(images, [0, 1, 2, 3], cache=CacheFields(slots, store=np.ones(4, dtype=bool))), step=1
    )
    other = batch_of(torch.randn(4, 3, 32, 32), [0, 1, 2, 3], cache=CacheFields(slots, from_cache=True))
    cached.targets(other, step=2)
    # The probe's cosine is read on the host at the next log row (no wait for the device inside a step).
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one channel: the run's warning line, not a Python warning besides
        cached.interval_metrics()
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and re.fullmatch(
        r"WARNING: teacher cache fidelity \S+ < \S+ at step 2: .*", said[0]
    ), said
    assert cached.summary()["cache_fidelity_min"] < 0.999


def test_probe_every_n_steps_and_counters_survive_a_state_round_trip(tmp_path, teacher):
    cache = open_cache(tmp_path, teacher)
    cached = CachedTeacher(LiveTeacher([teacher], [False]), cache, "replay", probe_every=3, device=CPU)
    images = torch.randn(4, 3, 32, 32)
    slots = np.zeros(4, dtype=np.int64)
    cached.targets(
        batch_of(images, [0, 1, 2, 3], cache=CacheFields(slots, store=np.ones(4, dtype=bool))), step=1
    )
    for step in range(2, 8):
        cached.targets(batch_of(images, [0, 1, 2, 3], cache=CacheFields(slots, from_cache=True)), step=step)
    # The first replayed batch (step 2), then steps 3 and 6.
    assert cached.summary()["teacher_probe_batches"] == 3
    again = CachedTeacher(LiveTeacher([teacher], [False]), cache, "replay", probe_every=3, device=CPU)
    again.load_state_dict(cached.state_dict())
    assert again.summary() | {"cache_read_mb_s": 0} == cached.summary() | {"cache_read_mb_s": 0}


def test_distill_task_one_view_and_multi_crop(teacher):
    torch.manual_seed(0)
    student = Student(create_model("test_vit", 32, 4, any_size=True), teacher.model.num_features, 0, False)
    loss = LossConfig(logit_weight=1.0)
    task = DistillTask(student, loss, CPU, None)
    images = torch.randn(2, 3, 32, 32)
    losses = task(batch_of(images, [0, 1]), [teacher(images)])
    assert set(losses) == {"loss", "loss_feature", "loss_logit"} and losses["loss"].requires_grad
    crops, local = torch.randn(2, 2, 3, 32, 32), torch.randn(2, 3, 3, 16, 16)
    multi = batch_of(crops, [0, 1], local_images=local)
    losses = task(multi, LiveTeacher([teacher], [False]).targets(multi))
    assert {"loss", "loss_global", "loss_local", "loss_feature_local", "loss_logit_global"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_checkpointer_saves_every_n_steps_epoch_ends_and_on_preemption(tiny_config, tmp_path):
    cfg = tiny_config("train.save_every_n_steps=4")
    checkpointer = Checkpointer(
        tmp_path, cfg, dist=DistInfo(), steps_per_epoch=6, states={}, stream=RunState(), identity={}
    )
    assert [s for s in range(1, 13) if checkpointer.due(s)] == [
        4,
        8,
    ]  # 12 ends an epoch: saved after its eval
    assert checkpointer.due(12, epoch_end=True) and checkpointer.due(5, preempted=True)
    never_cfg = tiny_config("train.save_every_n_steps=null")
    never = Checkpointer(
        tmp_path, never_cfg, dist=DistInfo(), steps_per_epoch=6, states={}, stream=RunState(), identity={}
    )
    assert not any(never.due(s) for s in range(1, 13))


class Counters:
    """A part with state_dict/load_state_dict, as every part a checkpoint holds has."""

    def __init__(self, **values):
        self.values = values

    def state_dict(self):
        return dict(self.values)

    def load_state_dict(self, state):
        self.values = {k: state[k] for k in self.values}


def test_a_checkpoint_keeps_the_layout_that_older_checkpoints_have(tiny_config, tmp_path):
    """Checkpoints written before the parts were handed over as objects resume: the same keys, in the same places."""
    states = {
        "student": Counters(w=1),
        "optimizer": Counters(lr=0.1),
        "scheduler": Counters(t=3),
        "student_ema": Counters(w=2),
        "progress": RunProgress(RunState(step=5, epoch=1, step_in_epoch=1), Counters(cache_hits=7)),
    }
    identity = {"teacher": {"name": "t"}, "data_files": {"count": 2}}
    checkpointer = Checkpointer(
        tmp_path, tiny_config(), dist=DistInfo(), steps_per_epoch=4, states=states,
        stream=Counters(position=40), identity=identity,
    )  # fmt: skip
    saved = checkpointer.collect(5)
    assert list(saved) == [
        "format", "step", "epoch", "step_in_epoch", "student", "optimizer", "scheduler", "student_ema", "stream",
        "rng", "progress", "world_size", "config_hash", "config_fingerprint", "teacher", "data_files",
    ]  # fmt: skip
    assert (saved["step"], saved["epoch"], saved["step_in_epoch"]) == (5, 1, 1)
    assert saved["student_ema"] == {"w": 2} and saved["stream"] == [{"position": 40}]
    assert saved["progress"]["cache_hits"] == 7 and "step" not in saved["progress"]
    assert saved["teacher"] == {"name": "t"} and saved["data_files"] == {"count": 2}
    state, hits = RunState(), Counters(cache_hits=0)
    into = {
        name: Counters(**{k: 0 for k in part.state_dict()})
        for name, part in states.items()
        if name != "progress"
    }
    assert restore(saved, {**into, "progress": RunProgress(state, hits)}, rank=0) == {"position": 40}
    assert (state.step, state.epoch, state.step_in_epoch, hits.values) == (5, 1, 1, {"cache_hits": 7})
    assert {name: part.values for name, part in into.items()} == {
        "student": {"w": 1}, "optimizer": {"lr": 0.1}, "scheduler": {"t": 3}, "student_ema": {"w": 2}
    }  # fmt: skip


def test_run_state_round_trip_keeps_every_counter():
    state = RunState(step=7, epoch=1, step_in_epoch=2, final_loss=0.5, knn_history=[{"epoch": 1}])
    saved = state.state_dict()
    saved["knn_history"].append({"epoch": 2})  # the saved copy is independent of the live state
    other = RunState()
    other.load_state_dict({**state.state_dict(), "cache_hits": 3})  # other parts' keys are ignored
    assert other.step == 7 and other.knn_history == [{"epoch": 1}] and other.final_loss == 0.5
    assert math.isnan(RunState().final_loss)


def test_nonfinite_guard_skips_then_stops_and_stop_mode_stops_at_the_check():
    guard = NonFiniteGuard("skip", max_skipped=1, device=CPU)
    assert not guard.should_skip(torch.tensor(1.0), 1, None)
    assert guard.should_skip(torch.tensor(float("nan")), 2, None) and guard.skipped_steps == 1
    assert not guard.counts(torch.tensor(float("inf")))
    with pytest.raises(TrainingStopped, match="non-finite in 2 steps"):
        guard.should_skip(torch.tensor(float("nan")), 3, "ckpt.pt")
    stop = NonFiniteGuard("stop", max_skipped=0, device=CPU)
    assert not stop.should_skip(torch.tensor(float("nan")), 1, None)  # no host read: flagged on the device
    with pytest.raises(TrainingStopped, match="last good checkpoint: ckpt.pt"):
        stop.check(1, "ckpt.pt")


def test_callbacks_see_steps_logs_checkpoints_and_the_end(tiny_config, tmp_path):
    calls: dict[str, list] = {"step": [], "log": [], "evaluate": [], "checkpoint": [], "finish": []}

    class Watch(Callback):
        def on_step(self, trainer, batch):
            calls["step"].append(trainer.step + 1)

        def on_log(self, trainer, row):
            calls["log"].append(row["step"])

        def on_evaluate(self, trainer):
            calls["evaluate"].append(trainer.step)

        def on_checkpoint(self, trainer, path):
            calls["checkpoint"].append(path.name)

        def on_finish(self, trainer, summary):
            calls["finish"].append(summary["steps"])

    cfg = tiny_config("train.log_every_n_steps=2", "train.save_every_n_steps=2")
    trainer = Trainer(cfg, CPU, show_progress=False, callbacks=[Watch()])
    trainer.fit(tmp_path / "run")
    # Every part's counters are in the checkpoint for a resume to take back: the run state's, the teacher's, the
    # NaN guard's, the quarantine's.
    saved = ckpt.load(trainer.checkpointer.last)
    assert saved["step"] == 6 and saved["progress"]["teacher_forward_batches"] == 6
    assert saved["progress"]["skipped_steps"] == 0 and saved["progress"]["runtime_quarantine"] == []
    assert calls["step"] == [1, 2, 3, 4, 5, 6] and calls["log"] == [2, 4, 6]
    assert calls["evaluate"] == [6] and calls["finish"] == [6]  # the demo config evaluates every 4th epoch
    assert calls["checkpoint"] == ["step_000000002.pt", "step_000000003.pt", "step_000000004.pt",
                                   "step_000000006.pt"]  # fmt: skip


def test_a_finished_run_saves_the_student_and_both_projectors(tiny_config, tmp_path):
    cfg = tiny_config("model.teacher.name=test_vit", "train.loss.patch_weight=1.0")
    trainer = Trainer(cfg, CPU, show_progress=False)
    assert trainer.parts.student.patch_projector is not None
    trainer.fit(tmp_path / "run")
    for name, module in (
        ("projector", trainer.parts.student.projector),
        ("patch_projector", trainer.parts.student.patch_projector),
    ):
        saved = load_file(tmp_path / "run" / f"{name}.safetensors")
        assert saved.keys() == module.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_model_output_is_what_targets_return(teacher):
    [out] = LiveTeacher([teacher], [False]).targets(batch_of(torch.zeros(1, 3, 32, 32), [0]))
    assert isinstance(out, ModelOutput) and out.patch_tokens is None
