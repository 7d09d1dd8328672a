"""Teacher targets: what the student is pulled toward each step — the live frozen teachers, their cache, or constants.

Every source answers `targets(batch, step)` with each teacher's `ModelOutput` for the batch's global crops, in
teacher order (a list of one for one teacher), view-major ([G*B, ...]: crop 0 of every sample first), and keeps its
own counters (`state_dict`, `summary`). Each also makes the training stream its targets need (`train_stream`): the
data backend's for a live teacher (live.py), the cache's fill-then-replay stream for the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dali_kd import console
from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import with_mixing
from dali_kd.data.outputs import ModelOutput
from dali_kd.data.stream import TrainStream
from dali_kd.teacher_cache.batch_fields import CacheFields
from dali_kd.teacher_cache.cache_checks import CacheCounters, FidelityProbes
from dali_kd.teacher_cache.live import LiveTeacher, TeacherTargets
from dali_kd.teacher_cache.store import TeacherCache
from dali_kd.teacher_cache.stream import CachedViewStream, cached_view_stream

# LiveTeacher and TeacherTargets live in live.py; the targets are offered here together.
__all__ = ["CachedTeacher", "LiveTeacher", "TeacherTargets"]


class CachedTeacher:
    """Targets from the teacher cache for replayed batches; the live teachers (which fill the cache) otherwise.

    A replayed batch is read from the rows its stream names (`host_ids`, else `sample_ids`, and `cache.slots`); a
    live batch stores the rows marked in `cache.store`, at the stream slot each sample stands for (`stream_ids`).
    A fidelity probe runs every teacher on the first replayed batch of every process start and every N steps (once a
    step); one far below the floor (replay mode) stops replay from the cache: the live teachers give every later
    target. A teacher's stored outputs in a replayed row that fail their checksum are computed again by that teacher
    and rewritten.
    """

    cached = True

    def __init__(
        self,
        live: LiveTeacher,
        cache: TeacherCache,
        mode: str,
        probe_every: int | None,
        device: torch.device,
        report: bool = True,
    ):
        self.live, self.cache, self.mode = live, cache, mode
        self.probe_every = probe_every
        self.device = device
        self.report = report  # this rank prints warnings (rank 0)
        self.counters = CacheCounters()
        self.stream: CachedViewStream | None = None  # made by train_stream
        self._probe_next = True
        self._warned_damaged = False
        self._probed_step = 0  # the step last probed
        self.probes = FidelityProbes(str(cache.dir), mode, [g.key for g in cache.groups], report)

    def train_stream(
        self,
        settings: StreamSettings,
        index: ImageIndex,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
    ) -> TrainStream:
        """The cache's fill-then-replay stream (kept for its count of stand-in rows), mixed as data.augment.mix says."""
        self.stream = cached_view_stream(
            settings, index, device, rank, world_size, state, cache=self.cache, mode=self.mode
        )
        return with_mixing(self.stream, settings, rank, state)

    def time_teachers(self, mark: Callable[[str], None]) -> None:
        self.live.time_teachers(mark)

    def targets(self, batch: Batch, step: int) -> list[ModelOutput]:
        cache_fields = batch.cache
        assert cache_fields is None or isinstance(cache_fields, CacheFields)  # the cache's stream makes them
        if cache_fields is not None and cache_fields.from_cache and self.counters.stopped_at_step is None:
            return self._replayed(batch, cache_fields, step)
        outs = self.live.targets(batch, step)
        if cache_fields is not None and cache_fields.store is not None and cache_fields.store.any():
            self._store(batch, cache_fields, outs)
        return outs

    def _teacher(self, teacher: int, images: torch.Tensor) -> ModelOutput:
        """Teacher `teacher` (config order) run live on pipeline images."""
        return self.live.teachers[teacher](images, with_patches=self.live.patches[teacher])

    def _replayed(self, batch: Batch, cache_fields: CacheFields, step: int) -> list[ModelOutput]:
        # The rows the stream replays (it knows which stand in for a file set aside).
        ids = batch.ids_on_host()
        assert cache_fields.slots is not None  # a replayed batch names its rows' slots
        if cache_fields.targets is not None:  # read ahead by the replay stream, off the step's path
            outs, damaged = list(cache_fields.targets), cache_fields.damaged
            self.counters.read_s += cache_fields.read_s
        else:
            start = time.perf_counter()
            rows = self.cache.read_rows(ids, cache_fields.slots)
            outs, damaged = rows.to_outputs(self.device), ~rows.intact
            self.counters.read_s += time.perf_counter() - start
        self.counters.read_bytes += len(ids) * self.cache.nbytes_per_row()
        num_damaged = 0 if damaged is None else int(damaged.any(axis=0).sum())
        if num_damaged:
            assert damaged is not None
            outs = self._refill(batch, ids, cache_fields.slots, outs, damaged)
        self.counters.hits += len(ids) - num_damaged
        # Once per step: a step of several batches (train.grad_accum_steps) probes its first replayed one.
        due = self.probe_every and step % self.probe_every == 0 and step != self._probed_step
        if self._probe_next or due:
            self._probe(batch, outs, step)
        return outs

    def _store(self, batch: Batch, cache_fields: CacheFields, outs: list[ModelOutput]) -> None:
        mask, slots, batch_view = cache_fields.store, cache_fields.slots, batch.view
        # A filling batch says which rows to store, in which slots, and their views.
        assert mask is not None and slots is not None and batch_view is not None
        # Rows belong to stream slots: a slot whose file was set aside stores its stand-in's view and targets.
        shown = batch.ids_on_host()[mask]
        ids = batch.stream_ids_on_host()[mask]
        picked = torch.from_numpy(mask).to(self.device)
        rows = [_rows_of(out, picked) for out in outs]
        view = batch_view.take(picked)  # a mixed view's mix part (partner, its view, λ, box) included
        start = time.perf_counter()
        self.cache.write(ids, slots[mask], rows, view, shown_ids=shown)
        self.counters.write_s += time.perf_counter() - start
        self.counters.write_bytes += len(ids) * self.cache.nbytes_per_row()

    def _refill(
        self, batch: Batch, ids: np.ndarray, slots: np.ndarray, outs: list[ModelOutput], damaged: np.ndarray
    ) -> list[ModelOutput]:
        """Each teacher on the rows whose stored outputs of it failed their checksum (damaged[t]: bool per row of
        the batch at `ids`, `slots`): rewritten in the cache and given as read back (as stored: what a later replay
        reads)."""
        rows = damaged.any(axis=0)
        if self.report and not self._warned_damaged:
            self._warned_damaged = True
            console.warning(
                f"teacher cache {self.cache.dir}: {int(rows.sum())} row(s) fail their checksum (damaged on disk); "
                "the teacher computes them again and they are rewritten (counted in cache_rows_refilled)"
            )
        merged = list(outs)
        for t in np.flatnonzero(damaged.any(axis=1)).tolist():
            picked = torch.from_numpy(damaged[t]).to(self.device)
            ids_t, slots_t = ids[damaged[t]], slots[damaged[t]]
            self.cache.write_outputs(t, ids_t, slots_t, self._teacher(t, batch.images[picked]))
            fresh = self.cache.read_rows(ids_t, slots_t).to_outputs(self.device)[t]
            merged[t] = _with_rows(outs[t], picked, fresh)
        self.counters.refilled += int(rows.sum())
        return merged

    def _probe(self, batch: Batch, cached: list[ModelOutput], step: int) -> None:
        """Run every teacher on the replayed batch: its outputs must match the cached ones (fp16 rounding aside)."""
        self._probe_next = False
        self._probed_step = step
        live = [self._teacher(t, batch.images) for t in range(len(cached))]
        self.counters.probe_batches += 1
        self.probes.add(step, live, cached)

    def state_dict(self) -> dict[str, Any]:
        self.probes.read(self.counters)
        return {**self.live.state_dict(), **self.counters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.live.load_state_dict(state)
        self.counters.load_state_dict(state)

    def interval_metrics(self) -> dict[str, float]:
        self.probes.read(self.counters)
        worst = self.probes.take_worst()
        return {} if worst is None else {"cache_fidelity_cosine": worst}

    def summary(self) -> dict[str, Any]:
        self.probes.read(self.counters)
        c = self.counters
        return {
            **self.live.summary(),
            "cache_mode": self.mode,
            "cache_hits": c.hits,
            "cache_rows_done": self.cache.rows_done(),
            # Rows found failing their checksum in this process (view or outputs), and those the teacher rewrote.
            "cache_rows_damaged": len(self.cache.damaged),
            "cache_rows_refilled": c.refilled,
            "cache_stopped_at_step": c.stopped_at_step,
            "cache_rows_total": self.cache.num_samples * self.cache.num_views,
            "teacher_probe_batches": c.probe_batches,
            "cache_fidelity_min": c.fidelity_min,
            "cache_read_mb_s": c.read_bytes / 2**20 / c.read_s if c.read_s > 0 else None,
            "cache_write_mb_s": c.write_bytes / 2**20 / c.write_s if c.write_s > 0 else None,
            # Replayed rows that did not hold their image's own view and were replaced (see CachedViewStream).
            "cache_missing_rows": self.stream.missing_rows if self.stream is not None else 0,
        }


def _rows_of(out: ModelOutput, picked: torch.Tensor) -> ModelOutput:
    return ModelOutput(
        *(None if t is None else t[picked] for t in (out.pooled, out.logits, out.patch_tokens))
    )


def _with_rows(out: ModelOutput, picked: torch.Tensor, fresh: ModelOutput) -> ModelOutput:
    """`out` with its rows `picked` (a bool mask) replaced by `fresh`'s."""
    merged = []
    for stored, computed in zip(
        (out.pooled, out.logits, out.patch_tokens),
        (fresh.pooled, fresh.logits, fresh.patch_tokens),
        strict=True,
    ):
        if stored is not None and computed is not None:
            stored = stored.clone()
            stored[picked] = computed
        merged.append(stored)
    return ModelOutput(*merged)
