"""The training stream when the teacher's outputs are cached: fill passes, then replay passes.

replay (default): for the first K passes over the shard the DALI pipeline draws random views and the teacher runs;
each sample's k-th view (k = its pass) and the teacher's outputs are stored. From then on every pass shows, for each
sample, one of its K stored views (a seeded choice), rendered again through the same DALI graph, so the student sees
exactly the view its cached target belongs to (Beyer et al., CVPR 2022). The teacher does not run at all.

fixed (the original trainer's behaviour): one pass fills one view per sample; later passes show fresh random views
while the targets stay those of the first view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from dali_kd.data.batch import Batch
from dali_kd.data.dali_loader import DaliTrainStream, DaliViewRenderer
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.sampling import pass_order, shard_sample_ids
from dali_kd.teacher_cache import TeacherCache
from pipelines.params import AugmentParams


class CachedViewStream:
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
        **dali_kwargs,
    ):
        self.index, self.params, self.batch_size, self.seed = index, params, batch_size, seed
        self.cache, self.mode, self.device = cache, mode, torch.device(device)
        self.num_views = cache.num_views
        self.shard_ids = shard_sample_ids(index.num_samples, rank, world_size)
        self.num_samples = len(self.shard_ids)
        self.rank = rank
        self._dali_kwargs = dict(dali_kwargs, shard_id=rank, num_shards=world_size, reader_seed=seed)
        state = state or {}
        self.position = int(state.get("position", 0))
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
        self._fill: DaliTrainStream | None = None
        self._renderer: DaliViewRenderer | None = None
        # Per pass, computed once: the shard's order and each image's replayed view.
        self._slot_cache: tuple[int, np.ndarray] | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None
        if not self.replaying:
            self._fill = DaliTrainStream(
                index, params, batch_size, seed + rank, device=device,
                checkpoint=bytes(state["pipeline"].numpy()) if state.get("pipeline") is not None else None,
                substitutions={int(k): v for k, v in state.get("substitutions", {}).items()},
                **self._dali_kwargs,
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
            batch.slots = torch.zeros(len(batch), dtype=torch.int64)
            batch.store = torch.from_numpy(passes == 0)
            batch.from_cache = bool((passes > 0).all())
        else:
            batch.slots = torch.from_numpy(np.minimum(passes, self.num_views - 1))
            batch.store = torch.from_numpy(passes < self.num_views)
        return batch

    def _slots_of_pass(self, pass_index: int) -> np.ndarray:
        if self._slot_cache is None or self._slot_cache[0] != pass_index:
            rng = np.random.default_rng([self.seed, pass_index, 0x5107])
            self._slot_cache = (pass_index, rng.integers(0, self.num_views, size=self.index.num_samples))
        return self._slot_cache[1]

    def _replay_batch(self) -> Batch:
        ids = np.empty(self.batch_size, dtype=np.int64)
        slots = np.empty(self.batch_size, dtype=np.int64)
        for k in range(self.batch_size):
            pass_index, offset = divmod(self.position + k, self.num_samples)
            ids[k] = self._order(pass_index)[offset]
            slots[k] = self._slots_of_pass(pass_index)[ids[k]]
        self.position += self.batch_size
        view = self.cache.read_views(ids, slots)
        if self._renderer is None:
            self._renderer = DaliViewRenderer(self.index, self.params, self.batch_size, device=self.device)
        sample_ids = torch.from_numpy(ids)
        images = self._renderer.render(sample_ids, view)
        labels = torch.tensor([self.index.labels[i] for i in ids], dtype=torch.int64)
        return Batch(
            images=images, labels=labels.to(self.device), sample_ids=sample_ids.to(self.device),
            view=view.to(self.device), slots=torch.from_numpy(slots), from_cache=True, host_ids=ids,
        )  # fmt: skip

    def _order(self, pass_index: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != pass_index:
            self._order_cache = (pass_index, pass_order(self.shard_ids, self.seed, pass_index))
        return self._order_cache[1]

    def state_dict(self) -> dict:
        state = {"backend": "dali", "position": self.position, "replay_start": self.replay_start}
        if self._fill is not None:
            fill = self._fill.state_dict()
            state["pipeline"], state["substitutions"] = fill["pipeline"], fill["substitutions"]
        return state

    def take_entries(self) -> list[dict[str, str]]:
        return self._fill.take_entries() if self._fill is not None else []

    def close(self) -> None:
        if self._fill is not None:
            self._fill.close()
        self._renderer = None
