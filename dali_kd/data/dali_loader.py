"""The DALI backend: wraps the pipelines of `pipelines/` into torch batches (on the GPU, or CPU in CPU-only mode)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.sampling import share_size
from dali_kd.data.shard_index import ids_from_source_info
from dali_kd.data.shard_watch import ShardWatch
from dali_kd.data.shards import READER_IMAGE_EXT
from dali_kd.pipelines.graphs import (
    EVAL_OUTPUTS,
    READER_NAME,
    SOURCE_INFO,
    ShardFiles,
    eval_pipeline,
    fed_eval_pipeline,
    shard_order_pipeline,
    train_outputs,
    train_pipeline,
)
from dali_kd.pipelines.params import (
    DEFAULT_DECODE,
    DecodeParams,
    EvalParams,
    MultiCropParams,
    resolve_multi_crop_graph,
)


def host_array(ids: torch.Tensor) -> np.ndarray:
    """A copy of DALI's per-sample ids as a flat numpy array. The reader's ids are host outputs on every pipeline
    (CPU or GPU), so this never waits for the device."""
    assert ids.device.type == "cpu", f"expected the reader's host output, got a tensor on {ids.device}"
    return ids.view(-1).numpy().copy()


def dali_device_id(device: torch.device) -> int | None:
    """DALI's device_id: None builds a CPU-only pipeline."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def stream_multi_crop_graph(params: MultiCropParams, device: torch.device | str) -> str:
    """The multi-crop graph ("batched" or "per_crop") a stream on `device` builds for params.graph."""
    return resolve_multi_crop_graph(params.graph, on_gpu=dali_device_id(torch.device(device)) is not None)


