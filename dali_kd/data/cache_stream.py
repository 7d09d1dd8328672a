"""The training stream when the teacher's outputs are cached: fill passes, then replay passes.

replay (default): for the first K passes over the shard the DALI pipeline draws random views and the teacher runs;
each sample's k-th view (k = its pass) and the teacher's outputs are stored. From then on every pass shows, for each
sample, one of its K stored views (a seeded choice), rendered again through the same DALI graph, so the student sees
exactly the view its cached target belongs to (Beyer et al., CVPR 2022). The teacher does not run at all.

fixed (the original trainer's behaviour): one pass fills one view per sample; later passes show fresh random views
while the targets stay those of the first view.

Rows belong to stream slots: a fill batch says which slot each position is (Batch.stream_ids) and which image was
shown there (Batch.sample_ids; another one where the slot's file was set aside), and the trainer writes the rows
at the slots, so every row gets written. A replay shows, for slot i, the image r its runtime quarantine resolves i
to (i itself unless i's file was set aside) with r's own row: r never failed, so its rows hold views of r. A row
that is not done (or holds another image's view) is never replayed: another view slot of the same image stands
in, else a same-class image's row (counted in `missing_rows`). A file that fails to decode during replay is set
aside through the same quarantine and the batch is rendered again with its stand-in's rows.

Mixed views (data.augment.mix): a row's record names the partner image and its view, λ and the box; a replay renders
the partner's view too (for the rows that were mixed) and mixes the two as the fill did
(dali_kd.data.mixing.mix_images), so the student and the fidelity probe see the pixels the cached target was
computed on. A row whose partner's file has been set aside since cannot be rendered: it counts as not usable, like
a row that is not done.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dali_loader import DaliTrainStream, DaliViewRenderer
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.mixing import mix_images
from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.sampling import pass_order, shard_sample_ids
from dali_kd.errors import TrainingStopped
from dali_kd.models import ModelOutput
from dali_kd.teacher_cache import TeacherCache
from pipelines.params import DEFAULT_DECODE, AugmentParams


@dataclass
class _Replay:
    """One replayed batch, planned: its stream slots, the rows it shows (ids, view slots), how many rows stood in
    for missing ones, and the host view record to render."""

    position: int
    stream_ids: np.ndarray
    ids: np.ndarray
    slots: np.ndarray
    missing: int
    view: ViewRecord


class CachedViewStream:
    """The TrainStream of a run with a teacher cache: fill batches from DaliTrainStream, then replayed views.

    Fill batches carry `slots` (the view slot of each row) and `store` (which rows to write, at `stream_ids`);
    replayed ones `from_cache`, `host_ids` and `slots`: the rows whose targets belong to the rendered views.
    `state_dict()` adds the position, the replay start, the runtime substitutions and `missing_rows`.
    """

    def __init__(
        self,
        index: ImageIndex,
        params: AugmentParams,
        batch_size: int,
        seed: int,
        cache: TeacherCache,
        mode: str,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        max_runtime_quarantine: int = 100,
        render_ahead: bool | None = None,
        **dali_kwargs,
    ):
        """render_ahead: render the next replayed batch on a thread of its own while the current one trains.
        Default: on a GPU only. There the views are decoded and rendered on the GPU and the thread only reads
        files and drives DALI; on the CPU the render competes with the student for the same cores, and measured
        slower than rendering in turn (benchmarks/RESULTS.md)."""
        self.index, self.params, self.batch_size, self.seed = index, params, batch_size, seed
        self.cache, self.mode, self.device = cache, mode, torch.device(device)
        self.decode = dali_kwargs.get("decode", DEFAULT_DECODE)  # the fill's decode: replay renders alike
        self.render_ahead = self.device.type == "cuda" if render_ahead is None else render_ahead
        self.num_views = cache.num_views
        self.shard_ids = shard_sample_ids(index.num_samples, rank, world_size)
        self.num_samples = len(self.shard_ids)
        self.rank = rank
        self._dali_kwargs = dict(dali_kwargs, shard_id=rank, num_shards=world_size, reader_seed=seed)
        state = state or {}
        # One quarantine for the fill and the replay: a slot set aside while filling stays resolved in replay.
        self.quarantine = RuntimeQuarantine(
            index, max_runtime_quarantine, {int(k): v for k, v in state.get("substitutions", {}).items()}
        )
        self.position = int(state.get("position", 0))
        # Replayed positions whose scheduled row was not usable and another row stood in (cumulative).
        self.missing_rows = int(state.get("missing_rows", 0))
        self._warned_missing = False
        fill_samples = self.num_views * self.num_samples
        if "replay_start" in state:
            self.replay_start = int(state["replay_start"])
        elif (
            mode == "replay"
            and cache.is_done(self.shard_ids[:, None], np.arange(self.num_views)[None, :]).all()
        ):
            self.replay_start = 0  # a complete cache from an earlier run: no fill at all
        else:
            # Replay starts at the first batch boundary after K passes (that pass is stitched at the boundary).
            self.replay_start = math.ceil(fill_samples / batch_size) * batch_size if mode == "replay" else -1
        self._labels = np.asarray(index.labels, dtype=np.int64)
        self._fill: DaliTrainStream | None = None
        # Replay: views are rendered on a thread of their own, the next batch while the current one trains.
        self._renderer: DaliViewRenderer | None = None
        self._render_thread: ThreadPoolExecutor | None = None
        self._ahead: tuple[_Replay, Future] | None = None
        # Per pass, computed once: the shard's order and each image's replayed view.
        self._slot_cache: tuple[int, np.ndarray] | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None
        if not self.replaying:
            self._fill = DaliTrainStream(
                index, params, batch_size, seed + rank, device=device,
                checkpoint=bytes(state["pipeline"].numpy()) if state.get("pipeline") is not None else None,
                quarantine=self.quarantine, start_position=self.position, **self._dali_kwargs,
            )  # fmt: skip

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
                yield self._fill_batch(next(fill_iter))

    def _fill_batch(self, batch: Batch) -> Batch:
        positions = self.position + np.arange(len(batch))
        passes = positions // self.num_samples
        self.position += len(batch)
        if self.mode == "fixed":
            # One stored view per sample; afterwards the targets of that view are looked up for any new view.
            batch.slots = np.zeros(len(batch), dtype=np.int64)
            batch.store = passes == 0
            batch.from_cache = bool((passes > 0).all())
        else:
            batch.slots = np.minimum(passes, self.num_views - 1)
            batch.store = passes < self.num_views
        return batch

    def _slots_of_pass(self, pass_index: int) -> np.ndarray:
        if self._slot_cache is None or self._slot_cache[0] != pass_index:
            rng = np.random.default_rng([self.seed, pass_index, 0x5107])
            self._slot_cache = (pass_index, rng.integers(0, self.num_views, size=self.index.num_samples))
        return self._slot_cache[1]

    def _plan(self, position: int) -> _Replay:
        """What the batch at `position` replays, by the runtime quarantine as it stands (main thread only)."""
        stream_ids = np.empty(self.batch_size, dtype=np.int64)
        scheduled = np.empty(self.batch_size, dtype=np.int64)
        for k in range(self.batch_size):
            pass_index, offset = divmod(position + k, self.num_samples)
            stream_ids[k] = self._order(pass_index)[offset]
            scheduled[k] = self._slots_of_pass(pass_index)[stream_ids[k]]
        ids, slots, missing = self._rows(stream_ids, scheduled)
        return _Replay(position, stream_ids, ids, slots, missing, self.cache.read_views(ids, slots))

    def _render(self, plan: _Replay) -> Future:
        """Read the plan's files, render its views and read its cached targets: on the renderer's thread, or
        (render_ahead off) right here, as a finished future."""
        if self._renderer is None:
            self._renderer = DaliViewRenderer(
                self.index, self.params, self.batch_size, device=self.device, decode=self.decode,
                num_threads=self._dali_kwargs.get("num_threads", 2),
            )  # fmt: skip
            if self.render_ahead:
                self._render_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali_kd-replay")
        if self._render_thread is not None:
            return self._render_thread.submit(self._prepare, plan)
        done: Future = Future()
        try:
            done.set_result(self._prepare(plan))
        except RuntimeError as e:
            done.set_exception(e)
        return done

    def _prepare(self, plan: _Replay) -> tuple[torch.Tensor, ModelOutput, float]:
        """(images, the teacher's cached outputs for them, seconds spent reading those), all on the device."""
        images = self._renderer.render(plan.ids, plan.view)
        mix = plan.view.mix
        if mix is not None:
            # Only the rows that show their partner: an unmixed row (λ = 1, empty box) mixes to its own view
            # exactly, so rendering its partner (itself) again would only cost a decode (data.augment.mix_prob < 1).
            rows = torch.nonzero(mix.shows_partner()).squeeze(1)
            if len(rows):
                shown = mix.take(rows)
                partners = self._renderer.render(shown.partner_id.numpy(), shown.partner_view)
                on = rows.to(images.device)
                lam, box = shown.lam.to(images.device), shown.box.to(images.device)
                images[on] = mix_images(images[on], partners, lam, box)
        start = time.perf_counter()
        targets = self.cache.read(plan.ids, plan.slots, self.device)
        return images, targets, time.perf_counter() - start

    def _replay_batch(self) -> Batch:
        """The next replayed batch; with render_ahead the one after it starts rendering before this one is handed
        out.

        Only this (the consumer's) thread plans batches and sets files aside, and a batch is planned after every
        earlier batch was taken, so a prefetched batch is the batch an unprefetched stream would make.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0].position == self.position:
            plan, rendering = ahead
        else:
            plan = self._plan(self.position)
            rendering = self._render(plan)
        while True:
            try:
                images, targets, read_s = rendering.result()
                break
            except RuntimeError as e:
                # The file is set aside (or the run stops) and its slots read their stand-in's rows.
                self.quarantine.set_aside(str(e))
                plan = self._plan(self.position)
                rendering = self._render(plan)
        self.position += self.batch_size
        self._count_missing(plan.missing)
        if self.render_ahead:
            following = self._plan(self.position)
            self._ahead = (following, self._render(following))
        ids = plan.ids
        batch = Batch(
            images=images, labels=torch.from_numpy(self._labels[ids]), sample_ids=torch.from_numpy(ids),
            stream_ids=torch.from_numpy(plan.stream_ids), view=plan.view, slots=plan.slots, from_cache=True,
            host_ids=ids, host_stream_ids=plan.stream_ids, cached_targets=targets, cached_read_s=read_s,
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
        """Rows that hold a view of their own sample and (mixed views) whose partner's file is still good."""
        usable = self.cache.holds_own_view(ids, slots)
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
        return other, self._own_slot(other, slot)

    def _count_missing(self, missing: int) -> None:
        if not missing:
            return
        self.missing_rows += missing
        if not self._warned_missing:
            self._warned_missing = True
            warnings.warn(
                f"teacher cache {self.cache.dir}: {missing} replayed row(s) are not done (or hold another image's "
                "view); another view of the same image, else a same-class image, stands in (counted in the "
                "stream's missing_rows)",
                stacklevel=3,
            )

    def _order(self, pass_index: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != pass_index:
            self._order_cache = (pass_index, pass_order(self.shard_ids, self.seed, pass_index))
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
        if self._render_thread is not None:
            self._render_thread.shutdown(wait=True, cancel_futures=True)
            self._render_thread = None
        self._ahead = None
        self._renderer = None
