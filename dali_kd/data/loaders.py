"""Backend choice: one place that builds the training stream and the eval batches for `data.backend`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dali_kd.config import Config
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.mixing import MixingStream, MixParams
from dali_kd.data.stream import TrainStream
from dali_kd.errors import UserError
from dali_kd.pipelines.params import MultiCropParams

# data.output_dtype as the torch dtype the torchvision backend casts its images to (DALI's graph writes it itself).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def make_train_stream(
    cfg: Config,
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
    check_resumed_backend(cfg, state)
    return with_mixing(_backend_stream(cfg, index, device, rank, world_size, state), cfg, rank, state)


def check_resumed_backend(cfg: Config, state: dict | None) -> None:
    """Refuse to continue a stream of another backend than data.backend."""
    if state is not None and state.get("backend") != cfg.data.backend:
        raise UserError(
            f"--resume: the checkpoint's data stream is {state.get('backend')}, data.backend is {cfg.data.backend}"
        )


def with_mixing(stream: TrainStream, cfg: Config, rank: int, state: dict | None) -> TrainStream:
    """The stream with its batches mixed as data.augment.mix says (the stream itself without mixing)."""
    mix = MixParams.from_config(cfg.data.augment)
    return stream if mix is None else MixingStream(stream, mix, cfg.train.seed, rank, state)


def _backend_stream(
    cfg: Config,
    index: ImageIndex,
    device: torch.device,
    rank: int,
    world_size: int,
    state: dict | None,
) -> TrainStream:
    substitutions = {int(k): v for k, v in state.get("substitutions", {}).items()} if state else None
    if cfg.data.backend == "dali":
        from dali_kd.data.dali_loader import DaliTrainStream

        if state is not None:
            _check_multi_crop_graph(cfg, device, state)
        return DaliTrainStream(
            index,
            cfg.crop_params(),
            batch_size=cfg.train.batch_size,
            # Augmentations differ per rank; the file shuffle is shared, so that the shards stay disjoint.
            seed=cfg.train.seed + rank,
            reader_seed=cfg.train.seed,
            device=device,
            num_threads=cfg.data.dali_threads,
            prefetch_batches=cfg.data.prefetch_batches,
            shard_id=rank,
            num_shards=world_size,
            checkpoint=bytes(state["pipeline"].numpy()) if state else None,
            substitutions=substitutions,
            max_runtime_quarantine=cfg.data.max_runtime_quarantine,
            decode=cfg.decode_params(),
            shuffle_buffer=cfg.data.shuffle_buffer,
            start_position=int(state.get("position", 0)) if state else 0,
        )
    from dali_kd.data.torchvision_loader import TorchvisionTrainStream

    return TorchvisionTrainStream(
        index,
        cfg.crop_params(),
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers,
        persistent_workers=cfg.train.persistent_workers,
        shard_id=rank,
        num_shards=world_size,
        device=device,
        start_position=state["position"] if state else 0,
        dtype=TORCH_DTYPES[cfg.data.output_dtype],
        max_runtime_quarantine=cfg.data.max_runtime_quarantine,
        substitutions=substitutions,
    )


def _check_multi_crop_graph(cfg: Config, device: torch.device, state: dict) -> None:
    """Refuse to resume multi-crop through another graph than the checkpoint's (data.multi_crop_graph=auto picks
    by device, and train.device may change on resume): its pipeline state and random draws belong to that graph."""
    from dali_kd.data.dali_loader import stream_multi_crop_graph

    saved = state.get("multi_crop_graph")
    params = cfg.crop_params()
    if saved is None or not isinstance(params, MultiCropParams):
        return
    now = stream_multi_crop_graph(params, device)
    if now != saved:
        raise UserError(
            f"--resume: the checkpoint's multi-crop was cut by the {saved} graph, this run would use {now} "
            f"(data.multi_crop_graph={params.graph} on {device.type}); set data.multi_crop_graph={saved}"
        )


def make_eval_batches(
    cfg: Config, index: ImageIndex, device: torch.device, batch_size: int
) -> Iterator[Batch]:
    """Every sample of index once, in order, with the eval transform, as batches with every tensor on `device`."""
    if cfg.data.backend == "dali":
        from dali_kd.data.dali_loader import dali_eval_batches

        yield from dali_eval_batches(
            index, cfg.eval_params(), batch_size, device=device, num_threads=cfg.data.dali_threads,
            decode=cfg.decode_params(),
        )  # fmt: skip
        return
    from dali_kd.data.torchvision_loader import torchvision_eval_batches

    yield from torchvision_eval_batches(
        index, cfg.eval_params(), batch_size, num_workers=cfg.train.num_workers, device=device,
        dtype=TORCH_DTYPES[cfg.data.output_dtype],
    )  # fmt: skip
