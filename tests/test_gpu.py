"""GPU paths: DALI decodes on the GPU ("mixed") and the batch lands on CUDA. Skipped without a CUDA GPU."""

from __future__ import annotations

import contextlib
import itertools
import sys
from pathlib import Path

import pytest
import torch

from dali_kd.config import StreamSettings
from dali_kd.data.dali_loader import DaliTrainStream, dali_eval_batches
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_train_stream
from dali_kd.data.mixing import mix_images
from dali_kd.pipelines.params import AugmentParams, EvalParams, MultiCropParams
from dali_kd.teacher_cache.renderer import DaliViewRenderer
from dali_kd.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_paths import make_watcher, off_device_fields  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
MULTI_CROP = ("train.use_local_crops=true", "data.local_crop_size=16", "data.num_local_crops=2")
STREAMS = {
    "dali": (),
    "dali-multi-crop": MULTI_CROP,
    "torchvision": ("data.backend=torchvision", "train.num_workers=2"),
    "torchvision-multi-crop": ("data.backend=torchvision", "train.num_workers=2", *MULTI_CROP),
}


def test_gpu_stream_matches_cpu_structure_and_replays(image_tree):
    index = ImageIndex.from_folder(image_tree / "train")
    params = AugmentParams(view_size=32)
    gpu = next(iter(DaliTrainStream(StreamSettings.with_defaults(params, 8, 0), index, "cuda")))
    assert gpu.images.is_cuda and gpu.labels.is_cuda and gpu.images.shape == (8, 3, 32, 32)
    images = gpu.images.clone()
    again = DaliViewRenderer(index, params, batch_size=8, device="cuda").render(gpu.sample_ids, gpu.view)
    # The GPU decoder may differ from itself by rounding only.
    assert (again - images).abs().max() < 0.05
    evals = list(dali_eval_batches(index, EvalParams(32, 36), batch_size=16, device="cuda"))
    assert sum(len(b) for b in evals) == index.num_samples and evals[0].images.is_cuda


def test_gpu_training_steps(tiny_config, tmp_path):
    cfg = tiny_config("train.device=cuda")
    summary = Trainer(cfg, torch.device("cuda"), show_progress=False).fit(tmp_path / "run")
    assert summary["device"].startswith("cuda") and summary["precision"] == "bfloat16"
    assert summary["steps"] == 6


def test_gpu_and_cpu_decode_agree(image_tree):
    index = ImageIndex.from_folder(image_tree / "val")
    params = EvalParams(32, 36)
    cpu = torch.cat([b.images for b in dali_eval_batches(index, params, 8)])
    gpu = torch.cat(
        [b.images.cpu() for b in itertools.islice(dali_eval_batches(index, params, 8, device="cuda"), 100)]
    )
    assert (cpu - gpu).abs().mean() < 0.05


@pytest.mark.parametrize("graph", ["auto", "per_crop"])
def test_gpu_multi_crop_decodes_once_and_every_crop_replays(image_tree, graph):
    """auto is the batched graph on a GPU; the per-crop graph is the CPU's default."""
    index = ImageIndex.from_folder(image_tree / "train")
    view = AugmentParams(view_size=32)
    params = MultiCropParams(
        global_view=view,
        local_view=AugmentParams(**{**vars(view), "view_size": 16}),
        num_global=2,
        num_local=4,
        graph=graph,
    )
    batch = next(iter(DaliTrainStream(StreamSettings.with_defaults(params, 8, 0), index, "cuda")))
    assert batch.images.is_cuda and batch.images.shape == (8, 2, 3, 32, 32)
    assert batch.local_images.is_cuda and batch.local_images.shape == (8, 4, 3, 16, 16)
    crops = [batch.images[:, v].clone() for v in range(2)] + [
        batch.local_images[:, v].clone() for v in range(4)
    ]
    for v, crop in enumerate(crops):
        renderer = DaliViewRenderer(
            index,
            params.view_params(v),
            batch_size=8,
            device="cuda",
            full_decode=True,
            multi_crop_graph=graph,
        )
        assert (renderer.render(batch.sample_ids, batch.view.select(v)) - crop).abs().max() < 0.05


def test_gpu_multi_crop_training_steps(tiny_config, tmp_path):
    cfg = tiny_config("train.device=cuda", "train.use_local_crops=true", "data.local_crop_size=16")
    summary = Trainer(cfg, torch.device("cuda"), show_progress=False).fit(tmp_path / "run")
    assert summary["steps"] == 6 and summary["device"].startswith("cuda")


