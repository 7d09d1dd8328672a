"""Function matching (data.augment.mix): a mixed image is λ·a + (1−λ)·b (CutMix: the box from b), the teacher and
the student get the same mixed tensor, a mix record renders again to the same pixels (live stream and the teacher
cache's replay), and a resumed run with mixing on is bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.mixing import MixParams, draw_mix, mix_batch, mix_generator, mix_images
from dali_kd.errors import UserError
from dali_kd.teacher_cache.renderer import DaliViewRenderer
from dali_kd.teacher_cache.stream import make_cached_train_stream
from dali_kd.training.callbacks import Callback
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")


# ---- the mixing step itself ----------------------------------------------------------------------------------
def test_mixup_blends_and_cutmix_pastes_the_partners_box():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, 16, 16, generator=gen), torch.randn(6, 3, 16, 16, generator=gen)
    lam = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.75, 0.9])
    empty = torch.zeros(6, 4, dtype=torch.long)
    blend = lam.view(6, 1, 1, 1) * a + (1 - lam.view(6, 1, 1, 1)) * b
    assert torch.allclose(mix_images(a, b, lam, empty), blend, atol=1e-6)  # float32 rounding apart

    assert torch.equal(mix_images(a, b, torch.ones(6), empty), a), "λ = 1 and no box leave the image exactly"
    box = torch.tensor([[2, 3, 10, 7]] * 6)  # rows 2..9, columns 3..6
    cut = mix_images(a, b, torch.ones(6), box)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[2:10, 3:7] = True
    assert torch.equal(cut[..., inside], b[..., inside]) and torch.equal(cut[..., ~inside], a[..., ~inside])
    # Multi-crop layout [B, V, 3, H, W]: one λ and box per sample for all its crops.
    a5, b5 = a.view(3, 2, 3, 16, 16), b.view(3, 2, 3, 16, 16)
    mixed = mix_images(a5, b5, lam[:3], box[:3])
    assert torch.equal(mixed[..., inside], b5[..., inside])
    weight = lam[:3].view(3, 1, 1, 1)
    outside = weight * a5[..., ~inside] + (1 - weight) * b5[..., ~inside]
    assert torch.allclose(mixed[..., ~inside], outside, atol=1e-6)
    # fp16 views: mixed in fp32, rounded once.
    half = mix_images(a.half(), b.half(), lam, empty)
    blend = lam.view(6, 1, 1, 1) * a.half().float() + (1 - lam.view(6, 1, 1, 1)) * b.half().float()
    assert half.dtype == torch.float16 and torch.allclose(half.float(), blend, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "both"])
def test_draws_pick_another_sample_and_follow_the_kind(kind):
    params = MixParams(kind, mix_alpha=0.8, cutmix_alpha=1.0, prob=1.0)
    draw = draw_mix(mix_generator(0, 0, 5), 64, params, 32)
    assert (draw.partner != np.arange(64)).all() and sorted(draw.partner) == list(range(64))
    has_box = draw.box[:, 2] > draw.box[:, 0]
    blended = draw.lam < 1
    assert not (has_box & blended).any(), "a sample is blended or boxed, not both"
    if kind == "mixup":
        assert blended.mean() > 0.9 and not has_box.any()
    elif kind == "cutmix":
        assert has_box.mean() > 0.8 and not blended.any()
    else:
        assert 0.2 < has_box.mean() < 0.8 and 0.2 < blended.mean() < 0.8
    assert ((draw.box >= 0) & (draw.box <= 32)).all()
    # The same (seed, rank, batch) draws the same; another batch number draws anew.
    again = draw_mix(mix_generator(0, 0, 5), 64, params, 32)
    assert all(np.array_equal(x, y) for x, y in zip(vars(draw).values(), vars(again).values(), strict=True))
    assert not np.array_equal(draw_mix(mix_generator(0, 0, 6), 64, params, 32).partner, draw.partner)
    # mix_prob 0: nothing is mixed, every record names its own sample.
    none = draw_mix(mix_generator(0, 0, 5), 64, MixParams(kind, prob=0.0), 32)
    assert (none.partner == np.arange(64)).all() and (none.lam == 1).all() and (none.box == 0).all()


def _record(b: int, v: int | None = None) -> ViewRecord:
    lead = (b,) if v is None else (b, v)
    return ViewRecord(
        torch.rand(*lead, 2), torch.rand(*lead, 2), torch.randint(0, 2, lead), torch.rand(*lead, 4)
    )


def test_a_multi_crop_batch_mixes_globals_and_locals_with_one_partner():
    gen = torch.Generator().manual_seed(1)
    images, local = torch.randn(4, 2, 3, 32, 32, generator=gen), torch.randn(4, 3, 3, 16, 16, generator=gen)
    batch = Batch(
        images, torch.zeros(4, dtype=torch.long), torch.tensor([10, 11, 12, 13]), _record(4, 5), local
    )
    draw = draw_mix(mix_generator(3, 0, 0), 4, MixParams("cutmix"), 32)
    mixed = mix_batch(batch, draw)
    p = torch.from_numpy(draw.partner)
    assert torch.equal(mixed.view.mix.partner_id, batch.sample_ids[p])
    assert torch.equal(mixed.view.mix.partner_view.crop_anchor, batch.view.crop_anchor[p])  # all 5 crops
    for k in range(4):
        top, left, bottom, right = draw.box[k].tolist()
        assert torch.equal(
            mixed.images[k, :, :, top:bottom, left:right], images[p[k], :, :, top:bottom, left:right]
        )
        t, lft, btm, rgt = [(v * 16 * 2 + 32) // 64 for v in (top, left, bottom, right)]  # the box at 16 px
        assert torch.equal(mixed.local_images[k, :, :, t:btm, lft:rgt], local[p[k], :, :, t:btm, lft:rgt])
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[t:btm, lft:rgt] = False
        assert torch.equal(mixed.local_images[k][..., outside], local[k][..., outside])


# ---- in a run --------------------------------------------------------------------------------------------------
class CaptureInputs(Callback):
    """Records each step's batch and what the teacher and the student modules were called with."""

    def __init__(self):
        self.batches: list[Batch] = []
        self.teacher_inputs: list[torch.Tensor] = []
        self.student_inputs: list[torch.Tensor] = []
        self.hooked = False

    def on_step(self, trainer, batch):
        if not self.hooked:
            self.hooked = True
            student = trainer.parts.student
            # Only the training steps' calls: evaluation runs the teacher too (the student's agreement with it),
            # with the student in eval mode.
            trainer.parts.teacher.register_forward_pre_hook(
                lambda m, args: self.teacher_inputs.append(args[0].clone()) if student.training else None
            )
            trainer.parts.student.register_forward_pre_hook(
                lambda m, args: self.student_inputs.append(args[0].clone())
            )
        self.batches.append(batch)


