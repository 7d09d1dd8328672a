"""Rules of the teacher cache that a test must be able to fail on: a fresh run replays only a complete cache, and
the cache's identity covers everything its rows depend on — the augmentation included, not only the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_kd.data.batch import ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.models import FrozenTeacher, create_model
from dali_kd.teacher_cache.cache_identity import open_teacher_cache
from dali_kd.teacher_cache.layout import parts_for
from dali_kd.teacher_cache.store import TeacherCache
from dali_kd.teacher_cache.stream import CachedViewStream

CPU = torch.device("cpu")


@pytest.fixture
def cache_and_index(image_tree, tmp_path):
    index = ImageIndex.from_folder(image_tree / "train")
    torch.manual_seed(0)
    teacher = FrozenTeacher(create_model("test_resnet", 32, 4), None)
    parts = parts_for(["pooled"], teacher(torch.zeros(1, 3, 32, 32)), None, "float32")
    cache = TeacherCache(tmp_path / "cache", {"teacher": "t"}, parts, index.num_samples, 2, create=True)
    return cache, index


def fill(cache: TeacherCache, ids: np.ndarray, slots: np.ndarray) -> None:
    """Rows with a valid view (the left half of each image, unjittered) and constant targets."""
    n = len(ids)
    view = ViewRecord(
        crop_anchor=torch.zeros(n, 2), crop_shape=torch.tensor([[1.0, 0.5]]).repeat(n, 1),
        flip=torch.zeros(n, dtype=torch.int64), jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
    )  # fmt: skip
    out = ModelOutput(pooled=torch.ones(n, cache.groups[0].parts[0].shape[0]), logits=None, patch_tokens=None)
    cache.write(ids, slots, out, view)


def first_batch(cache, index, cfg):
    stream = CachedViewStream(cfg.stream_settings(), index, CPU, cache=cache, mode="replay")
    try:
        return next(iter(stream))
    finally:
        stream.close()


def test_a_fresh_run_on_a_partly_filled_cache_fills_it_first(cache_and_index, tiny_config):
    cache, index = cache_and_index
    ids = np.arange(index.num_samples)
    fill(cache, ids, np.zeros_like(ids))  # every image's first view, none of the second
    fill(cache, ids[:-1], np.ones_like(ids[:-1]))  # ... and all second views but one
    assert not cache.is_complete()
    batch = first_batch(cache, index, tiny_config())
    assert not batch.cache.from_cache and bool(batch.cache.store.all()), (
        "a partly filled cache was taken as complete"
    )


def test_a_fresh_run_on_a_complete_cache_replays_at_once(cache_and_index, tiny_config):
    cache, index = cache_and_index
    ids = np.arange(index.num_samples)
    for slot in (0, 1):
        fill(cache, ids, np.full_like(ids, slot))
    assert cache.is_complete()
    assert first_batch(cache, index, tiny_config()).cache.from_cache


@pytest.mark.parametrize(
    "change",
    ["data.augment.hue=0.2", "data.augment.crop_scale=[0.5, 1.0]", "data.augment.flip_prob=0.0",
     "data.augment.mean=[0.5, 0.5, 0.5]", "data.image_size=48", "train.cache_mode=fixed"],
)  # fmt: skip
def test_a_cache_built_with_other_augmentations_is_refused(tiny_config, tmp_path, change):
    """The rows are targets of views made with these settings: other settings make other views."""
    base = tiny_config("train.cache_teacher_features=true", f"train.teacher_feature_dir={tmp_path / 'cache'}")
    index = ImageIndex.from_folder(base.data.root)
    teacher = FrozenTeacher(create_model("test_resnet", 32, 4), None)
    teacher_id = {"name": "test_resnet", "weights_hash": "x"}
    open_teacher_cache(base, [teacher], [teacher_id], index, [False], CPU, True)
    other = tiny_config(
        "train.cache_teacher_features=true", f"train.teacher_feature_dir={tmp_path / 'cache'}", change,
        *(["data.eval_resize=56"] if change.startswith("data.image_size") else []),
    )  # fmt: skip
    with pytest.raises(UserError, match="built for something else"):
        open_teacher_cache(other, [teacher], [teacher_id], index, [False], CPU, True)
