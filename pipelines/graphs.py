"""The DALI pipelines: training (reader → one random view, or multi-crop), replay (given views) and evaluation.

Each pipeline owns its reader (or external source) and calls the pure graphs of `pipelines.augment`.
device_id=None builds a CPU-only pipeline (decode on the CPU); otherwise decode runs on that GPU ("mixed"). Each
takes a DecodeParams: crop window or whole-image decode, the GPU decoder's tuning, the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
from nvidia.dali import fn, pipeline_def
from nvidia.dali.pipeline import DataNode, Pipeline
from nvidia.dali.types import DALIDataType

from dali_kd.pipelines import multi_crop as batched
from dali_kd.pipelines.augment import (
    View,
    draw_view,
    eval_transform,
    image_hw,
    multi_crop,
    render_view,
    stack_views,
)
from dali_kd.pipelines.params import (
    DEFAULT_DECODE,
    AugmentParams,
    DecodeParams,
    EvalParams,
    MultiCropParams,
    resolve_multi_crop_graph,
)

READER_NAME = "Reader"
TRAIN_OUTPUTS = ("images", "sample_ids", "crop_anchor", "crop_shape", "flip", "jitter")
# Multi-crop: images [G,3,S,S] and local_images [N,3,s,s] per sample; the record fields gain a leading view axis.
MULTI_CROP_OUTPUTS = ("images", "local_images", "sample_ids", "crop_anchor", "crop_shape", "flip", "jitter")
REPLAY_INPUTS = ("encoded", "crop_anchor", "crop_shape", "flip", "jitter")
EVAL_OUTPUTS = ("images", "sample_ids")
# From shards the reader reports each sample's source_info ("<tar>:<offset>:<key>.<ext>", zero-padded bytes), and
# the stream reads the sample id from the key: it takes the place of the sample_ids output.
SOURCE_INFO = "source_info"


@dataclass(frozen=True)
class ShardFiles:
    """What fn.readers.webdataset reads: tar shards, their index files, the image members' extensions (';'
    separated) and the shuffle buffer's size."""

    paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    image_ext: str
    shuffle_buffer: int = 1024


def _decode_device(device_id: int | None) -> str:
    return "cpu" if device_id is None else "mixed"


def _read(
    files: Sequence[str],
    shuffle: bool,
    shard_id: int,
    num_shards: int,
    pad_last_batch: bool,
    seed: int = -1,
    sample_ids: Sequence[int] | None = None,
):
    # The reader's "label" carries the sample id (index into files); the trainer maps ids to class labels, which
    # keeps one id per file for replay, caching and quarantine.
    encoded, ids = fn.readers.file(
        files=list(files),
        labels=list(range(len(files))) if sample_ids is None else list(sample_ids),
        name=READER_NAME,
        shard_id=shard_id,
        num_shards=num_shards,
        # A full reshuffle of the list at every pass (by DALI's own fixed seed: train_pipeline orders the list by
        # its seed first); a continuing stream crosses pass boundaries inside a batch instead of padding.
        shuffle_after_epoch=shuffle,
        pad_last_batch=pad_last_batch,
        seed=seed,
        # Plain reads, not mmap: a file truncated or rewritten during a run would otherwise kill the process
        # with SIGBUS instead of raising an error the trainer can recover from (and mmap gains little on NFS).
        dont_use_mmap=True,
    )
    return encoded, fn.cast(ids, dtype=DALIDataType.INT64)


def _read_shards(shards: ShardFiles, shard_id: int, num_shards: int, seed: int):
    """fn.readers.webdataset over the shards: each pass reads the shards in a new order (the same on every rank,
    seeded, so the ranks' blocks stay disjoint within a pass) through a shuffle buffer; it reads by offset through
    the index files and reports each sample's source_info, whose key is the sample id."""
    encoded = cast(
        DataNode,
        fn.readers.webdataset(
            paths=list(shards.paths),
            index_paths=list(shards.index_paths),
            ext=[shards.image_ext],
            missing_component_behavior="error",
            name=READER_NAME,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=True,
            initial_fill=shards.shuffle_buffer,
            seed=seed,
            shuffle_after_epoch=True,
            shuffle_after_epoch_seed=seed,
            # Plain reads, not mmap, as for files: a shard damaged during a run must be an error, not a SIGBUS.
            dont_use_mmap=True,
        ),
    )  # one ext: one output
    return encoded, fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)


def train_outputs(params: AugmentParams | MultiCropParams, from_shards: bool = False) -> tuple[str, ...]:
    """The output names of train_pipeline for these params (no local_images without local crops); from shards
    source_info stands where sample_ids is."""
    names: tuple[str, ...] = TRAIN_OUTPUTS
    if isinstance(params, MultiCropParams):
        names = tuple(n for n in MULTI_CROP_OUTPUTS if n != "local_images" or params.num_local)
    return tuple(SOURCE_INFO if n == "sample_ids" and from_shards else n for n in names)


