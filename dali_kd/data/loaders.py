"""Backend choice: one place that builds the training stream and the eval batches for `data.backend`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dali_kd.config import Config
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex


def make_train_stream(
    cfg: Config, index: ImageIndex, device: torch.device, rank: int = 0, world_size: int = 1
):
    """An endless stream of Batch (see dali_kd.data.batch) with `num_samples`, `__iter__` and `close()`."""
    if cfg.data.backend == "dali":
        from dali_kd.data.dali_loader import DaliTrainStream

        return DaliTrainStream(
            index,
            cfg.augment_params(),
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            device=device,
            num_threads=cfg.data.dali_threads,
            prefetch_batches=cfg.data.prefetch_batches,
            shard_id=rank,
            num_shards=world_size,
        )
    from dali_kd.data.torchvision_loader import TorchvisionTrainStream

    return TorchvisionTrainStream(
        index,
        cfg.augment_params(),
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers,
        persistent_workers=cfg.train.persistent_workers,
        shard_id=rank,
        num_shards=world_size,
        pin_memory=device.type == "cuda",
    )


def make_eval_batches(
    cfg: Config, index: ImageIndex, device: torch.device, batch_size: int
) -> Iterator[Batch]:
    """Every sample of index once, in order, with the eval transform, as batches on `device`."""
    if cfg.data.backend == "dali":
        from dali_kd.data.dali_loader import dali_eval_batches

        yield from dali_eval_batches(
            index, cfg.eval_params(), batch_size, device=device, num_threads=cfg.data.dali_threads
        )
        return
    from dali_kd.data.torchvision_loader import torchvision_eval_batches

    for batch in torchvision_eval_batches(
        index, cfg.eval_params(), batch_size, num_workers=cfg.train.num_workers
    ):
        yield batch.to(device, non_blocking=True)