def render(trainer: Trainer, ids: torch.Tensor, view: ViewRecord) -> torch.Tensor:
    renderer = DaliViewRenderer(trainer.parts.train_index, trainer.cfg.augment_params(), len(ids))
    return renderer.render(ids.cpu().numpy(), view)


def test_teacher_and_student_see_the_same_mixed_view_and_its_record_renders_it_again(tiny_config, tmp_path):
    cfg = tiny_config(
        "data.augment.mix=both", "train.epochs=1", "train.max_steps_per_epoch=2", "train.telemetry=false"
    )
    capture = CaptureInputs()
    trainer = Trainer(cfg, CPU, show_progress=False, callbacks=[capture])
    trainer.fit(tmp_path / "run")
    assert len(capture.teacher_inputs) == len(capture.student_inputs) == 2
    for batch, seen_by_teacher, seen_by_student in zip(
        capture.batches, capture.teacher_inputs, capture.student_inputs, strict=True
    ):
        assert torch.equal(seen_by_teacher, seen_by_student) and torch.equal(seen_by_teacher, batch.images)
        mix = batch.view.mix
        own = render(trainer, batch.sample_ids, batch.view)
        partner = render(trainer, mix.partner_id, mix.partner_view)
        assert torch.equal(batch.images, mix_images(own, partner, mix.lam, mix.box)), (
            "the record renders again"
        )
        assert not torch.equal(batch.images, own), "the models saw mixed views, not the plain ones"
        assert (mix.partner_id != batch.sample_ids).any()