# ---- the device contract: every tensor of a training batch is on the trainer's device ---------------------------
@pytest.mark.parametrize("path", list(STREAMS))
def test_training_streams_on_cuda_put_every_batch_tensor_on_cuda(tiny_config, image_tree, path):
    cfg = tiny_config("train.device=cuda", *STREAMS[path])
    stream = make_train_stream(cfg.stream_settings(), ImageIndex.from_folder(image_tree / "train"), CUDA)
    try:
        batches = list(itertools.islice(iter(stream), 3))
    finally:
        stream.close()
    for batch in batches:
        assert off_device_fields(batch, CUDA) == {}
        assert batch.images.is_cuda and batch.labels.is_cuda and batch.sample_ids.is_cuda
        if "multi-crop" in path:
            assert batch.multi_crop and batch.local_images.is_cuda


def test_replay_renderer_returns_cuda_tensors(image_tree):
    index = ImageIndex.from_folder(image_tree / "train")
    params = AugmentParams(view_size=32)
    # Views drawn and recorded by the CPU pipeline, rendered again on the GPU from host records.
    recorded = next(iter(DaliTrainStream(StreamSettings.with_defaults(params, 8, 0), index, "cpu")))
    renderer = DaliViewRenderer(index, params, batch_size=8, device="cuda")
    images = renderer.render(recorded.sample_ids.cpu().numpy(), recorded.view.to("cpu"))
    assert images.is_cuda and images.shape == (8, 3, 32, 32)
    # The same views: the GPU decoder differs from the CPU one by rounding only.
    assert (images.cpu() - recorded.images.cpu()).abs().mean() < 0.1


def test_cached_replay_on_cuda_keeps_every_batch_tensor_on_cuda(tiny_config, tmp_path):
    """A fill pass (teacher on the GPU), then replayed views rendered on the GPU; the fidelity probe runs the
    teacher on replayed batches too."""
    cfg = tiny_config(
        "train.device=cuda",
        "train.epochs=4",  # 12 steps: the 6-step fill pass, then 6 replayed
        "train.cache_teacher_features=true",
        f"train.teacher_feature_dir={tmp_path / 'cache'}",
        "train.cache_views_per_image=1",
        "train.cache_probe_every_n_steps=2",
    )
    watcher = make_watcher()
    summary = Trainer(cfg, CUDA, show_progress=False, callbacks=[watcher]).fit(tmp_path / "run")
    assert watcher.off_device == {}, watcher.off_device
    assert watcher.batches == 12 and watcher.from_cache > 0 and summary["cache_hits"] > 0
    # Replayed views rendered ahead on a thread and copied device to device: the teacher agrees with its cache.
    assert summary["cache_fidelity_min"] > 0.999


def test_each_model_gets_its_own_input_on_cuda(tiny_config, tmp_path):
    """A 48 px teacher with CLIP statistics and a 32 px student from one 48 px view, bf16 autocast, fp16 images:
    the adapters run on the device and the run evaluates head and k-NN, with an EMA (none of it has met a GPU)."""
    cfg = tiny_config(
        "train.device=cuda", "train.precision=bf16", "data.output_dtype=float16", "data.teacher_image_size=48",
        "model.teacher.mean=[0.48145466,0.4578275,0.40821073]", "model.teacher.std=[0.26862954,0.26130258,0.27577711]",
        "train.ema_decay=0.9", "train.epochs=1", "train.max_steps_per_epoch=2",
    )  # fmt: skip
    trainer = Trainer(cfg, CUDA, show_progress=False)
    batch = next(iter(trainer.parts.stream))
    assert batch.images.is_cuda and batch.images.dtype == torch.float16 and batch.images.shape[-1] == 48
    student_view = trainer.parts.student.input(batch.images)
    assert student_view.is_cuda and student_view.shape[-1] == 32
    summary = trainer.fit(tmp_path / "run")
    assert summary["student_knn_top1"] is not None and summary["student_ema_knn_top1"] is not None
    assert summary["inputs"]["teacher"]["size"] == 48


