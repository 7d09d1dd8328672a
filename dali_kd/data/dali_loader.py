"""The DALI backend: wraps the pipelines of `pipelines/` into torch batches (on the GPU, or CPU in CPU-only mode)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.recovery import RuntimeQuarantine
from pipelines.params import AugmentParams, EvalParams, MultiCropParams
from pipelines.pipelines import (
    EVAL_OUTPUTS,
    READER_NAME,
    REPLAY_INPUTS,
    eval_pipeline,
    replay_pipeline,
    train_outputs,
    train_pipeline,
)


def _device_id(device: torch.device) -> int | None:
    """DALI's device_id: None builds a CPU-only pipeline."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


class DaliTrainStream:
    """An endless stream of augmented training batches; each pass over the shard is freshly shuffled.

    Batches cross pass boundaries (no padding, no dropped samples), so step-capped epochs are windows on one
    stream. Images and ids stay on `device`; nothing here synchronises with the GPU. A file that fails to decode
    mid-run is set aside (RuntimeQuarantine) and the pipeline is rebuilt at the same stream position, its slot
    reading a same-class image, so every rank keeps its step count.
    """

    def __init__(
        self,
        index: ImageIndex,
        params: AugmentParams | MultiCropParams,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        num_threads: int = 2,
        prefetch_batches: int = 2,
        shard_id: int = 0,
        num_shards: int = 1,
        reader_seed: int | None = None,
        checkpoint: bytes | None = None,
        substitutions: dict[int, int] | None = None,
        max_runtime_quarantine: int = 100,
    ):
        """reader_seed: the file shuffle's seed, the same on every rank so shards stay disjoint (default: seed).
        checkpoint, substitutions: from an earlier stream's state_dict(): continue exactly where it stopped.
        params: MultiCropParams makes DINO multi-crop batches (see Batch), AugmentParams one view per sample."""
        self.device = torch.device(device)
        self.index = index
        self.quarantine = RuntimeQuarantine(index, max_runtime_quarantine, substitutions)
        self._settings = dict(
            params=params,
            batch_size=batch_size,
            seed=seed,
            device_id=_device_id(self.device),
            num_threads=num_threads,
            shard_id=shard_id,
            num_shards=num_shards,
            prefetch_queue_depth=prefetch_batches,
            reader_seed=reader_seed,
        )
        self._build(checkpoint)
        self.num_samples = int(self.pipe.reader_meta(READER_NAME)["epoch_size"] // num_shards)
        self._labels = torch.tensor(index.labels, dtype=torch.int64, device=self.device)

    def _build(self, checkpoint: bytes | None) -> None:
        files, sample_ids = self.quarantine.effective()
        self.pipe = train_pipeline(files, checkpoint=checkpoint, sample_ids=sample_ids, **self._settings)
        self.pipe.build()
        # No reader_name: the iterator runs as long as the pipeline does, i.e. forever.
        outputs = list(train_outputs(self._settings["params"]))
        self._iterator = DALIGenericIterator([self.pipe], outputs, size=-1, auto_reset=False)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            # The position before this batch (~0.1 ms): where to rebuild from if the batch holds a bad file.
            position = self._iterator.checkpoints()[0]
            try:
                (out,) = next(self._iterator)
            except RuntimeError as e:
                bad = self.quarantine.set_aside(str(e))
                names = ", ".join(self.index.files[i] for i in bad)
                warnings.warn(f"set aside {names}: it failed to decode; continuing without it", stacklevel=2)
                self._build(position)
                continue
            sample_ids = out["sample_ids"].view(-1)
            # DALI reuses its output buffers at the next iteration: clone what the trainer keeps.
            yield Batch(
                images=out["images"],
                local_images=out.get("local_images"),
                labels=self._labels[sample_ids],
                sample_ids=sample_ids.clone(),
                view=ViewRecord(
                    crop_anchor=out["crop_anchor"].clone(),
                    crop_shape=out["crop_shape"].clone(),
                    flip=out["flip"].to(torch.int64),
                    jitter=out["jitter"].clone(),
                ),
            )

    def state_dict(self) -> dict:
        """The pipeline's own checkpoint at the consumer's position (batches prefetched but not taken excluded)."""
        (state,) = self._iterator.checkpoints()
        return {
            "backend": "dali",
            "pipeline": torch.frombuffer(bytearray(state), dtype=torch.uint8),
            "substitutions": {str(k): v for k, v in self.quarantine.substitutions.items()},
        }

    def take_entries(self) -> list[dict[str, str]]:
        """Files set aside since the last call, as quarantine entries."""
        return self.quarantine.take_entries()

    def close(self) -> None:
        self._iterator = None
        self.pipe = None


def dali_eval_batches(
    index: ImageIndex,
    params: EvalParams,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_threads: int = 2,
) -> Iterator[Batch]:
    """Every sample exactly once, in index order; the last batch may be partial. Batch.view is None."""
    device = torch.device(device)
    pipe = eval_pipeline(
        index.files, params, batch_size=batch_size, device_id=_device_id(device), num_threads=num_threads
    )
    pipe.build()
    iterator = DALIGenericIterator(
        [pipe], list(EVAL_OUTPUTS), reader_name=READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL
    )
    labels = torch.tensor(index.labels, dtype=torch.int64, device=device)
    for (out,) in iterator:
        sample_ids = out["sample_ids"].view(-1).clone()
        yield Batch(images=out["images"].clone(), labels=labels[sample_ids], sample_ids=sample_ids)


class DaliViewRenderer:
    """Renders recorded views again (same pixels): the replay pipeline fed with file bytes and view records."""

    def __init__(
        self,
        index: ImageIndex,
        params: AugmentParams,
        batch_size: int,
        device: torch.device | str = "cpu",
        full_decode: bool = False,
    ):
        """full_decode: True for records made by multi-crop (each crop is cut from the whole decoded image)."""
        self.index = index
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.pipe = replay_pipeline(
            params, batch_size=batch_size, device_id=_device_id(self.device), full_decode=full_decode
        )
        self.pipe.build()

    def render(self, sample_ids: torch.Tensor, view: ViewRecord) -> torch.Tensor:
        ids = sample_ids.cpu().numpy()
        if len(ids) != self.batch_size:
            raise ValueError(f"render needs exactly {self.batch_size} views, got {len(ids)}")
        columns = {
            "encoded": [np.fromfile(self.index.files[i], dtype=np.uint8) for i in ids],
            "crop_anchor": view.crop_anchor.cpu().numpy().astype(np.float32),
            "crop_shape": view.crop_shape.cpu().numpy().astype(np.float32),
            "flip": view.flip.cpu().numpy().astype(np.int32),
            "jitter": view.jitter.cpu().numpy().astype(np.float32),
        }
        for name in REPLAY_INPUTS:
            self.pipe.feed_input(name, columns[name])
        (images,) = self.pipe.run()
        if self.device.type == "cuda":
            images = images.as_cpu()
        return torch.from_numpy(np.array(images.as_tensor())).to(self.device)