def test_mixing_on_the_torchvision_backend(tiny_config, tmp_path):
    cfg = tiny_config(
        "data.backend=torchvision", "data.augment.mix=cutmix", "train.epochs=1", "train.max_steps_per_epoch=1",
        "train.telemetry=false",
    )  # fmt: skip
    capture = CaptureInputs()
    Trainer(cfg, CPU, show_progress=False, callbacks=[capture]).fit(tmp_path / "run")
    (batch,) = capture.batches
    assert torch.equal(capture.teacher_inputs[0], capture.student_inputs[0])
    boxed = batch.view.mix.box[:, 2] > batch.view.mix.box[:, 0]
    assert boxed.any() and (batch.view.mix.lam == 1).all()


class KeepFillBatches(Callback):
    def __init__(self):
        self.fill: list[Batch] = []
        self.replayed = 0

    def on_step(self, trainer, batch):
        if batch.cache is not None and batch.cache.from_cache:
            self.replayed += 1
        else:
            self.fill.append(batch)


def test_the_cache_stores_and_replays_mixed_views_pixel_for_pixel(tiny_config, tmp_path):
    cfg = tiny_config(
        "data.augment.mix=both", "data.augment.mix_prob=0.8", "train.cache_teacher_features=true",
        "train.cache_views_per_image=1", f"train.teacher_feature_dir={tmp_path / 'cache'}", "train.epochs=3",
        "train.max_steps_per_epoch=6", "train.cache_probe_every_n_steps=2", "train.telemetry=false",
    )  # fmt: skip
    kept = KeepFillBatches()
    trainer = Trainer(cfg, CPU, show_progress=False, callbacks=[kept])
    summary = trainer.fit(tmp_path / "run")
    # 48 images × 1 view = 6 fill batches, then 12 replayed ones; the probes ran the teacher on replayed mixes.
    assert len(kept.fill) == 6 and kept.replayed == 12
    assert summary["cache_missing_rows"] == 0
    assert summary["teacher_probe_batches"] >= 2 and summary["cache_fidelity_min"] > 0.999
    cache = trainer.parts.targets.cache
    assert (
        cache.mixed
        and json.loads((tmp_path / "cache" / "header.json").read_text())["augment"]["mix"] == "both"
    )
    for batch in kept.fill:
        ids, slots = batch.stream_ids.numpy(), batch.cache.slots
        record = cache.read_views(ids, slots)
        assert torch.equal(record.mix.partner_id, batch.view.mix.partner_id)
        assert torch.equal(record.mix.box, batch.view.mix.box) and torch.equal(
            record.mix.lam, batch.view.mix.lam
        )
        replayed = mix_images(
            render(trainer, torch.from_numpy(ids), record),
            render(trainer, record.mix.partner_id, record.mix.partner_view),
            record.mix.lam,
            record.mix.box,
        )
        assert torch.equal(replayed, batch.images), "a stored mix record renders the pixels the teacher saw"
    # And the replay stream itself: its batches are the stored mixes, pixel for pixel, and it renders a partner
    # only for the rows that were mixed (mix_prob 0.8: some rows were not).
    filled = {int(i): image for b in kept.fill for i, image in zip(b.stream_ids, b.images, strict=True)}
    stream = make_cached_train_stream(
        cfg.stream_settings(), trainer.parts.train_index, CPU, cache=cache, mode=cfg.train.cache_mode
    )  # complete cache: replays at once
    try:
        batch = next(iter(stream))
    finally:
        stream.close()
    assert batch.cache.from_cache and batch.view.mix is not None
    assert torch.equal(batch.images, torch.stack([filled[int(i)] for i in batch.stream_ids]))
    shown = int(batch.view.mix.shows_partner().sum())
    assert 0 < shown < len(batch), "the batch holds mixed and unmixed rows"
    assert stream.inner.views_rendered == len(batch) + shown, (
        "its own views, then partners of the mixed rows only"
    )
    live = trainer.parts.teacher(batch.images)
    assert torch.nn.functional.cosine_similarity(live.pooled, batch.cache.targets[0].pooled).min() > 0.999
    unmixed = render(trainer, batch.sample_ids, batch.view)
    assert not torch.equal(unmixed, batch.images)


