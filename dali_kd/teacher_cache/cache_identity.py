"""The teacher cache a run opens: what its targets depend on (its identity, which names the teachers) and what each
teacher stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dali_kd import console, distributed
from dali_kd.config import Config
from dali_kd.config.data_section import MIX_KEYS
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.identity import files_hash
from dali_kd.models import FrozenTeacher
from dali_kd.teacher_cache.layout import Part, parts_for, present_outputs
from dali_kd.teacher_cache.store import TeacherCache


def _num_classes(probe: ModelOutput) -> int:
    return 0 if probe.logits is None else int(probe.logits.shape[-1])


def _one_teacher(teacher: FrozenTeacher, teacher_id: dict[str, str], probe: ModelOutput) -> dict[str, Any]:
    """The header keys that name one teacher's cache, and their order, as caches have always had them."""
    identity: dict[str, Any] = {"teacher": teacher_id, "num_classes": _num_classes(probe)}
    if teacher.input is not None:
        # The teacher's own size and normalisation (only where they differ from the views', so that a cache built
        # before teachers had their own input stays valid).
        identity["teacher_input"] = teacher.input.model.to_dict()
    return identity


def _teacher_entry(key: str, teacher: FrozenTeacher, teacher_id: dict[str, str], probe: ModelOutput) -> dict:
    """One of several teachers in the header: its key, id, input (where it differs from the views'), classes."""
    entry: dict[str, Any] = {"key": key, "teacher": teacher_id}
    if teacher.input is not None:
        entry["input"] = teacher.input.model.to_dict()
    entry["num_classes"] = _num_classes(probe)
    return entry


def _identity(cfg: Config, train_index: ImageIndex, named: dict[str, Any]) -> dict[str, Any]:
    """Everything the cached targets depend on. named: the keys that name the teachers, one teacher's (_one_teacher:
    placed where caches have always had them) or {"teachers": entries}."""

    def picked(*keys: str) -> dict[str, Any]:
        return {k: named[k] for k in keys if k in named}

    mixed = cfg.data.augment.mix != "none"
    return {
        **picked("teacher", "teachers"),
        "image_size": cfg.view_size,
        # The mix keys only where mixing is on: caches built before they existed stay valid.
        "augment": cfg.data.augment.model_dump(mode="json", exclude=None if mixed else set(MIX_KEYS)),
        "files": files_hash(train_index.files),
        **picked("num_classes"),
        "mode": cfg.train.cache_mode,
        # Both change the pixels a cached target was computed on (window edges; fp16 rounding).
        "decode": cfg.data.decode,
        "output_dtype": cfg.data.output_dtype,
        **picked("teacher_input"),
    }


def open_teacher_cache(
    cfg: Config,
    teachers: list[FrozenTeacher],
    teacher_ids: list[dict[str, str]],
    train_index: ImageIndex,
    patches: list[bool],
    device: torch.device,
    is_main: bool,
) -> TeacherCache:
    """The teacher cache for these teachers (config order; each with its id and whether its patch tokens are
    distilled), data and augmentation (rank 0 creates it, the others open it). One teacher's cache is laid out and
    named as it always was; several teachers store each one's outputs under its key (model.teacher_keys)."""
    train = cfg.train
    size = (
        cfg.view_size
    )  # the views the cache's records describe (each teacher resizes them to its own input)
    probes = [
        t(torch.zeros(1, 3, size, size, device=device), with_patches=p)
        for t, p in zip(teachers, patches, strict=True)
    ]
    dtype = "float16" if train.cache_dtype == "fp16" else "float32"
    parts: list[Part] | dict[str, list[Part]]
    if len(teachers) == 1:
        parts = parts_for(train.cache_outputs, probes[0], train.cache_logits_topk, dtype)
        identity = _identity(cfg, train_index, _one_teacher(teachers[0], teacher_ids[0], probes[0]))
    else:
        parts = {}
        for i, (key, probe) in enumerate(zip(cfg.model.teacher_keys, probes, strict=True)):
            stored = present_outputs(train.cache_outputs, probe)
            if not {"pooled", "logits"} & set(stored):
                raise UserError(
                    f"train.cache_outputs with {cfg.model.teacher_where(i)}: the cache would store none of its "
                    "pooled embedding or logits, which its fidelity probe compares; add pooled"
                )
            parts[key] = parts_for(stored, probe, train.cache_logits_topk, dtype)
        entries = [
            _teacher_entry(key, teacher, teacher_id, probe)
            for key, teacher, teacher_id, probe in zip(
                cfg.model.teacher_keys, teachers, teacher_ids, probes, strict=True
            )
        ]
        identity = _identity(cfg, train_index, {"teachers": entries})
    views = 1 if train.cache_mode == "fixed" else train.cache_views_per_image
    assert train.teacher_feature_dir  # the config asks for it with the cache
    mixed = cfg.data.augment.mix != "none"
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
