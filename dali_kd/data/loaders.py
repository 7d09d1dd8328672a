"""Backend choice: one place that builds the training stream and the eval batches for `data.backend`.

Each takes StreamSettings (dali_kd.config.stream_settings): the data section, and what a stream needs from the
others (the views sized for the models, the batch, the seed, the workers), as a Config's stream_settings() gives."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dali_kd.config import DataConfig, StreamSettings
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.mixing import MixingStream, MixParams
from dali_kd.data.stream import TrainStream
from dali_kd.errors import UserError
from dali_kd.pipelines.params import MultiCropParams


def make_train_stream(
    settings: StreamSettings,
    index: ImageIndex,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
) -> TrainStream:
    """The training stream for `data.backend`, as a TrainStream (dali_kd.data.stream); `state` (an earlier stream's
    state_dict()) continues that stream exactly where it stopped, with the same runtime substitutions. With
    data.augment.mix its batches leave mixed (dali_kd.data.mixing), on every backend. (With a teacher cache the
    stream is dali_kd.teacher_cache.stream's.)"""
    check_resumed_backend(settings.data, state)
    stream = _backend_stream(settings, index, device, rank, world_size, state)
    return with_mixing(stream, settings, rank, state)


def check_resumed_backend(data: DataConfig, state: dict | None) -> None:
    """Refuse to continue a stream of another backend than data.backend."""
    if state is not None and state.get("backend") != data.backend:
        raise UserError(
            f"--resume: the checkpoint's data stream is {state.get('backend')}, data.backend is {data.backend}"
        )


def with_mixing(stream: TrainStream, settings: StreamSettings, rank: int, state: dict | None) -> TrainStream:
    """The stream with its batches mixed as data.augment.mix says (the stream itself without mixing)."""
    mix = MixParams.from_config(settings.data.augment)
    return stream if mix is None else MixingStream(stream, mix, settings.seed, rank, state)


def _backend_stream(
    settings: StreamSettings,
    index: ImageIndex,
    device: torch.device,
    rank: int,
    world_size: int,
    state: dict | None,
) -> TrainStream:
    if settings.data.backend == "dali":
        from dali_kd.data.dali_loader import DaliTrainStream

        if state is not None:
            _check_multi_crop_graph(settings, device, state)
        return DaliTrainStream(settings, index, device, rank, world_size, state)
    from dali_kd.data.torchvision_loader import TorchvisionTrainStream

    return TorchvisionTrainStream(settings, index, device, rank, world_size, state)


def _check_multi_crop_graph(settings: StreamSettings, device: torch.device, state: dict) -> None:
    """Refuse to resume multi-crop through another graph than the checkpoint's (data.multi_crop_graph=auto picks
    by device, and train.device may change on resume): its pipeline state and random draws belong to that graph."""
    from dali_kd.data.dali_loader import stream_multi_crop_graph

    saved = state.get("multi_crop_graph")
    params = settings.crops
    if saved is None or not isinstance(params, MultiCropParams):
        return
    now = stream_multi_crop_graph(params, device)
    if now != saved:
        raise UserError(
            f"--resume: the checkpoint's multi-crop was cut by the {saved} graph, this run would use {now} "
            f"(data.multi_crop_graph={params.graph} on {device.type}); set data.multi_crop_graph={saved}"
        )


def make_eval_batches(settings: StreamSettings, index: ImageIndex, device: torch.device) -> Iterator[Batch]:
    """Every sample of index once, in order, with the eval transform, as batches of settings.batch_size (the last
    one may be partial) with every tensor on `device`."""
    batch_size = settings.batch_size
    if settings.data.backend == "dali":
        from dali_kd.data.dali_loader import dali_eval_batches

        yield from dali_eval_batches(
            index, settings.eval, batch_size, device=device, num_threads=settings.data.dali_threads,
            decode=settings.decode,
        )  # fmt: skip
        return
    from dali_kd.data.torchvision_loader import TORCH_DTYPES, torchvision_eval_batches

    yield from torchvision_eval_batches(
        index, settings.eval, batch_size, num_workers=settings.num_workers, device=device,
        dtype=TORCH_DTYPES[settings.data.output_dtype],
    )  # fmt: skip
