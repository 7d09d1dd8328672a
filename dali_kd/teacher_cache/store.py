"""The teacher-feature cache on disk: per (sample, view) the teacher's outputs and the view record they belong to.

One preallocated memory-mapped array per stored output (samples × views × feature), a view-record array and a done
byte per row, written only after the row's data, with the row's checksums (dali_kd.teacher_cache.integrity).
header.json names everything the values depend on (teacher and its weights, image size, normalisation,
augmentation, pipeline version, the file list); a cache built for something else is refused, and so is one whose
files are missing or of another size than the header implies. A killed writer leaves rows that are simply not done.

Rows belong to stream slots. The done byte is DONE when the row holds a view of its own sample, STAND_IN when it was
written for a slot whose file was set aside and holds a view of the same-class image shown instead: the cache still
becomes complete, and a replay never renders such a row's view from the slot's own file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dali_kd import console
from dali_kd.data.batch import ViewRecord
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.io import os_reason, write_text_atomic
from dali_kd.pipelines import PIPELINE_VERSION
from dali_kd.teacher_cache import integrity
from dali_kd.teacher_cache.integrity import NUM_CHECKS, TARGETS_CHECK, VIEW_CHECK, row_checksums
from dali_kd.teacher_cache.rows import (
    MIX_FIELDS,
    VIEW_FIELDS,
    CachedRows,
    pack_mix,
    pack_views,
    unpack_mix,
    unpack_views,
)

# 2: rows carry checksums (checks.bin). A cache of another format is refused, never misread.
FORMAT_VERSION = 2
# Done bytes: 0 not written, DONE a view of the row's own sample, STAND_IN a view of the image shown in its place.
DONE = 1
STAND_IN = 2


@dataclass(frozen=True)
class Part:
    """One stored teacher output: its name and per-row shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


def _present(value: torch.Tensor | None, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"the teacher's outputs lack {name}, which this cache stores")
    return value


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


def row_bytes(parts: list[Part], mixed: bool = False) -> int:
    mix = (MIX_FIELDS * 4 + 8) if mixed else 0
    checks = NUM_CHECKS * 4
    return (
        sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts)
        + VIEW_FIELDS * 4
        + 1
        + checks
        + mix
    )


