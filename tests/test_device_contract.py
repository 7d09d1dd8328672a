"""The device contract: every training stream and the eval batches put every tensor of a Batch on the trainer's
device, and the trainer never moves a batch itself.

On this CPU machine PyTorch's `meta` device stands in for a GPU: models, optimizer and batches on `meta` run the
forward, backward and AdamW step (shapes only, no arithmetic), and any host tensor mixed in raises "Tensor on device
meta is not on the expected device cpu" — exactly the failure a CPU batch meets on CUDA. The DALI pipelines run in
CPU-only mode, as a GPU pipeline's host outputs (ids, view records) do, so the streams must move them.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_eval_batches
from dali_kd.data.transfer import one_ahead
from dali_kd.training.trainer import Trainer

META = torch.device("meta")
MULTI_CROP = ("train.use_local_crops=true", "data.local_crop_size=16", "data.num_local_crops=2")
PATHS = {
    "dali": (),
    "dali-multi-crop": MULTI_CROP,
    "torchvision": ("data.backend=torchvision",),
    "torchvision-multi-crop": ("data.backend=torchvision", *MULTI_CROP),
}
STEPS = 2


def assert_on_device(batch: Batch, device: torch.device) -> None:
    elsewhere = {name: str(t.device) for name, t in batch.tensors().items() if t.device != device}
    assert not elsewhere, f"batch tensors not on {device}: {elsewhere}"


def train_steps(trainer: Trainer, steps: int = STEPS) -> list[Batch]:
    """Real training steps straight from the trainer's own stream (what fit() does, without the host-side logging
    a meta tensor cannot answer)."""
    batches = []
    stream = iter(trainer.parts.stream)
    for _ in range(steps):
        batch = next(stream)
        assert_on_device(batch, trainer.device)
        losses = trainer.train_step(batch)
        assert {t.device for t in losses.values()} == {trainer.device}
        batches.append(batch)
    return batches


@pytest.mark.parametrize("path", list(PATHS))
def test_every_training_stream_trains_on_the_trainers_device(tiny_config, path):
    trainer = Trainer(tiny_config(*PATHS[path]), META, show_progress=False)
    try:
        batches = train_steps(trainer)
    finally:
        trainer.parts.stream.close()
    assert trainer.step == STEPS
    # AdamW really stepped: its moments exist, on the device, for every trained parameter.
    moments = [s["exp_avg"] for s in trainer.parts.optimizer.state.values()]
    assert moments and {m.device for m in moments} == {META}
    if "multi-crop" in path:
        assert batches[0].multi_crop and batches[0].local_images is not None
    # Host copies of the ids, for the cache and the quarantine, without reading the device.
    assert batches[0].host_ids is not None and batches[0].host_stream_ids is not None


def test_cached_replay_trains_on_the_trainers_device(tiny_config, tmp_path):
    cache = ("train.cache_teacher_features=true", f"train.teacher_feature_dir={tmp_path / 'cache'}",
             "train.cache_views_per_image=1", "train.cache_probe_every_n_steps=1")  # fmt: skip
    # The cache is filled by a real CPU run (writing rows reads the teacher's outputs, which meta has none of).
    filler = Trainer(tiny_config(*cache), torch.device("cpu"), show_progress=False)
    stream = iter(filler.parts.stream)
    while not filler.parts.stream.replaying:
        filler.train_step(next(stream))
    filler.parts.stream.close()
    assert filler.parts.targets.cache.is_complete()

    trainer = Trainer(tiny_config(*cache), META, show_progress=False)
    try:
        batches = train_steps(trainer)
    finally:
        trainer.parts.stream.close()
    assert all(b.cache.from_cache for b in batches)
    # The cached targets were read ahead by the stream, onto the device, off the step's path.
    assert all(b.cache.targets is not None for b in batches)
    assert trainer.parts.targets.counters.probe_batches == STEPS  # the probe's teacher ran on the device too
    assert trainer.parts.targets.live.forward_batches == 0


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_eval_batches_are_on_the_trainers_device(tiny_config, image_tree, backend):
    cfg = tiny_config(f"data.backend={backend}")
    index = ImageIndex.from_folder(image_tree / "val")
    batches = list(make_eval_batches(replace(cfg.stream_settings(), batch_size=5), index, META))
    for batch in batches:
        assert_on_device(batch, META)
    assert sum(len(b) for b in batches) == index.num_samples


def test_a_cpu_run_keeps_its_batches_on_the_cpu_with_matching_host_ids(tiny_config):
    trainer = Trainer(tiny_config("data.backend=torchvision"), torch.device("cpu"), show_progress=False)
    try:
        for batch in itertools.islice(trainer.parts.stream, 2):
            assert_on_device(batch, torch.device("cpu"))
            assert torch.equal(batch.sample_ids, torch.from_numpy(batch.host_ids))
            assert torch.equal(batch.stream_ids, torch.from_numpy(batch.host_stream_ids))
    finally:
        trainer.parts.stream.close()


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_float16_images_reach_the_models_from_both_backends(tiny_config, image_tree, backend):
    """data.output_dtype=float16: half the bytes per batch, under bf16 autocast the models take them as they come."""
    cfg = tiny_config(f"data.backend={backend}", "data.output_dtype=float16", "train.precision=bf16")
    trainer = Trainer(cfg, torch.device("cpu"), show_progress=False)
    try:
        batch = next(iter(trainer.parts.stream))
        assert batch.images.dtype == torch.float16
        losses = trainer.train_step(batch)
    finally:
        trainer.parts.stream.close()
    assert torch.isfinite(losses["loss"])
    val = ImageIndex.from_folder(image_tree / "val")
    assert {
        b.images.dtype
        for b in make_eval_batches(replace(cfg.stream_settings(), batch_size=8), val, torch.device("cpu"))
    } == {torch.float16}


@pytest.mark.parametrize(("decode", "prefetch"), [("window", 1), ("full", 1), ("window", 2)])
def test_replayed_views_are_the_filled_views_pixel_for_pixel(tiny_config, tmp_path, decode, prefetch):
    """The replay renderer decodes as the training pipeline did (data.decode), so a cached target's view comes back
    exactly: with one view per image, every replayed image equals the image the teacher saw while filling; and so
    do the cached targets the stream reads ahead. prefetch: replayed batches DALI renders ahead (1: in turn)."""
    cfg = tiny_config(
        f"data.decode={decode}", "train.cache_teacher_features=true", f"train.teacher_feature_dir={tmp_path}",
        "train.cache_views_per_image=1", "train.cache_probe_every_n_steps=null", f"data.prefetch_batches={prefetch}",
    )  # fmt: skip
    trainer = Trainer(cfg, torch.device("cpu"), show_progress=False)
    seen: dict[int, torch.Tensor] = {}
    targets: dict[int, torch.Tensor] = {}
    stream = iter(trainer.parts.stream)
    try:
        while not trainer.parts.stream.replaying:
            batch = next(stream)
            seen.update(zip(batch.host_ids.tolist(), batch.images.clone(), strict=True))
            out = trainer.parts.teacher(batch.images)
            targets.update(zip(batch.host_ids.tolist(), out.pooled, strict=True))
            trainer.train_step(batch)
        replayed = [next(stream) for _ in range(3)]
    finally:
        trainer.parts.stream.close()
    for batch in replayed:
        assert batch.cache.from_cache
        for k, i in enumerate(batch.host_ids.tolist()):
            assert torch.equal(batch.images[k], seen[i]), f"sample {i} replayed to other pixels"
            # The cached row of that view (stored as fp16: equal to its rounding).
            assert torch.allclose(batch.cache.targets[0].pooled[k], targets[i], rtol=1e-2, atol=1e-2)


def test_one_ahead_starts_the_next_copy_before_handing_out_a_batch():
    """The look-ahead CUDA uses, on the CPU: batch N+1 is taken (and its copy started) before batch N is handed out;
    every batch keeps its own payload and nothing is lost at the end."""
    taken = []

    def host_batches():
        for i in range(4):
            taken.append(i)
            yield Batch(images=torch.full((1, 3, 2, 2), float(i)), labels=torch.tensor([i]),
                        sample_ids=torch.tensor([i])), f"payload {i}"  # fmt: skip

    handed = []
    for batch, payload in one_ahead(host_batches(), META, ahead=True):
        i = int(payload.split()[1])
        assert taken[-1] == min(i + 1, 3), "the next batch is taken before this one is handed out"
        assert_on_device(batch, META)
        handed.append(i)
    assert handed == [0, 1, 2, 3]
    # Without the look-ahead (any device but CUDA) no batch is taken early.
    taken.clear()
    for _, payload in one_ahead(host_batches(), META):
        assert taken[-1] == int(payload.split()[1])
