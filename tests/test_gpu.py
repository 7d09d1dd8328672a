"""GPU paths: DALI decodes on the GPU ("mixed") and the batch lands on CUDA. Skipped without a CUDA GPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from dali_kd.data.dali_loader import DaliTrainStream, DaliViewRenderer, dali_eval_batches
from dali_kd.data.dataset import ImageIndex
from dali_kd.trainer import Trainer
from pipelines.params import AugmentParams, EvalParams, MultiCropParams

pytestmark = pytest.mark.gpu


def test_gpu_stream_matches_cpu_structure_and_replays(image_tree):
    index = ImageIndex.from_folder(image_tree / "train")
    params = AugmentParams(image_size=32)
    gpu = next(iter(DaliTrainStream(index, params, batch_size=8, seed=0, device="cuda")))
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


def test_gpu_multi_crop_decodes_once_and_every_crop_replays(image_tree):
    index = ImageIndex.from_folder(image_tree / "train")
    view = AugmentParams(image_size=32)
    params = MultiCropParams(
        global_view=view,
        local_view=AugmentParams(**{**vars(view), "image_size": 16}),
        num_global=2,
        num_local=4,
    )
    batch = next(iter(DaliTrainStream(index, params, batch_size=8, seed=0, device="cuda")))
    assert batch.images.is_cuda and batch.images.shape == (8, 2, 3, 32, 32)
    assert batch.local_images.is_cuda and batch.local_images.shape == (8, 4, 3, 16, 16)
    crops = [batch.images[:, v].clone() for v in range(2)] + [
        batch.local_images[:, v].clone() for v in range(4)
    ]
    for v, crop in enumerate(crops):
        renderer = DaliViewRenderer(
            index, params.view_params(v), batch_size=8, device="cuda", full_decode=True
        )
        assert (renderer.render(batch.sample_ids, batch.view.select(v)) - crop).abs().max() < 0.05


def test_gpu_multi_crop_training_steps(tiny_config, tmp_path):
    cfg = tiny_config("train.device=cuda", "train.use_local_crops=true", "data.local_crop_size=16")
    summary = Trainer(cfg, torch.device("cuda"), show_progress=False).fit(tmp_path / "run")
    assert summary["steps"] == 6 and summary["device"].startswith("cuda")
