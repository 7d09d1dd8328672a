"""Teacher targets: what the student is pulled toward each step — the live frozen teachers, their cache, or constants.

Every source answers `targets(batch, step)` with each teacher's `ModelOutput` for the batch's global crops, in
teacher order (a list of one for one teacher), view-major ([G*B, ...]: crop 0 of every sample first), and keeps its
own counters (`state_dict`, `summary`). Each also makes the training stream its targets need (`train_stream`): the
data backend's for a live teacher (live.py), the cache's fill-then-replay stream for the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dali_kd import console, distributed
from dali_kd.config import Config, StreamSettings
from dali_kd.config.data_section import MIX_KEYS
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import with_mixing
from dali_kd.data.outputs import ModelOutput
from dali_kd.data.stream import TrainStream
from dali_kd.identity import files_hash
from dali_kd.models import FrozenTeacher
from dali_kd.teacher_cache.batch_fields import CacheFields
from dali_kd.teacher_cache.live import LiveTeacher, TeacherTargets
from dali_kd.teacher_cache.store import TeacherCache, parts_for
from dali_kd.teacher_cache.stream import CachedViewStream, cached_view_stream

# LiveTeacher and TeacherTargets live in live.py; the targets are offered here together.
__all__ = ["CachedTeacher", "LiveTeacher", "TeacherTargets", "open_teacher_cache"]

# A replayed view's cached target and a live teacher on it agree to this cosine, fp16 storage included.
FIDELITY_FLOOR = 0.999
# Far below the floor: the cache's targets are not the teacher's (another teacher's, or damaged), so replay stops.
FIDELITY_STOP = 0.9


@dataclass
class CacheCounters:
    hits: int = 0
    probe_batches: int = 0
    fidelity_min: float | None = None
    read_s: float = 0.0
    read_bytes: int = 0
    write_s: float = 0.0
    write_bytes: int = 0
    refilled: int = (
        0  # replayed rows whose stored outputs failed their checksum, computed again by the teacher
    )
    stopped_at_step: int | None = (
        None  # the step whose probe stopped replay from the cache (None: it goes on)
    )

    # Checkpoint keys as the run's progress dict has always named them.
    KEYS = {
        "hits": "cache_hits",
        "probe_batches": "teacher_probe_batches",
        "fidelity_min": "cache_fidelity_min",
        "read_s": "cache_read_s",
        "read_bytes": "cache_read_bytes",
        "write_s": "cache_write_s",
        "write_bytes": "cache_write_bytes",
        "refilled": "cache_rows_refilled",
        "stopped_at_step": "cache_stopped_at_step",
    }

    def state_dict(self) -> dict[str, Any]:
        return {self.KEYS[name]: value for name, value in asdict(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, key in self.KEYS.items():
            if key in state:
                setattr(self, name, state[key])


class CachedTeacher:
    """Targets from the teacher cache for replayed batches; the live teacher (which fills the cache) otherwise.

    A replayed batch is read from the rows its stream names (`host_ids`, else `sample_ids`, and `cache.slots`); a
    live batch stores the rows marked in `cache.store`, at the stream slot each sample stands for (`stream_ids`).
    A fidelity probe runs the live teacher on the first replayed batch of every process start and every N steps (once a
    step); one far below the floor (replay mode) stops replay from the cache: the live teacher gives every later target.
    A replayed row whose stored outputs fail their checksum is computed again by the teacher and rewritten.
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
        self._fidelity: list[float] = []
        self._probes: list[
            tuple[int, torch.Tensor]
        ] = []  # (step, cosine on the device), read at the next log

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
        # The config refuses the cache with several teachers: it stores the one teacher's outputs.
        cache_fields = batch.cache
        assert cache_fields is None or isinstance(cache_fields, CacheFields)  # the cache's stream makes them
        if cache_fields is not None and cache_fields.from_cache and self.counters.stopped_at_step is None:
            return [self._replayed(batch, cache_fields, step)]
        out = self.live.targets(batch, step)
        if cache_fields is not None and cache_fields.store is not None and cache_fields.store.any():
            self._store(batch, cache_fields, out[0])
        return out

    def _replayed(self, batch: Batch, cache_fields: CacheFields, step: int) -> ModelOutput:
        # The rows the stream replays (it knows which stand in for a file set aside).
        ids = batch.ids_on_host()
        assert cache_fields.slots is not None  # a replayed batch names its rows' slots
        if cache_fields.targets is not None:  # read ahead by the replay stream, off the step's path
            out, damaged = cache_fields.targets, cache_fields.damaged
            self.counters.read_s += cache_fields.read_s
        else:
            start = time.perf_counter()
            rows = self.cache.read_rows(ids, cache_fields.slots)
            out, damaged = rows.to_output(self.device), ~rows.intact
            self.counters.read_s += time.perf_counter() - start
        self.counters.read_bytes += len(ids) * self.cache.nbytes_per_row()
        num_damaged = 0 if damaged is None else int(damaged.sum())
        if num_damaged:
            assert damaged is not None
            out = self._refill(batch, ids[damaged], cache_fields.slots[damaged], out, damaged)
        self.counters.hits += len(ids) - num_damaged
        # Once per step: a step of several batches (train.grad_accum_steps) probes its first replayed one.
        due = self.probe_every and step % self.probe_every == 0 and step != self._probed_step
        if self._probe_next or due:
            self._probe(batch, out, step)
        return out

    def _store(self, batch: Batch, cache_fields: CacheFields, out: ModelOutput) -> None:
        mask, slots, batch_view = cache_fields.store, cache_fields.slots, batch.view
        # A filling batch says which rows to store, in which slots, and their views.
        assert mask is not None and slots is not None and batch_view is not None
        # Rows belong to stream slots: a slot whose file was set aside stores its stand-in's view and targets.
        shown = batch.ids_on_host()[mask]
        ids = batch.stream_ids_on_host()[mask]
        picked = torch.from_numpy(mask).to(self.device)
        rows = ModelOutput(
            *(None if t is None else t[picked] for t in (out.pooled, out.logits, out.patch_tokens))
        )
        view = batch_view.take(picked)  # a mixed view's mix part (partner, its view, λ, box) included
        start = time.perf_counter()
        self.cache.write(ids, slots[mask], rows, view, shown_ids=shown)
        self.counters.write_s += time.perf_counter() - start
        self.counters.write_bytes += len(ids) * self.cache.nbytes_per_row()

    def _refill(
        self, batch: Batch, ids: np.ndarray, slots: np.ndarray, out: ModelOutput, damaged: np.ndarray
    ) -> ModelOutput:
        """The teacher on the rows whose stored outputs failed their checksum (rows `damaged` of the batch, at
        `ids`, `slots`): rewritten in the cache with the view they were shown in, and given as read back (as
        stored: what a later replay reads)."""
        if self.report and not self._warned_damaged:
            self._warned_damaged = True
            console.warning(
                f"teacher cache {self.cache.dir}: {len(ids)} row(s) fail their checksum (damaged on disk); the "
                "teacher computes them again and they are rewritten (counted in cache_rows_refilled)"
            )
        assert batch.view is not None  # a batch read from the cache carries the views it shows
        picked = torch.from_numpy(damaged).to(self.device)
        live = self.live.teacher(batch.images[picked], with_patches=self.live.with_patches)
        self.cache.write(ids, slots, live, batch.view.take(picked))
        fresh = self.cache.read_rows(ids, slots).to_output(self.device)
        self.counters.refilled += len(ids)
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

    def _probe(self, batch: Batch, cached: ModelOutput, step: int) -> None:
        """Run the teacher on the replayed batch: its outputs must match the cached ones (fp16 rounding aside).

        The cosine stays on the device until the next log row reads it (no host wait inside a step)."""
        self._probe_next = False
        self._probed_step = step
        live = self.live.teacher(batch.images, with_patches=self.live.with_patches)
        self.counters.probe_batches += 1
        a, b = (live.pooled, cached.pooled) if cached.pooled is not None else (live.logits, cached.logits)
        assert a is not None and b is not None  # the config makes a cache store pooled or logits
        self._probes.append((step, torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min()))

    def _read_probes(self) -> None:
        """The probes' cosines on the host: counted, and a warning for each one below the floor."""
        probes, self._probes = self._probes, []
        for step, on_device in probes:
            cosine = float(on_device)
            self._fidelity.append(cosine)
            worst = self.counters.fidelity_min
            self.counters.fidelity_min = cosine if worst is None else min(worst, cosine)
            if self.mode == "replay" and cosine < FIDELITY_STOP and self.counters.stopped_at_step is None:
                self.counters.stopped_at_step = step
                if self.report:
                    console.warning(
                        f"teacher cache {self.cache.dir}: fidelity {cosine:.4f} at step {step}, far below "
                        f"{FIDELITY_FLOOR}: its targets are not what the teacher gives on these views, so the teacher "
                        "runs on every batch from here on (train.cache_rebuild=true rebuilds the cache)"
                    )
            elif cosine < FIDELITY_FLOOR and self.report:
                message = (
                    f"WARNING: teacher cache fidelity {cosine:.4f} < {FIDELITY_FLOOR} at step {step}: the cached "
                    "targets do not match what the teacher gives on these views"
                    + (" (expected with train.cache_mode=fixed)" if self.mode == "fixed" else "")
                )
                console.warning(message)

    def state_dict(self) -> dict[str, Any]:
        self._read_probes()
        return {**self.live.state_dict(), **self.counters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.live.load_state_dict(state)
        self.counters.load_state_dict(state)

    def interval_metrics(self) -> dict[str, float]:
        self._read_probes()
        if not self._fidelity:
            return {}
        worst, self._fidelity = min(self._fidelity), []
        return {"cache_fidelity_cosine": worst}

    def summary(self) -> dict[str, Any]:
        self._read_probes()
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


def open_teacher_cache(
    cfg: Config,
    teacher: FrozenTeacher,
    teacher_id: dict[str, str],
    train_index: ImageIndex,
    with_patches: bool,
    device: torch.device,
    is_main: bool,
) -> TeacherCache:
    """The teacher cache for this teacher, data and augmentation (rank 0 creates it, the others open it)."""
    train = cfg.train
    mixed = cfg.data.augment.mix != "none"
    size = cfg.view_size  # the views the cache's records describe (the teacher resizes them to its own input)
    probe = teacher(torch.zeros(1, 3, size, size, device=device), with_patches=with_patches)
    dtype = "float16" if train.cache_dtype == "fp16" else "float32"
    parts = parts_for(train.cache_outputs, probe, train.cache_logits_topk, dtype)
    identity = {
        "teacher": teacher_id,
        "image_size": size,
        # The mix keys only where mixing is on: caches built before they existed stay valid.
        "augment": cfg.data.augment.model_dump(mode="json", exclude=None if mixed else set(MIX_KEYS)),
        "files": files_hash(train_index.files),
        "num_classes": 0 if probe.logits is None else int(probe.logits.shape[-1]),
        "mode": train.cache_mode,
        # Both change the pixels a cached target was computed on (window edges; fp16 rounding).
        "decode": cfg.data.decode,
        "output_dtype": cfg.data.output_dtype,
    }
    if teacher.input is not None:
        # The teacher's own size and normalisation (only where they differ from the views', so that a cache built
        # before teachers had their own input stays valid).
        identity["teacher_input"] = teacher.input.model.to_dict()
    views = 1 if train.cache_mode == "fixed" else train.cache_views_per_image
    assert train.teacher_feature_dir  # the config asks for it with the cache
    args = (Path(train.teacher_feature_dir), identity, parts, train_index.num_samples, views)
    cache = TeacherCache(*args, create=True, rebuild=train.cache_rebuild, mixed=mixed) if is_main else None
    distributed.barrier()
    if cache is None:
        cache = TeacherCache(*args, create=False, mixed=mixed)
    if train.cache_mode == "fixed" and is_main:
        console.warning(
            "warning: train.cache_mode=fixed: the student sees new random views but learns the targets of one "
            "fixed view per image (the original trainer's behaviour); replay keeps them consistent"
        )
    return cache
