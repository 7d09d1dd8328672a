"""The torchvision backend: the original trainer's PIL + torchvision CPU path, yielding the same Batch as DALI.

The views themselves are drawn and rendered in dali_kd.data.pil_views; this module streams them in a DataLoader.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode

from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.pil_views import decode_rgb, draw_view, render_pil
from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.sampling import share_sample_ids, stream_keys, view_rng
from dali_kd.data.transfer import one_ahead
from dali_kd.pipelines.params import AugmentParams, EvalParams, MultiCropParams

# What a worker gets per sample: (stream position, slot id, the id of the image to try first). The main process
# knows the runtime quarantine and resolves the slot; the worker only meets files that fail after that.
ViewKey = tuple[int, int, int]

# data.output_dtype as the torch dtype the images are cast to (DALI's graph writes it itself).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class _TrainViews(Dataset):
    """Maps a view key to (images, local images, label, shown id, slot id, crop anchor, crop shape, flip, jitter,
    failed).

    One view per sample with AugmentParams; with MultiCropParams the image is decoded once and cut into the global
    crops ([G,3,S,S]) and local crops ([N,3,s,s], else None), with a record per crop (globals first). `failed` lists
    the (sample id, reason) of files that did not decode; the main process sets them aside.
    """

    def __init__(self, index: ImageIndex, params: AugmentParams | MultiCropParams, seed: int, rank: int):
        self.index = index
        self.files = index.files
        self.labels = index.labels
        self.params = params
        self.seed = seed
        self.rank = rank

    def _decode_or_replace(self, slot: int, start: int) -> tuple[Image.Image, int, list[tuple[int, str]]]:
        """Decode `start` (the slot's image); if it fails, the next same-class image that decodes (cyclically),
        which is RuntimeQuarantine's replacement rule for files that fail."""
        failed: list[tuple[int, str]] = []
        n = len(self.files)
        for step in range(n):
            candidate = (start + step) % n
            if self.labels[candidate] != self.labels[slot] or not self.index.can_stand_in(slot, candidate):
                continue
            try:
                return decode_rgb(self.index.image_file(candidate)), candidate, failed
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                failed.append((candidate, f"{type(e).__name__}: {str(e)[:150]}"))
        raise RuntimeError(f"no image of class {self.labels[slot]} decodes")

    def __getitem__(self, key: ViewKey) -> tuple:
        position, slot, start = key
        img, sample_id, failed = self._decode_or_replace(slot, start)
        rng = view_rng(self.seed, self.rank, position)
        params = self.params
        kinds = (
            [params]
            if isinstance(params, AugmentParams)
            else [params.view_params(i) for i in range(params.num_views)]
        )
        views = [draw_view(img, kind, rng) for kind in kinds]
        crops = [
            render_pil(img, a.tolist(), s.tolist(), f, j, kind)
            for (a, s, f, j), kind in zip(views, kinds, strict=True)
        ]
        anchors, shapes, flips, jitters = (list(field) for field in zip(*views, strict=True))
        label = self.labels[sample_id]
        if isinstance(params, AugmentParams):
            return (
                crops[0], None, label, sample_id, slot, anchors[0], shapes[0], flips[0], jitters[0], failed,
            )  # fmt: skip
        g = params.num_global
        local_crops = torch.stack(crops[g:]) if params.num_local else None
        return (
            torch.stack(crops[:g]), local_crops, label, sample_id, slot,
            np.stack(anchors), np.stack(shapes), flips, jitters, failed,
        )  # fmt: skip


class _StreamBatches(Sampler[list[ViewKey]]):
    """Consecutive chunks of the endless stream, so a batch may hold the end of one pass and the start of the next.

    Runs in the main process: each slot is resolved through the runtime quarantine as its batch is drawn.
    """

    def __init__(
        self,
        share_ids: np.ndarray,
        seed: int,
        batch_size: int,
        resolve: Callable[[int], int],
        start: int = 0,
    ):
        self.share_ids = share_ids
        self.seed = seed
        self.batch_size = batch_size
        self.resolve = resolve
        self.start = start

    def __iter__(self) -> Iterator[list[ViewKey]]:
        keys = stream_keys(self.share_ids, self.seed, self.start)
        while True:
            batch = [next(keys) for _ in range(self.batch_size)]
            yield [(position, slot, self.resolve(slot)) for position, slot in batch]


def _host_batch(collated: tuple) -> tuple[Batch, list[tuple[int, str]]]:
    """A collated (pinned) tuple as a host Batch with host copies of its ids, and the files that failed in it."""
    images, local_images, labels, ids, slots, anchors, shapes, flips, jitters = collated[:9]
    failed, host_ids, host_slots = collated[9:]
    batch = Batch(
        images=images,
        local_images=local_images,
        labels=labels,
        sample_ids=ids,
        stream_ids=slots,
        view=ViewRecord(crop_anchor=anchors, crop_shape=shapes, flip=flips, jitter=jitters),
        host_ids=host_ids,
        host_stream_ids=host_slots,
    )
    return batch, failed


def _collate_train(samples: list[tuple], dtype: torch.dtype = torch.float32) -> tuple:
    # A tuple of tensors (not a Batch) so that the DataLoader's pin_memory thread can pin every field; then the
    # (sample id, reason) of files that failed to decode in this batch, and the ids and slots as numpy arrays made
    # here in the worker, so that the training process never reads a tensor to learn them.
    images, local_images, labels, ids, slots, anchors, shapes, flips, jitters, failed = zip(
        *samples, strict=True
    )
    return (
        torch.stack(images).to(dtype),
        None if local_images[0] is None else torch.stack(local_images).to(dtype),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(slots, dtype=torch.int64),
        torch.from_numpy(np.stack(anchors)),
        torch.from_numpy(np.stack(shapes)),
        torch.tensor(flips, dtype=torch.int64),
        torch.tensor(jitters, dtype=torch.float32),
        [item for sample in failed for item in sample],
        np.asarray(ids, dtype=np.int64),
        np.asarray(slots, dtype=np.int64),
    )


class TorchvisionTrainStream:
    """An endless stream of full training batches from PIL + torchvision in a DataLoader.

    Each iter() starts the stream again at `start_position` (keep one iterator alive at a time: persistent workers
    are shared by all of them); the output does not depend on num_workers. `state_dict()` is the position of the
    next sample the consumer will get and the runtime quarantine's substitutions, so a new stream built with them
    continues exactly there. A file that fails to decode is replaced in the worker by the next same-class image
    that decodes; the main process sets it aside (RuntimeQuarantine) and later batches read the stand-in directly.
    """

    def __init__(
        self,
        settings: StreamSettings,
        index: ImageIndex,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
    ):
        """device: where every tensor of a yielded Batch lives (see dali_kd.data.transfer for the copy).
        state: an earlier stream's state_dict(): continue exactly where it stopped, with its runtime substitutions.
        data.output_dtype: the images' dtype; the workers cast them, so float16 also halves the bytes pinned and
        copied."""
        state = state or {}
        batch_size, seed, num_workers = settings.batch_size, settings.seed, settings.num_workers
        start_position = int(state.get("position", 0))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.share_ids = share_sample_ids(index.num_samples, rank, world_size)
        self.num_samples = len(self.share_ids)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.quarantine = RuntimeQuarantine(
            index, settings.data.max_runtime_quarantine, state.get("substitutions")
        )
        self._loader: DataLoader | None = DataLoader(
            _TrainViews(index, settings.crops, seed, rank),
            batch_sampler=_StreamBatches(
                self.share_ids, seed, batch_size, self.quarantine.resolve, start_position
            ),
            num_workers=num_workers,
            collate_fn=functools.partial(_collate_train, dtype=TORCH_DTYPES[settings.data.output_dtype]),
            # Pinned host batches: the copy to the GPU can then run asynchronously (dali_kd.data.transfer).
            pin_memory=self.device.type == "cuda",
            # DataLoader rejects persistent workers without workers; the flag then simply has no meaning.
            persistent_workers=settings.persistent_workers and num_workers > 0,
            # Its own generator: starting an iterator must not draw from torch's global RNG, which a resumed
            # run restores exactly (views are seeded by stream position anyway).
            generator=torch.Generator().manual_seed(seed),
        )
        self._active: Iterator | None = None
        self.start_position = start_position
        self.position = start_position

    def state_dict(self) -> dict:
        return {
            "backend": "torchvision",
            "position": self.position,
            "substitutions": self.quarantine.state_dict(),
        }

    def take_entries(self) -> list[dict[str, str]]:
        """Files set aside since the last call, as quarantine entries."""
        return self.quarantine.take_entries()

    def __iter__(self) -> Iterator[Batch]:
        """Batches on the stream's device; the next batch's copy runs while the consumer works on this one."""
        if self._loader is None:
            raise RuntimeError("TorchvisionTrainStream is closed")
        self._active = iter(self._loader)
        self.position = self.start_position
        for batch, failed in one_ahead(map(_host_batch, self._active), self.device):
            # Counted and set aside as the consumer takes the batch, so state_dict() is the consumer's position.
            self.position += len(batch)
            for sample_id, reason in failed:
                self.quarantine.add(sample_id, reason)  # once per file; warns, or stops the run
            yield batch

    def worker_pids(self) -> list[int]:
        """The process ids of the running iterator's workers (none before iter(), without workers, or closed)."""
        return [w.pid for w in getattr(self._active, "_workers", [])]

    def close(self) -> None:
        """Stop the worker processes now rather than when the garbage collector finds them."""
        shutdown = getattr(self._active, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._active = None
        self._loader = None

    def __enter__(self) -> TorchvisionTrainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EvalImages(Dataset):
    def __init__(self, index: ImageIndex, params: EvalParams, dtype: torch.dtype = torch.float32):
        self.index = index
        self.files = index.files
        self.labels = index.labels
        self.params = params
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, sample_id: int) -> tuple[torch.Tensor, int, int]:
        img = decode_rgb(self.index.image_file(sample_id))
        img = TF.resize(img, self.params.resize_size, InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [self.params.view_size, self.params.view_size])
        image = TF.normalize(TF.to_tensor(img), self.params.mean, self.params.std).to(self.dtype)
        return image, self.labels[sample_id], sample_id


def torchvision_eval_batches(
    index: ImageIndex,
    params: EvalParams,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[Batch]:
    """Every sample once, in index order, on `device`; the last batch may be partial and Batch.view is None."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    loader = DataLoader(
        _EvalImages(index, params, dtype),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    host = (
        (Batch(images=images, labels=labels.to(torch.int64), sample_ids=ids.to(torch.int64)), None)
        for images, labels, ids in loader
    )
    for batch, _ in one_ahead(host, device):
        yield batch
