"""The training stream when the teacher's outputs are cached: fill passes, then replay passes.

replay (default): for the first K passes over the rank's share the DALI pipeline draws random views and the teacher runs;
each sample's k-th view (k = its pass) and the teacher's outputs are stored. From then on every pass shows, for each
sample, one of its K stored views (a seeded choice), rendered again through the same DALI graph, so the student sees
exactly the view its cached target belongs to (Beyer et al., CVPR 2022). The teacher does not run at all.

fixed (the original trainer's behaviour): one pass fills one view per sample; later passes show fresh random views
while the targets stay those of the first view.

Rows belong to stream slots: a fill batch says which slot each position is (Batch.stream_ids) and which image was
shown there (Batch.sample_ids; another one where the slot's file was set aside), and the trainer writes the rows
at the slots, so every row gets written. A replay shows, for slot i, the image r its runtime quarantine resolves i
to (i itself unless i's file was set aside) with r's own row: r never failed, so its rows hold views of r. A row
that is not done (or holds another image's view, or whose view record fails its checksum) is never replayed: another
view slot of the same image stands in, else a same-class image's row (counted in `missing_rows`). A row whose
stored outputs fail their checksum is marked in the batch (`cache.damaged`) for the teacher to compute again. A file
that fails to decode during replay is set aside through the same quarantine and the batch is rendered again with
its stand-in's rows.

Mixed views (data.augment.mix): a row's record names the partner image and its view, λ and the box; a replay renders
the partner's view too (for the rows that were mixed) and mixes the two as the fill did
(dali_kd.data.mixing.mix_images), so the student and the fidelity probe see the pixels the cached target was
computed on. A row whose partner's file has been set aside since cannot be rendered: it counts as not usable, like
a row that is not done.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dali_kd import console
from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dali_loader import DaliTrainStream
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import check_resumed_backend, with_mixing
from dali_kd.data.mixing import mix_images
from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.sampling import pass_order, share_sample_ids
from dali_kd.data.stream import TrainStream
from dali_kd.errors import TrainingStopped
from dali_kd.pipelines.params import AugmentParams
from dali_kd.teacher_cache.batch_fields import CacheFields
from dali_kd.teacher_cache.replay_ahead import ViewsAhead
from dali_kd.teacher_cache.rows import CachedRows
from dali_kd.teacher_cache.store import TeacherCache


def make_cached_train_stream(
    settings: StreamSettings,
    index: ImageIndex,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
    *,
    cache: TeacherCache,
    mode: str,
) -> TrainStream:
    """The training stream of a run with a teacher cache (fill, then replay, as `mode`, train.cache_mode, says),
    resumed and mixed as dali_kd.data.loaders.make_train_stream resumes and mixes the others."""
    stream = cached_view_stream(settings, index, device, rank, world_size, state, cache=cache, mode=mode)
    return with_mixing(stream, settings, rank, state)


def cached_view_stream(
    settings: StreamSettings,
    index: ImageIndex,
    device: torch.device,
    rank: int,
    world_size: int,
    state: dict | None,
    *,
    cache: TeacherCache,
    mode: str,
) -> CachedViewStream:
    """The cached stream itself, before data.augment.mix mixes its batches."""
    check_resumed_backend(settings.data, state)
    return CachedViewStream(settings, index, device, rank, world_size, state, cache=cache, mode=mode)


@dataclass
class _Replay:
    """One replayed batch, planned: its stream slots, the rows it shows (ids, view slots), how many rows stood in
    for missing ones, the host view record, the rows' cached targets (read when planned, and how long that took),
    and what to render: the rows' own views, then the partners of the rows that show one (a RenderJob)."""

    position: int
    stream_ids: np.ndarray
    ids: np.ndarray
    slots: np.ndarray
    missing: int
    view: ViewRecord
    rows: CachedRows
    read_s: float
    render_ids: np.ndarray
    render_view: ViewRecord


