"""The DALI pipelines: training (reader → one random view, or multi-crop), replay (given views) and evaluation.

Each pipeline owns its reader (or external source) and calls the pure graphs of `pipelines.augment`.
device_id=None builds a CPU-only pipeline (decode on the CPU); otherwise decode runs on that GPU ("mixed"). Each
takes a DecodeParams: crop window or whole-image decode, the GPU decoder's tuning, the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from pipelines.augment import (
    View,
    draw_view,
    eval_transform,
    image_hw,
    multi_crop,
    render_view,
    stack_views,
)
from pipelines.params import DEFAULT_DECODE, AugmentParams, DecodeParams, EvalParams, MultiCropParams

READER_NAME = "Reader"
TRAIN_OUTPUTS = ("images", "sample_ids", "crop_anchor", "crop_shape", "flip", "jitter")
# Multi-crop: images [G,3,S,S] and local_images [N,3,s,s] per sample; the record fields gain a leading view axis.
MULTI_CROP_OUTPUTS = ("images", "local_images", "sample_ids", "crop_anchor", "crop_shape", "flip", "jitter")
REPLAY_INPUTS = ("encoded", "crop_anchor", "crop_shape", "flip", "jitter")
EVAL_OUTPUTS = ("images", "sample_ids")


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
    encoded, sample_ids = fn.readers.file(
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
    return encoded, fn.cast(sample_ids, dtype=types.INT64)


def train_outputs(params: AugmentParams | MultiCropParams) -> tuple[str, ...]:
    """The output names of train_pipeline for these params (no local_images without local crops)."""
    if not isinstance(params, MultiCropParams):
        return TRAIN_OUTPUTS
    return tuple(n for n in MULTI_CROP_OUTPUTS if n != "local_images" or params.num_local)


def train_pipeline(
    files: Sequence[str],
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
    """
    shuffle_seed = seed if reader_seed is None else reader_seed
    ids = list(range(len(files))) if sample_ids is None else list(sample_ids)
    # DALI's reader ignores its seed when it reshuffles every pass (shuffle_after_epoch: each pass's order comes
    # from a fixed seed and the list it was given), so the seed permutes that list: another seed, another order
    # and another shard for each rank. Every rank permutes alike, so the shards stay disjoint; each entry still
    # reports its own id.
    order = np.random.default_rng(shuffle_seed).permutation(len(files)).tolist()
    files, ids = [files[i] for i in order], [ids[i] for i in order]

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
        encoded, sample_id = _read(
            files, True, shard_id, num_shards, False, seed=shuffle_seed, sample_ids=ids
        )
        if isinstance(params, MultiCropParams):
            global_crops, local_crops, views = multi_crop(encoded, params, _decode_device(device_id), decode)
            view = stack_views(views)
            images = (global_crops,) if local_crops is None else (global_crops, local_crops)
        else:
            hw = image_hw(encoded)  # one header parse serves both the draw and the decode
            view = draw_view(encoded, params, hw)
            images = (render_view(encoded, view, params, _decode_device(device_id), hw, decode),)
        return *images, sample_id, view.crop_anchor, view.crop_shape, view.flip, view.jitter

    return pipe()


def replay_pipeline(
    params: AugmentParams,
    batch_size: int,
    device_id: int | None = None,
    num_threads: int = 2,
    full_decode: bool = False,
    decode: DecodeParams = DEFAULT_DECODE,
) -> Pipeline:
    """Renders given views: feed REPLAY_INPUTS (encoded bytes and one view record per sample) with `feed_input`.

    decode: give the DecodeParams the records were made with and each view renders to the same pixels again.
    decode.mode "full" cuts the view from the whole decoded image, as multi-crop does — multi-crop records replay
    with dataclasses.replace(decode, mode="full"), whatever mode one-view training used; "window" decodes only the
    window. full_decode=True is the older spelling of mode "full" (kept for existing callers).
    """
    if full_decode:
        decode = replace(decode, mode="full")

    # Synchronous, no prefetch: each run() renders exactly the views fed just before it.
    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=0,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def pipe():
        encoded, anchor, shape, flip, jitter = (
            fn.external_source(name=name, dtype=dtype)
            for name, dtype in zip(
                REPLAY_INPUTS, (types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT), strict=True
            )
        )
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

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0)
    def pipe():
        encoded, sample_ids = _read(files, False, shard_id, num_shards, pad_last_batch=True)
        return eval_transform(encoded, params, _decode_device(device_id), decode), sample_ids

    return pipe()
