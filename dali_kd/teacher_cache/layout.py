"""What a teacher-cache row stores: each teacher's output arrays (one file each), their shapes and the row's bytes.

One teacher's outputs are stored as pooled.bin, logits.bin, ...; with several teachers each teacher's are stored
under its key (model.teachers[i].key): resnet50.pooled.bin, vit_b.tokens.bin, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.teacher_cache.integrity import num_checks
from dali_kd.teacher_cache.rows import MIX_FIELDS, VIEW_FIELDS


@dataclass(frozen=True)
class Part:
    """One stored teacher output: its name and per-row shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


@dataclass(frozen=True)
class OutputGroup:
    """One teacher's stored outputs: its key ("" for the only teacher: today's file names) and its parts."""

    key: str
    parts: list[Part]

    def file(self, part: str) -> str:
        """The array file's name (without .bin) of this teacher's output `part`."""
        return f"{self.key}.{part}" if self.key else part

    def files(self) -> list[tuple[str, Part]]:
        return [(self.file(p.name), p) for p in self.parts]


def output_groups(parts: list[Part] | dict[str, list[Part]]) -> list[OutputGroup]:
    """One teacher's parts (a list: today's layout), or several teachers' by key (a dict: the per-teacher layout)."""
    if isinstance(parts, dict):
        return [OutputGroup(key, list(p)) for key, p in parts.items()]
    return [OutputGroup("", list(parts))]


def parts_for(outputs: Sequence[str], teacher_out: ModelOutput, topk: int | None, dtype: str) -> list[Part]:
    """The arrays needed to store `outputs` (pooled, logits, tokens) of this teacher's outputs (one sample)."""
    parts = []
    if "pooled" in outputs:
        assert teacher_out.pooled is not None  # the live teacher's outputs always have it
        parts.append(Part("pooled", tuple(teacher_out.pooled.shape[1:]), dtype))
    if "logits" in outputs:
        if teacher_out.logits is None:
            raise UserError("train.cache_outputs: 'logits' asked for, but the teacher has no classifier head")
        classes = teacher_out.logits.shape[-1]
        if topk and topk < classes:
            parts += [Part("logits_topk", (topk,), dtype), Part("logits_index", (topk,), "int32")]
        else:
            parts.append(Part("logits", (classes,), dtype))
    if "tokens" in outputs:
        if teacher_out.patch_tokens is None:
            raise UserError(
                "train.cache_outputs: 'tokens' needs a ViT teacher and student with the same token grid"
            )
        parts.append(Part("tokens", tuple(teacher_out.patch_tokens.shape[1:]), dtype))
    return parts


def stored_values(out: ModelOutput, parts: list[Part]) -> dict[str, torch.Tensor]:
    """What `parts` store of a teacher's outputs, by part name (top-k logits: their values and indices)."""
    values: dict[str, torch.Tensor | None] = {"pooled": out.pooled, "tokens": out.patch_tokens}
    topk = next((p.shape[-1] for p in parts if p.name == "logits_topk"), None)
    if topk is not None:
        assert out.logits is not None  # a cache stores logits only of a teacher that has them
        top = out.logits.topk(topk, dim=-1)
        values["logits_topk"], values["logits_index"] = top.values, top.indices
    else:
        values["logits"] = out.logits
    stored = {}
    for part in parts:
        value = values[part.name]
        if value is None:
            raise ValueError(f"the teacher's outputs lack {part.name}, which this cache stores")
        stored[part.name] = value
    return stored


def present_outputs(outputs: Sequence[str], teacher_out: ModelOutput) -> list[str]:
    """Those of `outputs` this teacher gives (with several teachers, a feature-only one stores no logits and a
    convolutional one no tokens: each stores what it gives, and replays what a live run would give)."""
    given = {"pooled": teacher_out.pooled, "logits": teacher_out.logits, "tokens": teacher_out.patch_tokens}
    return [name for name in outputs if given[name] is not None]


def row_bytes(groups: list[OutputGroup], mixed: bool = False) -> int:
    """A row's bytes over every file: the teachers' outputs, view record, done byte, checksums (and mix part)."""
    mix = (MIX_FIELDS * 4 + 8) if mixed else 0
    checks = num_checks(len(groups)) * 4
    stored = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for g in groups for p in g.parts)
    return stored + VIEW_FIELDS * 4 + 1 + checks + mix