class CachedViewStream:
    """The TrainStream of a run with a teacher cache: fill batches from DaliTrainStream, then replayed views.

    Fill batches carry `cache.slots` (the view slot of each row) and `cache.store` (which rows to write, at
    `stream_ids`); replayed ones `cache.from_cache`, `cache.targets`, `host_ids` and `cache.slots`: the rows whose
    targets belong to the rendered views.
    `state_dict()` adds the position, the replay start, the runtime substitutions and `missing_rows`.
    """

    def __init__(
        self,
        settings: StreamSettings,
        index: ImageIndex,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        *,
        cache: TeacherCache,
        mode: str,
    ):
        """settings: the fill's DaliTrainStream's; replay renders with the same crops, decode, data.dali_threads
        and data.prefetch_batches (the replayed batches DALI renders ahead of the consumer: 1 renders each in
        turn). mode: train.cache_mode."""
        assert isinstance(settings.crops, AugmentParams)  # the config refuses the cache with multi-crop
        self.settings, self.params = settings, settings.crops
        self.index, self.batch_size, self.seed = index, settings.batch_size, settings.seed
        self.cache, self.mode, self.device = cache, mode, torch.device(device)
        self.num_views = cache.num_views
        self.share_ids = share_sample_ids(index.num_samples, rank, world_size)
        self.num_samples = len(self.share_ids)
        self.rank = rank
        state = state or {}
        # One quarantine for the fill and the replay: a slot set aside while filling stays resolved in replay.
        self.quarantine = RuntimeQuarantine(
            index, settings.data.max_runtime_quarantine, state.get("substitutions")
        )
        self.position = int(state.get("position", 0))
        # Replayed positions whose scheduled row was not usable and another row stood in (cumulative).
        self.missing_rows = int(state.get("missing_rows", 0))
        # Views rendered for the replayed batches handed out (their own, plus partners of mixed rows), cumulative.
        self.views_rendered = 0
        self._warned_missing = False
        self.replay_start = self._replay_start(state)
        self._labels = np.asarray(index.labels, dtype=np.int64)
        self._fill: DaliTrainStream | None = None
        # Replay: DALI renders the planned batches ahead of the consumer (built at the first replayed batch).
        self._ahead: ViewsAhead[_Replay] | None = None
        # Per pass, computed once: the share's order and each image's replayed view.
        self._slot_cache: tuple[int, np.ndarray] | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None
        if not self.replaying:
            self._fill = DaliTrainStream(
                settings, index, device, rank, world_size, state, quarantine=self.quarantine
            )

    def _replay_start(self, state: dict) -> int:
        """The stream position of the first replayed batch: the resumed run's; 0 when the cache is already complete;
        else the batch boundary after the fill. -1 in fixed mode, which never replays."""
        if "replay_start" in state:
            return int(state["replay_start"])
        if self.mode != "replay":
            return -1
        if self.cache.is_done(self.share_ids[:, None], np.arange(self.num_views)[None, :]).all():
            return 0  # a complete cache from an earlier run: no fill at all
        # Replay starts at the first batch boundary after K passes (that pass is stitched at the boundary).
        fill_samples = self.num_views * self.num_samples
        return math.ceil(fill_samples / self.batch_size) * self.batch_size

    @property
    def replaying(self) -> bool:
        return self.mode == "replay" and 0 <= self.replay_start <= self.position

    def __iter__(self) -> Iterator[Batch]:
        fill_iter = iter(self._fill) if self._fill is not None else None
        while True:
            if self.replaying:
                if self._fill is not None:  # the fill is over: its pipeline is no longer needed
                    self._fill.close()
                    self._fill, fill_iter = None, None
                yield self._replay_batch()
            else:
                assert fill_iter is not None  # a stream that is not replaying fills
                yield self._fill_batch(next(fill_iter))

    def _fill_batch(self, batch: Batch) -> Batch:
        positions = self.position + np.arange(len(batch))
        passes = positions // self.num_samples
        self.position += len(batch)
        if self.mode == "fixed":
            # One stored view per sample; afterwards the targets of that view are looked up for any new view.
            batch.cache = CacheFields(
                slots=np.zeros(len(batch), dtype=np.int64),
                store=passes == 0,
                from_cache=bool((passes > 0).all()),
            )
        else:
            batch.cache = CacheFields(
                slots=np.minimum(passes, self.num_views - 1), store=passes < self.num_views
            )
        return batch

    def _slots_of_pass(self, pass_index: int) -> np.ndarray:
        if self._slot_cache is None or self._slot_cache[0] != pass_index:
            rng = np.random.default_rng([self.seed, pass_index, 0x5107])
            self._slot_cache = (pass_index, rng.integers(0, self.num_views, size=self.index.num_samples))
        return self._slot_cache[1]

    def _plan(self, position: int) -> _Replay:
        """What the batch at `position` replays, by the runtime quarantine as it stands, with its cached targets
        read into host memory (consumer's thread only).

        Batches are planned ahead (data.prefetch_batches - 1 of them) while the consumer's thread asks for the
        current one; the rows are read then too. A replay writes no rows, and the quarantine changes only when a
        batch fails to render, after which every batch from the consumer's position is planned again: so a batch
        planned ahead is the batch an unprefetched stream would make. The rows' read (a gather of a few KB per row
        from the memory-mapped arrays, into pinned memory on a GPU) stays on this thread: it is small beside the
        render, and done a batch early it leaves the step only an asynchronous copy to the device.
        """
        stream_ids = np.empty(self.batch_size, dtype=np.int64)
        scheduled = np.empty(self.batch_size, dtype=np.int64)
        for k in range(self.batch_size):
            pass_index, offset = divmod(position + k, self.num_samples)
            stream_ids[k] = self._order(pass_index)[offset]
            scheduled[k] = self._slots_of_pass(pass_index)[stream_ids[k]]
        ids, slots, missing = self._rows(stream_ids, scheduled)
        view = self.cache.read_views(ids, slots)
        start = time.perf_counter()
        rows = self.cache.read_rows(ids, slots, pin_memory=self.device.type == "cuda")
        read_s = time.perf_counter() - start
        render_ids, render_view = ids, ViewRecord(view.crop_anchor, view.crop_shape, view.flip, view.jitter)
        if view.mix is not None:
            # Only the rows that show their partner: an unmixed row (λ = 1, empty box) mixes to its own view
            # exactly, so rendering its partner (itself) again would only cost a decode (data.augment.mix_prob < 1).
            shown = view.mix.take(torch.nonzero(view.mix.shows_partner()).squeeze(1))
            partner = shown.partner_view
            render_ids = np.concatenate([ids, shown.partner_id.numpy()])
            anchor, shape, flip, jitter = (
                torch.cat([getattr(render_view, f), getattr(partner, f)]) for f in ViewRecord.CROP_FIELDS
            )
            render_view = ViewRecord(anchor, shape, flip, jitter)
        return _Replay(position, stream_ids, ids, slots, missing, view, rows, read_s, render_ids, render_view)

    def _plans(self, position: int) -> Iterator[_Replay]:
        """The plans of the batches from `position` on, one per batch."""
        while True:
            yield self._plan(position)
            position += self.batch_size

    def _views_ahead(self) -> ViewsAhead[_Replay]:
        return ViewsAhead(
            self._plans(self.position), self.index, self.params,
            max_views=2 * self.batch_size if self.cache.mixed else self.batch_size, device=self.device,
            depth=self.settings.data.prefetch_batches, decode=self.settings.decode,
            num_threads=self.settings.data.dali_threads,
        )  # fmt: skip

    def _replay_batch(self) -> Batch:
        """The next replayed batch; DALI is already rendering the ones after it (data.prefetch_batches)."""
        while True:
            try:
                if self._ahead is None:
                    self._ahead = self._views_ahead()
                plan, rendered = next(self._ahead)
                break
            except RuntimeError as e:
                # The file is set aside (or the run stops) and the batches from here on are planned again: the
                # slots of the file read their stand-in's rows.
                self._ahead = None
                self.quarantine.set_aside(str(e))
        images = rendered[: self.batch_size]
        mix = plan.view.mix
        if len(rendered) > self.batch_size:
            assert mix is not None  # only a mixed batch renders partners
            shown = mix.shows_partner()
            on = torch.nonzero(shown).squeeze(1).to(images.device)
            lam, box = mix.lam[shown].to(images.device), mix.box[shown].to(images.device)
            images[on] = mix_images(images[on], rendered[self.batch_size :], lam, box)
        self.position += self.batch_size
        self.views_rendered += len(plan.render_ids)
        self._count_missing(plan.missing)
        ids = plan.ids
        batch = Batch(
            images=images, labels=torch.from_numpy(self._labels[ids]), sample_ids=torch.from_numpy(ids),
            stream_ids=torch.from_numpy(plan.stream_ids), view=plan.view, host_ids=ids,
            host_stream_ids=plan.stream_ids,
            cache=CacheFields(
                plan.slots, from_cache=True, targets=plan.rows.to_outputs(self.device), read_s=plan.read_s,
                damaged=~plan.rows.intact,
            ),
        )  # fmt: skip
        return batch.to(self.device, non_blocking=True)

    def _rows(self, stream_ids: np.ndarray, scheduled: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The rows to replay for these slots and view slots: (sample ids, view slots, how many stood in).

        Slot i shows the image r it resolves to, with r's row of the scheduled view slot when that row holds a
        view of r; else r's next such view slot (cyclically); else the next same-class image with one.
        """
        ids = np.array([self.quarantine.resolve(i) for i in stream_ids.tolist()], dtype=np.int64)
        slots = scheduled.copy()
        usable = self._replayable(ids, slots)
        for k in np.flatnonzero(~usable).tolist():
            ids[k], slots[k] = self._stand_in_row(int(ids[k]), int(slots[k]))
        return ids, slots, int((~usable).sum())

    def _own_slot(self, sample_id: int, first: int) -> int | None:
        """The first view slot from `first` on (cyclically) whose row holds a view of sample_id, if any."""
        order = (first + np.arange(self.num_views)) % self.num_views
        own = self._replayable(np.full(self.num_views, sample_id), order)
        return int(order[np.argmax(own)]) if own.any() else None

    def _replayable(self, ids: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Rows that hold a view of their own sample, whose view record is as written (its checksum), and (mixed
        views) whose partner's file is still good."""
        usable = self.cache.replayable(ids, slots)
        if self.cache.mixed:
            partners = self.cache.partners(ids, slots)
            usable &= np.array(
                [not self.quarantine.is_set_aside(int(p)) for p in partners.tolist()], dtype=bool
            )
        return usable

    def _stand_in_row(self, sample_id: int, slot: int) -> tuple[int, int]:
        own = self._own_slot(sample_id, slot)
        if own is not None:
            return sample_id, own
        try:
            other = self.quarantine.replacement(
                sample_id, usable=lambda c: self._own_slot(c, slot) is not None
            )
        except TrainingStopped:
            label = self.index.class_names[self.index.labels[sample_id]]
            raise TrainingStopped(
                f"teacher cache {self.cache.dir}: no row of class {label} can be replayed (none done); "
                "delete the cache or set train.cache_rebuild=true"
            ) from None
        own = self._own_slot(other, slot)
        assert own is not None  # `usable` chose it for having one
        return other, own

    def _count_missing(self, missing: int) -> None:
        if not missing:
            return
        self.missing_rows += missing
        if not self._warned_missing:
            self._warned_missing = True
            console.warning(
                f"warning: teacher cache {self.cache.dir}: {missing} replayed row(s) are not done (or hold another image's "
                "view, or their view record fails its checksum); another view of the same image, else a same-class "
                "image, stands in (counted in the stream's missing_rows)"
            )

    def _order(self, pass_index: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != pass_index:
            self._order_cache = (pass_index, pass_order(self.share_ids, self.seed, pass_index))
        return self._order_cache[1]

    def state_dict(self) -> dict:
        state = {
            "backend": "dali",
            "position": self.position,
            "replay_start": self.replay_start,
            "substitutions": self.quarantine.state_dict(),
            "missing_rows": self.missing_rows,
        }
        if self._fill is not None:
            state["pipeline"] = self._fill.state_dict()["pipeline"]
        return state

    def take_entries(self) -> list[dict[str, str]]:
        """Files set aside since the last call (while filling or replaying), as quarantine entries."""
        return self.quarantine.take_entries()

    def close(self) -> None:
        if self._fill is not None:
            self._fill.close()
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
