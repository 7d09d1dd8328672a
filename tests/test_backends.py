"""Both data backends yield the same batch structure and comparable pixels, so the trainer cannot tell them apart."""

from __future__ import annotations

import itertools

import pytest
import torch

from dali_kd.config import StreamSettings
from dali_kd.data.batch import ViewRecord
from dali_kd.data.dali_loader import DaliTrainStream, dali_eval_batches
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.pil_views import decode_rgb, render_pil
from dali_kd.data.torchvision_loader import TorchvisionTrainStream, torchvision_eval_batches
from dali_kd.pipelines.params import AugmentParams, EvalParams
from dali_kd.teacher_cache.renderer import DaliViewRenderer
from dali_kd.training.trainer import Trainer


@pytest.fixture(scope="module")
def index(image_tree) -> ImageIndex:
    return ImageIndex.from_folder(image_tree / "train")


def first_batch(stream):
    batch = next(iter(stream))
    stream.close()
    return batch


def test_same_structure(index):
    params = AugmentParams(view_size=32)
    dali = first_batch(DaliTrainStream(StreamSettings.with_defaults(params, 8, 0), index))
    tv = first_batch(TorchvisionTrainStream(StreamSettings.with_defaults(params, 8, 0), index))
    for a, b in [(dali, tv), (dali.view, tv.view)]:
        for name in vars(a):
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, torch.Tensor):
                assert (x.shape, x.dtype) == (y.shape, y.dtype), name


def test_comparable_statistics(index):
    """Over many random views, per-channel means and spreads of the two backends agree closely."""
    params = AugmentParams(view_size=32)
    settings = StreamSettings.with_defaults(params, 16, 0)
    dali = torch.cat([b.images for b in itertools.islice(DaliTrainStream(settings, index), 12)])
    tv_stream = TorchvisionTrainStream(settings, index)
    tv = torch.cat([b.images for b in itertools.islice(iter(tv_stream), 12)])
    tv_stream.close()
    dims = (0, 2, 3)
    assert torch.allclose(dali.mean(dim=dims), tv.mean(dim=dims), atol=0.15)
    assert torch.allclose(dali.std(dim=dims), tv.std(dim=dims), rtol=0.15)


def test_same_view_renders_nearly_the_same_pixels(index):
    """One recorded view (crop, flip, brightness) rendered by DALI and by PIL: small resampling differences only."""
    params = AugmentParams(view_size=32)
    ids = torch.tensor([1, 9, 20, 33])
    view = ViewRecord(
        crop_anchor=torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.3, 0.1], [0.2, 0.25]]),
        crop_shape=torch.tensor([[0.8, 0.7], [1.0, 1.0], [0.5, 0.6], [0.6, 0.5]]),
        flip=torch.tensor([0, 1, 0, 1]),
        jitter=torch.tensor(
            [[1.0, 1.0, 1.0, 0.0], [1.2, 1.0, 1.0, 0.0], [0.8, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
        ),
    )
    dali = DaliViewRenderer(index, params, batch_size=4).render(ids, view)
    pil = torch.stack(
        [
            render_pil(
                decode_rgb(index.files[i]),
                view.crop_anchor[k],
                view.crop_shape[k],
                bool(view.flip[k]),
                view.jitter[k],
                params,
            )
            for k, i in enumerate(ids.tolist())
        ]
    )
    std = torch.tensor(params.std).view(1, 3, 1, 1)
    diff = ((dali - pil) * std).abs()  # in 0..1 pixel units
    assert diff.mean() < 0.03, f"mean abs difference {diff.mean():.4f}"


def test_eval_batches_agree(image_tree):
    val = ImageIndex.from_folder(image_tree / "val")
    params = EvalParams(view_size=32, resize_size=36)
    dali = torch.cat([b.images for b in dali_eval_batches(val, params, batch_size=8)])
    tv = torch.cat([b.images for b in torchvision_eval_batches(val, params, batch_size=8)])
    assert dali.shape == tv.shape
    std = torch.tensor(params.std).view(1, 3, 1, 1)
    assert ((dali - tv) * std).abs().mean() < 0.03


def test_trainer_runs_on_the_torchvision_backend(tiny_config, tmp_path):
    cfg = tiny_config("data.backend=torchvision", "train.num_workers=2")
    summary = Trainer(cfg, torch.device("cpu"), show_progress=False).fit(tmp_path / "run")
    assert summary["backend"] == "torchvision" and summary["steps"] == 6
    assert summary["student_knn_top1"] is not None
