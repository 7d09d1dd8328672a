"""Sampling: which sample ids a rank's share holds and in which order a stream visits them, the same for every
backend.

A share is what DALI's reader calls a shard (shard_id, num_shards); here "shard" means a tar file of the shard
format. The share rule is DALI's reader's: rank r of n holds the ids [r*N//n, (r+1)*N//n) of a list of N, so shares
differ by at most one and the larger ones come last. DALI's reader reshuffles the whole list at every pass and then
takes that block of it; the torchvision backend and the cache replay keep the block fixed and shuffle inside it
(`pass_order`).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import numpy as np

# A stream key is (position in this share's stream, sample id); the view is a function of the position.
StreamKey = tuple[int, int]


def share_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[begin, end) of rank `rank`'s share (of `world_size`) over `num_samples` ids (the block may be empty)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def share_size(num_samples: int, rank: int, world_size: int) -> int:
    """How many ids rank `rank`'s share holds: one pass of its stream."""
    begin, end = share_bounds(num_samples, rank, world_size)
    return end - begin


def min_share_size(num_samples: int, world_size: int) -> int:
    """The smallest share's size (N // n): what every rank can rely on having."""
    return share_size(num_samples, 0, world_size)


def share_sample_ids(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """The sample ids rank `rank`'s share holds, int64; an empty share is an error (it could never fill a batch)."""
    begin, end = share_bounds(num_samples, rank, world_size)
    if end <= begin:
        raise ValueError(
            f"the share of rank {rank} of {world_size} is empty: the dataset has only {num_samples} samples"
        )
    return np.arange(begin, end, dtype=np.int64)


def pass_order(share_ids: np.ndarray, seed: int, pass_index: int) -> np.ndarray:
    """The order of one pass over a share: a permutation seeded by (seed, pass), different every pass."""
    return np.random.default_rng([seed, pass_index]).permutation(share_ids)


def view_rng(seed: int, rank: int, position: int) -> np.random.Generator:
    """The generator of one sample's view; keyed by stream position so worker count and timing cannot change it."""
    return np.random.default_rng([seed, rank, position])


def stream_keys(share_ids: np.ndarray, seed: int, start: int = 0) -> Iterator[StreamKey]:
    """The endless (position, sample id) stream from position `start`: pass 0's order, then pass 1's, and so on."""
    first_pass, offset = divmod(start, len(share_ids))
    position = start
    for pass_index in count(first_pass):
        for sample_id in pass_order(share_ids, seed, pass_index)[offset:].tolist():
            yield position, sample_id
            position += 1
        offset = 0