def test_mixed_views_on_cuda_replay_from_their_record(tiny_config, tmp_path):
    """Function matching on the GPU: the mixing step runs on CUDA after DALI's mixed decoder, the record renders the
    same mixed pixels again (to the GPU decoder's rounding), mixed multi-crop trains, and a cached run replays
    mixed views (none of it has met a GPU)."""
    cfg = tiny_config("train.device=cuda", "data.augment.mix=both", "train.epochs=1")
    trainer = Trainer(cfg, CUDA, show_progress=False)
    batch = next(iter(trainer.parts.stream))
    mix = batch.view.mix
    assert batch.images.is_cuda and mix is not None and mix.lam.is_cuda
    renderer = DaliViewRenderer(trainer.parts.train_index, cfg.augment_params(), len(batch), device="cuda")
    own = renderer.render(batch.sample_ids.cpu().numpy(), batch.view.to(CPU))
    partner = renderer.render(mix.partner_id.cpu().numpy(), mix.partner_view.to(CPU))
    again = mix_images(own, partner, mix.lam, mix.box)
    assert (again.float() - batch.images.float()).abs().max() < 0.05
    trainer.parts.stream.close()
    multi_crop = tiny_config("train.device=cuda", "data.augment.mix=both", *MULTI_CROP, "train.epochs=1")
    assert Trainer(multi_crop, CUDA, show_progress=False).fit(tmp_path / "multi-crop")["steps"] > 0
    cached = tiny_config(
        "train.device=cuda", "data.augment.mix=mixup", "train.cache_teacher_features=true",
        f"train.teacher_feature_dir={tmp_path / 'cache'}", "train.cache_views_per_image=1", "train.epochs=3",
        "train.max_steps_per_epoch=6", "train.cache_probe_every_n_steps=2",
    )  # fmt: skip
    summary = Trainer(cached, CUDA, show_progress=False).fit(tmp_path / "run")
    assert summary["cache_hits"] > 0 and summary["cache_fidelity_min"] > 0.999


# ---- no host synchronisation in a steady step -----------------------------------------------------------------
SYNC_FREE_PATHS = {
    "dali": (),
    "torchvision": ("data.backend=torchvision", "train.num_workers=2"),
    "teacher-cache": ("train.cache_teacher_features=true", "train.cache_views_per_image=1"),
    "multi-crop": MULTI_CROP,
    "mixup": ("data.augment.mix=mixup",),
    "ema": ("train.ema_decay=0.9",),
}
WARM_UP_STEPS = 2  # the first steps compile the teacher and the student
FILL_STEPS = (
    6  # 48 images, batch 8, one view each: the cache's fill pass, whose writes copy targets to the host
)


@contextlib.contextmanager
def sync_errors(on: bool):
    """Any host synchronisation torch makes in this block raises (set_sync_debug_mode is process-wide)."""
    torch.cuda.set_sync_debug_mode("error" if on else "default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class CheckedStream:
    """The trainer's data stream, each next batch fetched under sync_errors(checking())."""

    def __init__(self, stream, checking):
        self._stream, self._checking = stream, checking

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __iter__(self):
        batches = iter(self._stream)
        while True:
            with sync_errors(self._checking()):
                batch = next(batches)
            yield batch


@pytest.mark.parametrize("path", list(SYNC_FREE_PATHS))
def test_steady_steps_never_synchronise_the_host_with_the_gpu(tiny_config, tmp_path, path):
    """At least 20 steps of every path (data, teacher or cache, student, optimizer, EMA) run under
    torch.cuda.set_sync_debug_mode("error"); the log steps' reads, checkpoints and evaluations stay outside (they
    run between steps), as do the warm-up steps that compile and the teacher cache's fill pass."""
    cache = (f"train.teacher_feature_dir={tmp_path / 'cache'}",) if path == "teacher-cache" else ()
    cfg = tiny_config(
        "train.device=cuda", "train.epochs=5", "train.max_steps_per_epoch=6", "train.log_every_n_steps=10",
        "train.eval_every_n_epochs=5", *SYNC_FREE_PATHS[path], *cache,
    )  # fmt: skip
    trainer = Trainer(cfg, CUDA, show_progress=False)
    first_checked = WARM_UP_STEPS + (FILL_STEPS if cache else 0)
    checked = []

    def checking() -> bool:  # the step about to run is trainer.step + 1
        return trainer.step + 1 > first_checked

    trainer.parts.stream = CheckedStream(trainer.parts.stream, checking)
    step = trainer.train_step

    def checked_step(batch):
        on = checking()
        if on:
            checked.append(batch.cache is not None and batch.cache.from_cache)
        with sync_errors(on):
            return step(batch)

    trainer.train_step = checked_step
    summary = trainer.fit(tmp_path / "run")
    assert summary["steps"] == 30 and len(checked) >= 20
    if cache:
        assert all(checked), "a checked step of the cache path was not a replayed one"
