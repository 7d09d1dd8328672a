"""Host batches onto the trainer's device, one batch ahead, so the copy overlaps the step that runs meanwhile.

On CUDA a batch from pinned host memory is copied with non_blocking=True on a side stream while the previous
batch trains (what a DataLoader with pin_memory plus a prefetcher does in timm and Apex); the consumer's stream
waits for that copy only when it takes the batch. On any other device (the CPU, PyTorch's `meta` stand-in in
tests) the batch is moved plainly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from dali_kd.data.batch import Batch

T = TypeVar("T")


class BatchMover:
    """`start(batch)` begins moving a host batch to `device`; `ready(batch)` makes it safe to use there."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def start(self, batch: Batch) -> Batch:
        if self.copy_stream is None:
            return batch.to(self.device)
        # No wait on the consumer's stream: the source is pinned host memory nothing on the device writes, and the
        # allocator does not hand out memory the consumer still uses (ready() records that use).
        with torch.cuda.stream(self.copy_stream):
            return batch.to(self.device, non_blocking=True)

    def ready(self, batch: Batch) -> Batch:
        if self.copy_stream is None:
            return batch
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.copy_stream)
        for tensor in batch.tensors().values():
            # Allocated on the copy stream, used on the consumer's: the allocator must not reuse the memory
            # before the consumer's work on it is done.
            tensor.record_stream(consumer)
        return batch


def one_ahead(
    items: Iterable[tuple[Batch, T]], device: torch.device, ahead: bool | None = None
) -> Iterator[tuple[Batch, T]]:
    """(batch, payload) pairs with each batch on `device`; on CUDA batch N+1's copy is started before batch N is
    handed out, so it runs while batch N's step does. Elsewhere there is no copy to overlap, and no batch is taken
    early (ahead=True forces the look-ahead anywhere, for tests). Payloads travel with their batch, untouched."""
    mover = BatchMover(device)
    if not (mover.copy_stream is not None if ahead is None else ahead):
        for batch, payload in items:
            yield mover.start(batch), payload
        return
    pending: tuple[Batch, T] | None = None
    for batch, payload in items:
        moving = (mover.start(batch), payload)
        if pending is not None:
            yield mover.ready(pending[0]), pending[1]
        pending = moving
    if pending is not None:
        yield mover.ready(pending[0]), pending[1]
