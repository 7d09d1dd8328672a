"""Sampling: which sample ids a shard owns and in which order a stream visits them, the same for every backend.

The shard rule is DALI's reader's: shard r of n owns the ids [r*N//n, (r+1)*N//n) of a list of N, so shard sizes
differ by at most one and the larger ones come last. DALI's reader reshuffles the whole list at every pass and
then takes that block of it; the torchvision backend and the cache replay keep the block fixed and shuffle inside
it (`pass_order`).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import numpy as np

# A stream key is (position in this shard's stream, sample id); the view is a function of the position.
StreamKey = tuple[int, int]


def shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[begin, end) of shard `shard_id` of `num_shards` over `num_samples` ids (the block may be empty)."""
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(
            f"shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}"
        )
    return shard_id * num_samples // num_shards, (shard_id + 1) * num_samples // num_shards


def shard_size(num_samples: int, shard_id: int, num_shards: int) -> int:
    """How many ids shard `shard_id` owns: one pass of its stream."""
    begin, end = shard_bounds(num_samples, shard_id, num_shards)
    return end - begin


def min_shard_size(num_samples: int, num_shards: int) -> int:
    """The smallest shard's size (N // n): what every rank can rely on having."""
    return shard_size(num_samples, 0, num_shards)


def shard_sample_ids(num_samples: int, shard_id: int, num_shards: int) -> np.ndarray:
    """The sample ids shard `shard_id` owns, int64; an empty shard is an error (it could never fill a batch)."""
    begin, end = shard_bounds(num_samples, shard_id, num_shards)
    if end <= begin:
        raise ValueError(
            f"shard {shard_id} of {num_shards} is empty: the dataset has only {num_samples} samples"
        )
    return np.arange(begin, end, dtype=np.int64)


def pass_order(shard_ids: np.ndarray, seed: int, pass_index: int) -> np.ndarray:
    """The order of one pass over a shard: a permutation seeded by (seed, pass), different every pass."""
    return np.random.default_rng([seed, pass_index]).permutation(shard_ids)


def view_rng(seed: int, shard_id: int, position: int) -> np.random.Generator:
    """The generator of one sample's view; keyed by stream position so worker count and timing cannot change it."""
    return np.random.default_rng([seed, shard_id, position])


def stream_keys(shard_ids: np.ndarray, seed: int, start: int = 0) -> Iterator[StreamKey]:
    """The endless (position, sample id) stream from position `start`: pass 0's order, then pass 1's, and so on."""
    first_pass, offset = divmod(start, len(shard_ids))
    position = start
    for pass_index in count(first_pass):
        for sample_id in pass_order(shard_ids, seed, pass_index)[offset:].tolist():
            yield position, sample_id
            position += 1
        offset = 0