def train_pipeline(
    files: Sequence[str] | ShardFiles,
    params: AugmentParams | MultiCropParams,
    batch_size: int,
    seed: int,
    device_id: int | None = None,
    num_threads: int = 2,
    shard_id: int = 0,
    num_shards: int = 1,
    prefetch_queue_depth: int = 2,
    checkpoint: bytes | None = None,
    reader_seed: int | None = None,
    sample_ids: Sequence[int] | None = None,
    decode: DecodeParams = DEFAULT_DECODE,
) -> Pipeline:
    """Outputs train_outputs(params). One view (AugmentParams): images [3,S,S] in decode.dtype, the sample id and
    its view record, the view decoded as decode.mode says (its crop window alone, or the whole image). Multi-crop
    (MultiCropParams): each image decoded once, global crops [G,3,S,S], local crops [N,3,s,s], and a record per
    crop ([V,2] anchors and shapes, [V] flips, [V,4] jitter).

    checkpoint: bytes from an earlier pipeline's checkpoint(); the new pipeline continues exactly where that one
    stopped (reader position and shuffle, every random operator's state) if it is built over the same files with
    the same reader_seed.
    reader_seed: seed of the file order; give every shard the same one so that their samples stay disjoint
    while `seed` (augmentations) differs per shard. Default: `seed`.
    sample_ids: the id each file entry reports (default: its position); a slot may read another file and say so.
    decode: how to decode (multi-crop always decodes the whole image once) and the images' dtype; replay_pipeline
    renders a record to the same pixels only with the same decode.mode and dtype.
    files as ShardFiles: read the tar shards (fn.readers.webdataset); SOURCE_INFO replaces sample_ids.
    """
    shuffle_seed = seed if reader_seed is None else reader_seed
    if isinstance(files, ShardFiles):
        shards = files
        return _train_pipe(
            lambda: _read_shards(shards, shard_id, num_shards, shuffle_seed), params, batch_size, seed,
            device_id, num_threads, prefetch_queue_depth, checkpoint, decode,
        )  # fmt: skip
    ids = list(range(len(files))) if sample_ids is None else list(sample_ids)
    # DALI's reader ignores its seed when it reshuffles every pass (shuffle_after_epoch: each pass's order comes
    # from a fixed seed and the list it was given), so the seed permutes that list: another seed, another order
    # and another shard for each rank. Every rank permutes alike, so the shards stay disjoint; each entry still
    # reports its own id.
    order = np.random.default_rng(shuffle_seed).permutation(len(files)).tolist()
    files, ids = [files[i] for i in order], [ids[i] for i in order]
    return _train_pipe(
        lambda: _read(files, True, shard_id, num_shards, False, seed=shuffle_seed, sample_ids=ids), params,
        batch_size, seed, device_id, num_threads, prefetch_queue_depth, checkpoint, decode,
    )  # fmt: skip


def _train_pipe(
    read, params, batch_size, seed, device_id, num_threads, prefetch_queue_depth, checkpoint, decode
) -> Pipeline:
    """The training pipeline around a reader: `read()` makes the reader's (encoded, id) nodes."""

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
        enable_checkpointing=True,
        checkpoint=checkpoint,
    )
    def pipe():
        encoded, sample_id = read()
        if isinstance(params, MultiCropParams):
            images, view = _multi_crop(encoded, params, device_id, decode)
        else:
            hw = image_hw(encoded)  # one header parse serves both the draw and the decode
            view = draw_view(encoded, params, hw)
            images = (render_view(encoded, view, params, _decode_device(device_id), hw, decode),)
        return *images, sample_id, view.crop_anchor, view.crop_shape, view.flip, view.jitter

    return pipe()


def _multi_crop(encoded, params: MultiCropParams, device_id: int | None, decode: DecodeParams):
    """(the global crops, and the local crops if any), the stacked records: by the graph params.graph names."""
    decode_device = _decode_device(device_id)
    if resolve_multi_crop_graph(params.graph, on_gpu=device_id is not None) == "batched":
        global_crops, local_crops, view = batched.multi_crop(encoded, params, decode_device, decode)
    else:
        global_crops, local_crops, views = multi_crop(encoded, params, decode_device, decode)
        view = stack_views(views)
    return ((global_crops,) if local_crops is None else (global_crops, local_crops)), view