class DaliTrainStream:
    """An endless stream of augmented training batches; each pass over the shard is freshly shuffled.

    Batches cross pass boundaries (no padding, no dropped samples), so step-capped epochs are windows on one
    stream. Images and ids stay on `device`; nothing here synchronises with the GPU. A file that fails to decode
    mid-run is set aside (RuntimeQuarantine) and the pipeline is rebuilt at the same stream position, its slot
    reading a same-class image, so every rank keeps its step count. Batch.stream_ids are the slots the reader
    scheduled, Batch.sample_ids the images shown (a stand-in's id where a slot's file was set aside).
    """

    def __init__(
        self,
        settings: StreamSettings,
        index: ImageIndex,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        *,
        quarantine: RuntimeQuarantine | None = None,
    ):
        """settings.crops: MultiCropParams makes DINO multi-crop batches (see Batch), AugmentParams one view per
        sample. Augmentations are seeded per rank (settings.seed + rank); the file shuffle by settings.seed alone,
        alike on every rank, so that the ranks' shares stay disjoint.
        state: an earlier stream's state_dict(): continue exactly where it stopped, with its runtime substitutions
        (its position also lets a decode failure be traced to the samples of its batch).
        quarantine: a runtime quarantine shared with the caller (then the substitutions and
        data.max_runtime_quarantine are its own).
        From shards (index.shards): fn.readers.webdataset, data.shuffle_buffer samples in its shuffle buffer."""
        state = state or {}
        self.settings, self.device, self.index = settings, torch.device(device), index
        self.params, self.batch_size = settings.crops, settings.batch_size
        self.seed, self.reader_seed = settings.seed + rank, settings.seed
        self.rank, self.world_size = rank, world_size
        # The graph that cuts multi-crop here ("auto" resolved): its pipeline checkpoints restore only into it.
        self.multi_crop_graph = (
            stream_multi_crop_graph(self.params, self.device)
            if isinstance(self.params, MultiCropParams)
            else None
        )
        self.position = int(state.get("position", 0))
        self._index_dir: tempfile.TemporaryDirectory | None = None  # rewritten index files (from shards)
        self.quarantine = quarantine or RuntimeQuarantine(
            index, settings.data.max_runtime_quarantine, state.get("substitutions")
        )
        # A tar changed in place mid-run may decode without an error: its batches are looked at before use.
        self._watch = ShardWatch(index.shards, self.quarantine) if index.shards is not None else None
        self._labels = np.asarray(index.labels, dtype=np.int64)
        self.pipe: Pipeline | None = None  # both None once closed
        self._iterator: DALIGenericIterator | None = None
        checkpoint = state.get("pipeline")
        pipe = self._build(bytes(checkpoint.numpy()) if checkpoint is not None else None)
        # One pass of this shard, by the shard rule DALI's reader follows (shards may differ by one sample).
        epoch_size = int(pipe.reader_meta(READER_NAME)["epoch_size"])
        self.num_samples = share_size(epoch_size, rank, world_size)

    def _shard_files(self, sizes_of_one: bool = False) -> ShardFiles:
        """The shards as the reader reads them: each slot set aside points at its stand-in's bytes (in the same
        tar) through a rewritten index; the other shards are read through their own index files. sizes_of_one:
        every entry 1 byte long (the same order of samples, next to nothing read)."""
        layout = self.index.shards
        assert layout is not None, "only a stream read from shards has shard files"
        substituted = self.quarantine.substituted()
        rewrite = {layout.shard_of[i] for i in substituted}
        index_paths = list(layout.index_paths)
        if sizes_of_one or rewrite or not layout.whole:
            if self._index_dir is None:
                self._index_dir = tempfile.TemporaryDirectory(prefix="dali_kd-shard-index-")
            kind = "probe" if sizes_of_one else f"q{len(substituted)}"
            for shard in range(len(index_paths)) if sizes_of_one or not layout.whole else sorted(rewrite):
                text = layout.index_text(shard, substituted, entry_size=1 if sizes_of_one else None)
                path = os.path.join(self._index_dir.name, f"{kind}-{shard:06d}.idx")
                with open(path, "w") as f:
                    f.write(text)
                index_paths[shard] = path
        return ShardFiles(
            paths=layout.tar_paths,
            index_paths=tuple(index_paths),
            image_ext=READER_IMAGE_EXT,
            shuffle_buffer=self.settings.data.shuffle_buffer,
        )

    def _batch_samples(self, position: int) -> list[int]:
        """The slots of the batch at stream position `position`: the reader alone, over 1-byte index entries, run
        from the start up to that batch (the same order the training reader follows)."""
        probe = shard_order_pipeline(
            self._shard_files(sizes_of_one=True),
            self.batch_size,
            self.reader_seed,
            self.rank,
            self.world_size,
        )
        probe.build()
        for _ in range(position // self.batch_size):
            probe.run()
        (info,) = probe.run()
        return ids_from_source_info(np.array(info[k]) for k in range(len(info)))

    def _set_aside(self, error: str, position: int) -> None:
        if self.index.shards is None:
            self.quarantine.set_aside(error)  # the folder path: the file is named, or changed during the run
        else:
            self.quarantine.set_aside(error, candidates=lambda: self._batch_samples(position))

    def _build(self, checkpoint: bytes | None) -> Pipeline:
        """A pipeline at `checkpoint` (None: the start) reading each slot's resolved file (returned, built)."""
        from_shards = self.index.shards is not None
        while True:
            files, shown = self.quarantine.effective()
            # The reader reports each entry's slot id (its position in the list, or from shards its key),
            # whichever file it reads; the shown image's id is looked up in this table. The ids are host data
            # (the reader's), so no batch waits for the device.
            source = self._shard_files() if from_shards else files
            # DALI's reader calls a rank's share its shard.
            self.pipe = pipe = train_pipeline(
                source, self.params, self.batch_size, self.seed, device_id=dali_device_id(self.device),
                num_threads=self.settings.data.dali_threads, shard_id=self.rank, num_shards=self.world_size,
                prefetch_queue_depth=self.settings.data.prefetch_batches, checkpoint=checkpoint,
                reader_seed=self.reader_seed, decode=self.settings.decode,
            )  # fmt: skip
            pipe.build()
            self._shown = np.asarray(shown, dtype=np.int64)
            outputs = list(train_outputs(self.params, from_shards))
            try:
                # No reader_name: the iterator runs as long as the pipeline does, i.e. forever. It runs the
                # first batch already, so a file broken since the scan can fail here too.
                self._iterator = DALIGenericIterator([pipe], outputs, size=-1, auto_reset=False)
                return pipe
            except RuntimeError as e:
                self._set_aside(str(e), self.position)  # warns, or stops the run

    @property
    def _live(self) -> DALIGenericIterator:
        if self._iterator is None:
            raise RuntimeError("the data stream is closed")
        return self._iterator

    def __iter__(self) -> Iterator[Batch]:
        while True:
            # The position before this batch (~0.1 ms): where to rebuild from if the batch holds a bad file.
            position = self._live.checkpoints()[0]
            try:
                (out,) = next(self._live)
            except RuntimeError as e:
                self._set_aside(str(e), self.position)  # warns, or stops the run
                self._build(position)
                continue
            stream_ids = self._stream_ids(out)
            if self._watch is not None and self._watch.spoilt(stream_ids):
                self._build(position)  # read again: the set-aside slots now read their stand-ins
                continue
            batch = self._batch(out, stream_ids)
            self.position += len(batch)
            yield batch

    @staticmethod
    def _stream_ids(out: dict[str, torch.Tensor]) -> np.ndarray:
        """The slots the reader scheduled for this batch (host data)."""
        if SOURCE_INFO in out:
            return np.asarray(ids_from_source_info(out[SOURCE_INFO].numpy()), dtype=np.int64)
        return host_array(out["sample_ids"])

    def _batch(self, out: dict[str, torch.Tensor], stream_ids: np.ndarray) -> Batch:
        """The pipeline's outputs as a Batch with every tensor on the stream's device.

        Images are already there on a GPU pipeline; the ids and view records are small host outputs, copied over.
        DALI reuses its output buffers at the next iteration: what the trainer keeps is copied or cloned.
        """
        sample_ids = self._shown[stream_ids]
        batch = Batch(
            images=out["images"],
            local_images=out.get("local_images"),
            labels=torch.from_numpy(self._labels[sample_ids]),
            sample_ids=torch.from_numpy(sample_ids),
            stream_ids=torch.from_numpy(stream_ids),
            view=ViewRecord(
                crop_anchor=out["crop_anchor"].clone(),
                crop_shape=out["crop_shape"].clone(),
                flip=out["flip"].to(torch.int64),
                jitter=out["jitter"].clone(),
            ),
            host_ids=sample_ids,
            host_stream_ids=stream_ids,
        )
        return batch.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        """The pipeline's own checkpoint at the consumer's position (batches prefetched but not taken excluded)."""
        (state,) = self._live.checkpoints()
        return {
            "backend": "dali",
            "pipeline": torch.frombuffer(bytearray(state), dtype=torch.uint8),
            "substitutions": self.quarantine.state_dict(),
            "position": self.position,
            **({"multi_crop_graph": self.multi_crop_graph} if self.multi_crop_graph else {}),
        }

    def take_entries(self) -> list[dict[str, str]]:
        """Files set aside since the last call, as quarantine entries."""
        return self.quarantine.take_entries()

    def close(self) -> None:
        self._iterator = None
        self.pipe = None
        if self._index_dir is not None:
            self._index_dir.cleanup()
            self._index_dir = None


def dali_eval_batches(
    index: ImageIndex,
    params: EvalParams,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_threads: int = 2,
    decode: DecodeParams = DEFAULT_DECODE,
) -> Iterator[Batch]:
    """Every sample exactly once, in index order, every tensor on `device`; the last batch may be partial and
    Batch.view is None."""
    device = torch.device(device)
    if index.shards is not None:
        # From shards: each sample read by offset, in index order (a subset or a rank's block reads only its own).
        pipe = fed_eval_pipeline(
            _fed_batches(index, batch_size), params, batch_size, device_id=dali_device_id(device),
            num_threads=num_threads, decode=decode,
        )  # fmt: skip
        pipe.build()
        iterator = DALIGenericIterator([pipe], list(EVAL_OUTPUTS), size=-1)
    else:
        pipe = eval_pipeline(
            index.files,
            params,
            batch_size,
            device_id=dali_device_id(device),
            num_threads=num_threads,
            decode=decode,
        )
        pipe.build()
        iterator = DALIGenericIterator(
            [pipe], list(EVAL_OUTPUTS), reader_name=READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL
        )
    labels = np.asarray(index.labels, dtype=np.int64)
    for (out,) in iterator:
        sample_ids = host_array(out["sample_ids"])
        batch = Batch(
            images=out["images"].clone(),
            labels=torch.from_numpy(labels[sample_ids]),
            sample_ids=torch.from_numpy(sample_ids),
            host_ids=sample_ids,
        )
        yield batch.to(device, non_blocking=True)


def _fed_batches(index: ImageIndex, batch_size: int) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    for start in range(0, index.num_samples, batch_size):
        ids = range(start, min(start + batch_size, index.num_samples))
        yield (
            [np.frombuffer(index.read_bytes(i), dtype=np.uint8) for i in ids],
            [np.array([i], dtype=np.int64) for i in ids],
        )
