"""Replayed views rendered ahead of the step: a DALI pipeline whose external source pulls the next planned batches.

Why DALI pulls, and not a thread of ours: DALI calls the source when it schedules a batch, up to `depth` batches
before that batch is handed out, and then reads the files and renders the views on its own threads (C++, outside
Python's lock) or on the GPU, while the training step runs. What stays on the consumer's thread is the planning
(which rows, which views: a few array lookups per batch) and, from shards, reading the samples' bytes. A Python
thread rendering ahead would hold Python's lock while it reads files and drives DALI, and so slow the thread that
launches the step's kernels; its work is exactly what this hands to DALI instead.

The source is a plain (not `parallel=True`) batch source: the plans depend on the runtime quarantine and the cache
as the consumer's thread sees them, which worker processes could not share; the plan of a batch is cheap, its
rendering is not, and the rendering is what runs ahead.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from nvidia.dali.pipeline import Pipeline

from dali_kd.data.batch import ViewRecord
from dali_kd.data.dali_loader import dali_device_id
from dali_kd.data.dataset import ImageIndex
from dali_kd.pipelines.graphs import REPLAY_INPUTS, replay_ahead_pipeline
from dali_kd.pipelines.params import DEFAULT_DECODE, AugmentParams, DecodeParams
from dali_kd.teacher_cache.renderer import DaliViewRenderer, copy_out, view_columns


class RenderJob(Protocol):
    """One batch to render: which files (one per view) and the views of them (crop fields; mix is not read)."""

    render_ids: np.ndarray
    render_view: ViewRecord


Job = TypeVar("Job", bound=RenderJob)


class ViewsAhead(Generic[Job]):
    """next() → (the next job, its rendered views [n, 3, S, S] on `device`), in the order `jobs` yields them.

    DALI takes jobs from `jobs` as it schedules batches: when job n is handed out, jobs up to n + depth - 1 have
    been taken (depth 1: each job is taken when it is asked for, rendering in turn). A job that `jobs` fails to
    make (raises) is raised when its turn comes, not earlier. A batch that fails to render raises RuntimeError
    naming the files that fail (rendered again, in turn, to find them); this object is then closed and the caller
    builds a new one from where it stands.
    """

    def __init__(
        self,
        jobs: Iterator[Job],
        index: ImageIndex,
        params: AugmentParams,
        max_views: int,
        device: torch.device,
        depth: int = 2,
        decode: DecodeParams = DEFAULT_DECODE,
        num_threads: int = 2,
    ):
        """max_views: the most views a job renders. depth: data.prefetch_batches (1 or more)."""
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.index, self.device = index, torch.device(device)
        self._jobs = jobs
        # Taken from `jobs` and scheduled in DALI, oldest first (DALI hands batches out in the order it took them);
        # an exception stands where a job could not be made.
        self._in_flight: deque[Job | Exception] = deque()
        # A first job that cannot be made fails here, when its batch is asked for.
        self._first: Job | None = next(jobs)
        self._last_columns: list | None = None
        self._copied: torch.cuda.Event | None = None
        self._renderer_args: dict[str, Any] = dict(
            index=index, params=params, batch_size=max_views, device=self.device, decode=decode,
            num_threads=num_threads,
        )  # fmt: skip
        pipe = replay_ahead_pipeline(
            self._next_columns, params, max_views, device_id=dali_device_id(self.device), num_threads=num_threads,
            prefetch_queue_depth=depth, decode=decode, from_paths=index.shards is None,
        )  # fmt: skip
        pipe.build()
        self.pipe: Pipeline | None = pipe  # None once closed

    def _next_columns(self) -> list:
        """DALI's external source (called in the consumer's thread while it schedules a batch): the next job's
        columns. A job that cannot be made is queued as its exception and the previous columns are rendered in its
        place, never handed out."""
        if self._first is not None:
            job, self._first = self._first, None
        else:
            try:
                job = next(self._jobs)
            except Exception as e:  # StopIteration included: it must not end DALI's epoch
                self._in_flight.append(e)
                assert self._last_columns is not None  # the first job was taken at construction
                return self._last_columns
        self._in_flight.append(job)
        self._last_columns = self._columns(job)
        return self._last_columns

    def _columns(self, job: Job) -> list:
        ids = job.render_ids.tolist()
        if self.index.shards is None:
            first = [np.frombuffer(self.index.files[i].encode(), dtype=np.uint8) for i in ids]
        else:
            first = [self._bytes_or_empty(i) for i in ids]
        records = view_columns(job.render_view)
        return [first, *(records[name] for name in REPLAY_INPUTS[1:])]

    def _bytes_or_empty(self, sample_id: int) -> np.ndarray:
        # An unreadable sample renders as nothing decodable: the batch fails and is rendered again in turn,
        # which names the sample and why.
        try:
            return np.frombuffer(self.index.read_bytes(sample_id), dtype=np.uint8)
        except OSError:
            return np.zeros(0, dtype=np.uint8)

    def __iter__(self) -> ViewsAhead[Job]:
        return self

    def __next__(self) -> tuple[Job, torch.Tensor]:
        if self.pipe is None:
            raise RuntimeError("the replay pipeline was closed after a failed batch; build a new one")
        on_gpu = self.device.type == "cuda"
        with torch.cuda.device(self.device) if on_gpu else contextlib.nullcontext():
            if self._copied is not None:
                # The previous batch's copy out of DALI's buffer must be done before DALI may reuse that buffer.
                self._copied.synchronize()
                self._copied = None
            try:
                (images,) = self.pipe.run()
            except RuntimeError as e:
                job = self._in_flight.popleft()
                self.close()
                if isinstance(job, Exception):
                    raise job from None
                raise RuntimeError(self._failures(job, str(e))) from None
            job = self._in_flight.popleft()
            if isinstance(job, Exception):
                self.close()
                raise job
            out, self._copied = copy_out(images, self.device)
        return job, out.to(self.device)  # .to: only where the device is a stand-in (tests' meta)

    def _failures(self, job: Job, error: str) -> str:
        """The job rendered again in turn, to name the files that fail (DALI's own message, if none does)."""
        try:
            DaliViewRenderer(**self._renderer_args).render(job.render_ids, job.render_view)
        except RuntimeError as e:
            return str(e)
        return error

    def close(self) -> None:
        self.pipe = None
        self._in_flight.clear()
        self._copied = None