def replay_pipeline(
    params: AugmentParams,
    batch_size: int,
    device_id: int | None = None,
    num_threads: int = 2,
    full_decode: bool = False,
    decode: DecodeParams = DEFAULT_DECODE,
    multi_crop_graph: str = "auto",
) -> Pipeline:
    """Renders given views: feed REPLAY_INPUTS (encoded bytes and one view record per sample) with `feed_input`.

    decode: give the DecodeParams the records were made with and each view renders to the same pixels again
    (decode.mode "full" cuts the view from the whole decoded image, "window" decodes only the window).
    full_decode=True: the records were made by multi-crop; each renders from the whole image (whatever
    decode.mode) with `params` its crop kind's (MultiCropParams.view_params), through the graph
    multi_crop_graph names (MultiCropParams.graph of the run that drew them; "auto" resolves on this
    pipeline's device as it did on the training pipeline's): per_crop cuts it as one-view mode "full" does,
    batched as a batched chain of one crop.
    """
    graph = resolve_multi_crop_graph(multi_crop_graph, on_gpu=device_id is not None) if full_decode else None

    # Synchronous, no prefetch: each run() renders exactly the views fed just before it.
    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,  # type: ignore[arg-type]  # None: CPU-only, as DALI documents; its stub says int
        seed=0,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def pipe():
        encoded, anchor, shape, flip, jitter = (
            fn.external_source(name=name, dtype=dtype)
            for name, dtype in zip(
                REPLAY_INPUTS,
                (
                    DALIDataType.UINT8,
                    DALIDataType.FLOAT,
                    DALIDataType.FLOAT,
                    DALIDataType.INT32,
                    DALIDataType.FLOAT,
                ),
                strict=True,
            )
        )
        view = View(crop_anchor=anchor, crop_shape=shape, flip=flip, jitter=jitter)
        if graph == "batched":
            return batched.replay_crop(encoded, view, params, _decode_device(device_id), decode)
        replay_decode = replace(decode, mode="full") if graph == "per_crop" else decode
        return render_view(encoded, view, params, _decode_device(device_id), decode=replay_decode)

    return pipe()


def replay_ahead_pipeline(
    source,
    params: AugmentParams,
    batch_size: int,
    device_id: int | None = None,
    num_threads: int = 2,
    prefetch_queue_depth: int = 2,
    decode: DecodeParams = DEFAULT_DECODE,
    from_paths: bool = False,
) -> Pipeline:
    """replay_pipeline's render, pulling its inputs: DALI calls `source()` for each batch it schedules, up to
    prefetch_queue_depth batches before run() hands that batch out, and renders them on its own threads (or GPU)
    meanwhile. source() returns the REPLAY_INPUTS columns of one batch of 1 to batch_size views.

    from_paths: the first column holds each file's path (UTF-8 bytes) and DALI reads the files on its own threads;
    otherwise it holds the encoded bytes. Same decode as the records were made with: same pixels.
    """

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,  # type: ignore[arg-type]  # None: CPU-only (see above)
        seed=0,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    def pipe():
        first, anchor, shape, flip, jitter = fn.external_source(
            source=source,
            num_outputs=len(REPLAY_INPUTS),
            batch=True,
            dtype=[
                DALIDataType.UINT8,
                DALIDataType.FLOAT,
                DALIDataType.FLOAT,
                DALIDataType.INT32,
                DALIDataType.FLOAT,
            ],
        )
        # Plain reads, not mmap: a file damaged during the run must be an error, not a SIGBUS.
        encoded = fn.io.file.read(first, dont_use_mmap=True) if from_paths else first
        view = View(crop_anchor=anchor, crop_shape=shape, flip=flip, jitter=jitter)
        return render_view(encoded, view, params, _decode_device(device_id), decode=decode)

    return pipe()


def eval_pipeline(
    files: Sequence[str],
    params: EvalParams,
    batch_size: int,
    device_id: int | None = None,
    num_threads: int = 2,
    shard_id: int = 0,
    num_shards: int = 1,
    decode: DecodeParams = DEFAULT_DECODE,
) -> Pipeline:
    """Outputs EVAL_OUTPUTS in file order; the last batch is padded (the iterator drops the padding).

    decode: the GPU decoder's tuning and the images' dtype (eval always decodes the whole image)."""

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0)  # type: ignore[arg-type]  # None: CPU-only
    def pipe():
        encoded, sample_ids = _read(files, False, shard_id, num_shards, pad_last_batch=True)
        return eval_transform(encoded, params, _decode_device(device_id), decode), sample_ids

    return pipe()


def fed_eval_pipeline(
    batches,
    params: EvalParams,
    batch_size: int,
    device_id: int | None = None,
    num_threads: int = 2,
    decode: DecodeParams = DEFAULT_DECODE,
) -> Pipeline:
    """eval_pipeline's outputs for samples fed by the caller: `batches` yields (encoded images, their sample ids as
    int64 arrays of shape [1]), at most batch_size each, the last one possibly smaller; the pipeline ends with it.
    Shards are evaluated this way: each sample read by offset, in index order."""

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0)  # type: ignore[arg-type]  # None: CPU-only
    def pipe():
        encoded, sample_ids = fn.external_source(
            source=batches, num_outputs=2, dtype=[DALIDataType.UINT8, DALIDataType.INT64], batch=True
        )
        return eval_transform(encoded, params, _decode_device(device_id), decode), sample_ids

    return pipe()


def shard_order_pipeline(
    shards: ShardFiles, batch_size: int, seed: int, shard_id: int = 0, num_shards: int = 1
) -> Pipeline:
    """The training reader alone (same arguments, same order of samples), outputting only SOURCE_INFO: which
    samples a batch of the training pipeline held. Give it index files whose entries are 1 byte long and it reads
    next to nothing."""

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=seed)  # type: ignore[call-overload]  # None: CPU-only
    def pipe():
        return _read_shards(shards, shard_id, num_shards, seed)[1]

    return pipe()