def test_mixing_with_a_fixed_cache_is_refused(tiny_config, tmp_path):
    with pytest.raises(UserError, match=r"data\.augment\.mix=mixup with train\.cache_mode=fixed"):
        tiny_config(
            "data.augment.mix=mixup", "train.cache_teacher_features=true", "train.cache_mode=fixed",
            f"train.teacher_feature_dir={tmp_path}",
        )  # fmt: skip


def test_mixing_one_image_a_batch_is_refused(tiny_config):
    with pytest.raises(UserError, match=r"data\.augment\.mix=cutmix needs a partner .* train\.batch_size=1 "):
        tiny_config("data.augment.mix=cutmix", "train.batch_size=1")
    tiny_config("data.augment.mix=cutmix", "train.batch_size=2")  # the smallest batch that mixes


def test_a_cache_without_mixing_keeps_its_identity_and_a_mixed_run_refuses_it(tiny_config, tmp_path):
    common = (
        "train.cache_teacher_features=true", "train.cache_views_per_image=1", "train.epochs=1",
        "train.max_steps_per_epoch=1", f"train.teacher_feature_dir={tmp_path / 'cache'}", "train.telemetry=false",
    )  # fmt: skip
    Trainer(tiny_config(*common), CPU, show_progress=False).fit(tmp_path / "plain")
    header = json.loads((tmp_path / "cache" / "header.json").read_text())
    assert "mix" not in header["augment"] and "mix_rows" not in header
    with pytest.raises(UserError, match="built for something else"):
        Trainer(tiny_config(*common, "data.augment.mix=mixup"), CPU, show_progress=False)


def losses(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize("variant", ["one_view", "cache"])
def test_resume_with_mixing_is_bit_exact(tiny_config, tmp_path, variant):
    extra = {
        "one_view": (),
        "cache": (
            "train.cache_teacher_features=true", "train.cache_views_per_image=1",
            f"train.teacher_feature_dir={tmp_path / 'cache'}",
        ),
    }[variant]  # fmt: skip
    # 48 images / 8 = 6 steps per pass: with the cache, the resume point (step 4) is in the fill, the end in replay.
    cfg = tiny_config(
        "data.augment.mix=both", "train.epochs=3", "train.max_steps_per_epoch=3", "train.save_every_n_steps=2",
        "train.keep_last_checkpoints=10", "train.telemetry=false", *extra,
    )  # fmt: skip
    Trainer(cfg, CPU, show_progress=False).fit(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_000000004.pt"
    assert checkpoint.exists()
    resumed = Trainer(cfg, CPU, show_progress=False, resume_from=checkpoint)
    resumed.fit(tmp_path / "resumed")
    whole, after = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(after) == [5, 6, 7, 8, 9]
    assert all(after[s] == whole[s] for s in after), (after, whole)
    mine, theirs = (
        load_file(tmp_path / "resumed" / "student.safetensors"),
        load_file(tmp_path / "whole" / "student.safetensors"),
    )
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "final weights are not bit-identical"