class TeacherCache:
    """Open (create, or check and reuse) the cache in `directory` for `num_samples` × `num_views` rows.

    mixed: the views are mixed (data.augment.mix): every row also stores its view's mix part.
    create: this process may allocate the cache (rank 0); rebuild: train.cache_rebuild (a cache built for something
    else, or damaged, is allocated afresh instead of refused)."""

    def __init__(
        self,
        directory: Path,
        identity: dict[str, Any],
        parts: list[Part],
        num_samples: int,
        num_views: int,
        create: bool,
        rebuild: bool = False,
        mixed: bool = False,
    ):
        self.dir = Path(directory).expanduser()
        self.parts = parts
        self.mixed = mixed
        self.num_samples, self.num_views = num_samples, num_views
        self.header = {
            "format": FORMAT_VERSION,
            "pipeline_version": PIPELINE_VERSION,
            **identity,
            "num_samples": num_samples,
            "num_views": num_views,
            "parts": [[p.name, list(p.shape), p.dtype] for p in parts],
            # Only in a mixed cache's header, so that caches built before mixing existed stay valid.
            **({"mix_rows": MIX_FIELDS} if mixed else {}),
        }
        # Rows found failing their checksum in this process: (sample id, view slot).
        self.damaged: set[tuple[int, int]] = set()
        self._check_or_allocate(create, rebuild)
        self.arrays = {p.name: self._open(p.name, p.dtype, (num_samples, num_views, *p.shape)) for p in parts}
        self.views = self._open("views", "float32", (num_samples, num_views, VIEW_FIELDS))
        self.done = self._open("done", "uint8", (num_samples, num_views))
        self.checks = self._open("checks", "uint32", (num_samples, num_views, NUM_CHECKS))
        self.mix_arrays = (
            {name: self._open(name, dtype, shape) for name, dtype, shape in self._mix_layout()}
            if mixed
            else {}
        )

    def _mix_layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        rows = (self.num_samples, self.num_views)
        return [("mix_partner", "int64", rows), ("mix", "float32", (*rows, MIX_FIELDS))]

    def _layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Every array file: name, dtype, shape."""
        rows = (self.num_samples, self.num_views)
        return [
            *((p.name, p.dtype, (*rows, *p.shape)) for p in self.parts),
            ("views", "float32", (*rows, VIEW_FIELDS)),
            ("done", "uint8", rows),
            ("checks", "uint32", (*rows, NUM_CHECKS)),
            *(self._mix_layout() if self.mixed else ()),
        ]

    def _check_or_allocate(self, create: bool, rebuild: bool) -> None:
        """Use the cache in self.dir if it is this run's and whole; allocate one where there is none (create), or
        where rebuild allows; else one line saying what is wrong and how to go on."""
        where = f"train.teacher_feature_dir {self.dir}"
        header_path = self.dir / "header.json"
        existing, unreadable = integrity.read_header(header_path)
        if existing is None and not integrity.any_present(self.dir, self._layout()):
            unreadable = (
                None  # nothing there yet (or an allocation killed before its first file): a new cache
            )
        problem = None
        if existing is not None and existing != self.header:
            problem = f"{where}: the cache there was built for something else ({self._differences(existing)})"
        elif unreadable is not None:
            problem = f"{where}: the cache there is damaged ({unreadable})"
        elif existing is not None:
            damage = integrity.damage(self.dir, self._layout())
            problem = f"{where}: the cache there is damaged ({damage})" if damage else None
        if problem is None and existing is not None:
            return
        if not create:  # rank 0 checked and allocated it before the barrier: this is the same cache, or not
            raise UserError(problem or f"{where}: no cache there ({unreadable or 'header.json is missing'})")
        if problem is not None and not rebuild:
            raise UserError(f"{problem}; set train.cache_rebuild=true to rebuild it")
        if problem is not None:
            console.warning(f"{problem}: rebuilding it (train.cache_rebuild=true)")
            if existing is not None and existing != self.header:
                shutil.rmtree(self.dir)
            else:
                header_path.unlink(missing_ok=True)  # a cache without a header is incomplete: never half-used
        self._allocate(header_path)

    def _differences(self, existing: dict) -> str:
        if existing.get("format") != FORMAT_VERSION:
            return f"cache format {existing.get('format')}, this dali_kd writes {FORMAT_VERSION}"
        changed = sorted(k for k in set(existing) | set(self.header) if existing.get(k) != self.header.get(k))
        return f"{', '.join(changed[:4])} differ"

    def _allocate(self, header_path: Path) -> None:
        needed = self.num_samples * self.num_views * row_bytes(self.parts, self.mixed)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"train.teacher_feature_dir: cannot create {self.dir}: {os_reason(e) or e}"
            ) from None
        free = shutil.disk_usage(self.dir).free
        console.info(
            f"teacher cache: {needed / 2**30:.2f} GiB for {self.num_samples} images × {self.num_views} views in "
            f"{self.dir} ({free / 2**30:.1f} GiB free)"
        )
        if needed > free:
            raise UserError(
                f"train.teacher_feature_dir {self.dir}: the cache needs {needed / 2**30:.2f} GiB but only "
                f"{free / 2**30:.2f} GiB are free (store fewer views or outputs, or use fp16)"
            )
        for name, dtype, shape in self._layout():
            self._create(name, dtype, shape)
        # The header last: a cache without one is incomplete and is allocated again.
        write_text_atomic(header_path, json.dumps(self.header, indent=1))

    def _create(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        path = self.dir / f"{name}.bin"
        try:
            with open(path, "wb") as f:  # sparse preallocation: the blocks fill as rows are written
                f.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        except OSError as e:
            raise UserError(f"train.teacher_feature_dir: cannot write {path}: {os_reason(e) or e}") from None

    def _open(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.memmap:
        return np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r+", shape=shape)

    # ---- rows ---------------------------------------------------------------------------------------------------
    def write(
        self,
        sample_ids: np.ndarray,
        slots: np.ndarray,
        out: ModelOutput,
        view: ViewRecord,
        shown_ids: np.ndarray | None = None,
    ) -> None:
        """Store rows: data and view first, then each row's checksums and its done byte (each file flushed, in that
        order, so that a done row's checksums are on disk).

        sample_ids are the rows (a batch's stream_ids); shown_ids, where given, the images the views were cut from
        (the batch's sample_ids): a row whose image is another sample's is marked STAND_IN, not DONE.
        """
        values: dict[str, torch.Tensor | None] = {"pooled": out.pooled, "tokens": out.patch_tokens}
        if "logits_topk" in self.arrays:
            assert out.logits is not None  # a cache stores logits only of a teacher that has them
            top = out.logits.topk(self.arrays["logits_topk"].shape[-1], dim=-1)
            values["logits_topk"], values["logits_index"] = top.values, top.indices
        else:
            values["logits"] = out.logits
        rows = {name: _present(values[name], name).detach().to("cpu").numpy() for name in self.arrays}
        rows["views"] = pack_views(view)
        if self.mixed:
            if view.mix is None:
                raise AssertionError("a mixed cache stores mixed views only")
            rows["mix_partner"] = view.mix.partner_id.detach().to("cpu").numpy()
            rows["mix"] = pack_mix(view.mix)
        # As stored (fp16 outputs rounded): the checksums are over the bytes on disk.
        files = self._files()
        rows = {name: np.ascontiguousarray(v, dtype=files[name].dtype) for name, v in rows.items()}
        done = np.full(len(sample_ids), DONE, dtype=np.uint8)
        if shown_ids is not None:
            done[np.asarray(shown_ids) != np.asarray(sample_ids)] = STAND_IN
        checks = np.empty((len(done), NUM_CHECKS), dtype=np.uint32)
        checks[:, VIEW_CHECK] = row_checksums(self._view_columns(rows, done))
        checks[:, TARGETS_CHECK] = row_checksums([rows[name] for name in self.arrays])
        self._write_rows(rows, sample_ids, slots)
        self._write_rows({"checks": checks, "done": done}, sample_ids, slots)

    def _files(self) -> dict[str, np.memmap]:
        return {
            **self.arrays,
            **self.mix_arrays,
            "views": self.views,
            "done": self.done,
            "checks": self.checks,
        }

    def _view_columns(self, rows: dict[str, np.ndarray], done: np.ndarray) -> list[np.ndarray]:
        """What a row's view checksum covers, in order: its view record, its mix part, its done byte."""
        mix = [rows["mix_partner"], rows["mix"]] if self.mixed else []
        return [rows["views"], *mix, done]

    def _write_rows(self, rows: dict[str, np.ndarray], sample_ids: np.ndarray, slots: np.ndarray) -> None:
        """Write rows into the arrays' files and fsync them. Written through the file, not the memory map: a
        block the sparse file cannot get (a full disk) is then an OSError here, where a store into the map would
        kill the process with SIGBUS. The maps see the new rows (one page cache)."""
        arrays = self._files()
        for name, values in rows.items():
            array = arrays[name]
            values = np.ascontiguousarray(values, dtype=array.dtype).reshape(len(values), -1)
            row_size = values.shape[1] * values.itemsize
            path = self.dir / f"{name}.bin"
            try:
                fd = os.open(path, os.O_WRONLY)
                try:
                    for value, sample, slot in zip(values, sample_ids, slots, strict=True):
                        offset = (int(sample) * self.num_views + int(slot)) * row_size
                        data, written = value.data.cast("B"), 0
                        while written < row_size:
                            written += os.pwrite(fd, data[written:], offset + written)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise UserError(
                    f"train.teacher_feature_dir: cannot write {path}: {os_reason(e) or e}; the rows written "
                    "before are kept"
                ) from None

    def read(self, sample_ids: np.ndarray, slots: np.ndarray, device: torch.device) -> ModelOutput:
        """The stored teacher outputs of these rows, as fp32 tensors on `device`."""
        return self.read_rows(sample_ids, slots).to_output(device)

    def read_rows(self, sample_ids: np.ndarray, slots: np.ndarray, pin_memory: bool = False) -> CachedRows:
        """These rows' stored arrays, copied into host memory as stored (fp16 stays fp16: half the bytes to move).
        pin_memory: page-locked, so that CachedRows.to_output copies them to a GPU without blocking the host."""
        stored = {name: np.ascontiguousarray(array[sample_ids, slots]) for name, array in self.arrays.items()}
        intact = row_checksums(list(stored.values())) == self.checks[sample_ids, slots, TARGETS_CHECK]
        self._count_damaged(sample_ids, slots, intact)
        arrays = {}
        for name, values in stored.items():
            rows = torch.from_numpy(values)
            arrays[name] = rows.pin_memory() if pin_memory else rows
        return CachedRows(arrays, self.header_classes() if "logits_topk" in arrays else 0, intact)

    def header_classes(self) -> int:
        return int(self.header["num_classes"])

    def read_views(self, sample_ids: np.ndarray, slots: np.ndarray) -> ViewRecord:
        """The stored view records of these rows (a mixed cache's with their mix part), on the host."""
        view = unpack_views(self.views[sample_ids, slots])
        if self.mixed:
            partner_id = np.ascontiguousarray(self.mix_arrays["mix_partner"][sample_ids, slots])
            view.mix = unpack_mix(partner_id, self.mix_arrays["mix"][sample_ids, slots])
        return view

    def partners(self, sample_ids: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The partner sample id each of these rows' views was mixed with (the row's own id in an unmixed cache)."""
        if not self.mixed:
            return np.asarray(sample_ids)
        return np.asarray(self.mix_arrays["mix_partner"][sample_ids, slots])

    def is_done(self, sample_ids: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Whether these rows were written (DONE or STAND_IN)."""
        return self.done[sample_ids, slots] != 0

    def holds_own_view(self, sample_ids: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Whether these rows hold a view of their own sample: the only rows a replay may render from its file."""
        return self.done[sample_ids, slots] == DONE

    def replayable(self, sample_ids: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Rows a replay may render from their own sample's file: they hold a view of it, and their view record
        and done byte are as written (a row whose check fails is counted in `damaged`, and never replayed)."""
        ids, slots = np.asarray(sample_ids), np.asarray(slots)
        written = self.is_done(ids, slots)  # any done byte but 0 is checked: a flipped one fails
        usable = self.holds_own_view(ids, slots)
        if written.any():
            usable[written] &= self.views_intact(ids[written], slots[written])
        return usable

    def views_intact(self, sample_ids: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Whether these rows' view records (mix part included) and done bytes match their checksums."""
        rows = {"views": self.views[sample_ids, slots]}
        if self.mixed:
            rows |= {name: array[sample_ids, slots] for name, array in self.mix_arrays.items()}
        columns = self._view_columns(rows, self.done[sample_ids, slots])
        intact = row_checksums(columns) == self.checks[sample_ids, slots, VIEW_CHECK]
        self._count_damaged(sample_ids, slots, intact)
        return intact

    def _count_damaged(self, sample_ids: np.ndarray, slots: np.ndarray, intact: np.ndarray) -> None:
        for k in np.flatnonzero(~intact).tolist():
            self.damaged.add((int(sample_ids[k]), int(slots[k])))

    def is_complete(self) -> bool:
        """Every row written."""
        return bool(np.all(self.done != 0))

    def rows_done(self) -> int:
        return int(np.count_nonzero(self.done))

    def nbytes_per_row(self) -> int:
        return row_bytes(self.parts, self.mixed)
