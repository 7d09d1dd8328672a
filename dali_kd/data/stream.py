"""The training-stream protocol every backend satisfies (DALI, torchvision, the teacher-cache replay)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from dali_kd.data.batch import Batch


@runtime_checkable
class TrainStream(Protocol):
    """An endless stream of full training batches of one rank's share.

    Every Batch carries `sample_ids` (the image shown at each position) and `stream_ids` (the sample id the stream
    scheduled there, its slot); they differ only where a file set aside at runtime was replaced by a same-class
    stand-in. A stream built from `state_dict()` continues exactly where this one stopped (same batches, same
    stand-ins); keep one iterator alive at a time.
    """

    num_samples: int
    """How many samples one pass over this rank's share holds."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict:
        """The position of the next batch the consumer will get, and the runtime quarantine's substitutions."""
        ...

    def take_entries(self) -> list[dict[str, str]]:
        """Files set aside since the last call, as quarantine entries ({"path", "reason", "found": "runtime"})."""
        ...

    def close(self) -> None:
        """Release pipelines and worker processes now; the stream cannot be iterated afterwards."""
        ...
