"""The teacher-feature cache on disk: per (sample, view) the teacher's outputs and the view record they belong to.

One preallocated memory-mapped array per stored output (samples × views × feature; with several teachers, per
teacher: dali_kd.teacher_cache.layout), a view-record array and a done byte per row, written only after the row's
data, with the row's checksums (dali_kd.teacher_cache.integrity). header.json names everything the values depend on
(the teachers and their weights, image size, normalisation, augmentation, pipeline version, the file list); a cache
built for something else is refused (a changed teacher by name: dali_kd.teacher_cache.teacher_set), and so is one
whose files are missing or of another size than the header implies. A killed writer leaves rows that are simply not
done.

Rows belong to stream slots. The done byte is DONE when the row holds a view of its own sample, STAND_IN when it was
written for a slot whose file was set aside and holds a view of the same-class image shown instead: the cache still
becomes complete, and a replay never renders such a row's view from the slot's own file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
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
from dali_kd.teacher_cache.integrity import VIEW_CHECK, num_checks, row_checksums, targets_check
from dali_kd.teacher_cache.layout import OutputGroup, Part, output_groups, row_bytes, stored_values
from dali_kd.teacher_cache.rows import (
    MIX_FIELDS,
    VIEW_FIELDS,
    CachedRows,
    pack_mix,
    pack_views,
    unpack_mix,
    unpack_views,
)
from dali_kd.teacher_cache.teacher_set import teacher_entries, teacher_set_change

# 2: rows carry checksums (checks.bin). A cache of another format is refused, never misread.
FORMAT_VERSION = 2
# Done bytes: 0 not written, DONE a view of the row's own sample, STAND_IN a view of the image shown in its place.
DONE = 1
STAND_IN = 2


class TeacherCache:
    """Open (create, or check and reuse) the cache in `directory` for `num_samples` × `num_views` rows.

    parts: the one teacher's stored outputs, or (several teachers) each teacher's by its key, in config order.

    mixed: the views are mixed (data.augment.mix): every row also stores its view's mix part.
    create: this process may allocate the cache (rank 0); rebuild: train.cache_rebuild (a cache built for something
    else, or damaged, is allocated afresh instead of refused)."""

    def __init__(
        self,
        directory: Path,
        identity: dict[str, Any],
        parts: list[Part] | dict[str, list[Part]],
        num_samples: int,
        num_views: int,
        create: bool,
        rebuild: bool = False,
        mixed: bool = False,
    ):
        self.dir = Path(directory).expanduser()
        self.groups: list[OutputGroup] = output_groups(parts)
        self.mixed = mixed
        self.num_samples, self.num_views = num_samples, num_views
        self.header = {
            "format": FORMAT_VERSION,
            "pipeline_version": PIPELINE_VERSION,
            **identity,
            "num_samples": num_samples,
            "num_views": num_views,
            "parts": [[file, list(p.shape), p.dtype] for g in self.groups for file, p in g.files()],
            # Only in a mixed cache's header, so that caches built before mixing existed stay valid.
            **({"mix_rows": MIX_FIELDS} if mixed else {}),
        }
        # Rows found failing their checksum in this process: (sample id, view slot).
        self.damaged: set[tuple[int, int]] = set()
        self._check_or_allocate(create, rebuild)
        # Per teacher, its stored outputs by part name (pooled, logits, ...).
        self.outputs = [
            {p.name: self._open(file, p.dtype, (num_samples, num_views, *p.shape)) for file, p in g.files()}
            for g in self.groups
        ]
        self.views = self._open("views", "float32", (num_samples, num_views, VIEW_FIELDS))
        self.done = self._open("done", "uint8", (num_samples, num_views))
        self.checks = self._open("checks", "uint32", (num_samples, num_views, self.num_checks))
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
            *((file, p.dtype, (*rows, *p.shape)) for g in self.groups for file, p in g.files()),
            ("views", "float32", (*rows, VIEW_FIELDS)),
            ("done", "uint8", rows),
            ("checks", "uint32", (*rows, self.num_checks)),
            *(self._mix_layout() if self.mixed else ()),
        ]

    @property
    def num_teachers(self) -> int:
        return len(self.groups)

    @property
    def num_checks(self) -> int:
        return num_checks(self.num_teachers)

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
        teachers = teacher_set_change(existing, self.header)
        if teachers is not None:
            return teachers
        changed = sorted(k for k in set(existing) | set(self.header) if existing.get(k) != self.header.get(k))
        return f"{', '.join(changed[:4])} differ"

    def _allocate(self, header_path: Path) -> None:
        needed = self.num_samples * self.num_views * row_bytes(self.groups, self.mixed)
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
        out: ModelOutput | Sequence[ModelOutput],
        view: ViewRecord,
        shown_ids: np.ndarray | None = None,
    ) -> None:
        """Store rows: data and view first, then each row's checksums and its done byte (each file flushed, in that
        order, so that a done row's checksums are on disk).

        out: each teacher's outputs, in config order (one teacher's: a ModelOutput will do).
        sample_ids are the rows (a batch's stream_ids); shown_ids, where given, the images the views were cut from
        (the batch's sample_ids): a row whose image is another sample's is marked STAND_IN, not DONE.
        """
        outs = [out] if isinstance(out, ModelOutput) else list(out)
        assert len(outs) == self.num_teachers  # one output per teacher the cache stores
        teacher_rows = [self._output_rows(t, o) for t, o in enumerate(outs)]
        rows = {name: values for group in teacher_rows for name, values in group.items()}
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
        checks = np.empty((len(done), self.num_checks), dtype=np.uint32)
        checks[:, VIEW_CHECK] = row_checksums(self._view_columns(rows, done))
        for t, group in enumerate(teacher_rows):
            checks[:, targets_check(t)] = row_checksums(list(group.values()))
        self._write_rows(rows, sample_ids, slots)
        self._write_rows({"checks": checks, "done": done}, sample_ids, slots)

    def write_outputs(
        self, teacher: int, sample_ids: np.ndarray, slots: np.ndarray, out: ModelOutput
    ) -> None:
        """Store one teacher's outputs into written rows (a refill): the outputs, then that teacher's checksum
        (the row's view, done byte and other teachers' outputs stay as they are)."""
        rows = self._output_rows(teacher, out)
        checks = np.array(self.checks[sample_ids, slots])
        checks[:, targets_check(teacher)] = row_checksums(list(rows.values()))
        self._write_rows(rows, sample_ids, slots)
        self._write_rows({"checks": checks}, sample_ids, slots)

    def _output_rows(self, teacher: int, out: ModelOutput) -> dict[str, np.ndarray]:
        """Teacher `teacher`'s outputs as the rows of its files, in its files' dtypes (as stored)."""
        group, arrays = self.groups[teacher], self.outputs[teacher]
        values = stored_values(out, group.parts)
        return {
            group.file(name): np.ascontiguousarray(values[name].detach().to("cpu").numpy(), dtype=array.dtype)
            for name, array in arrays.items()
        }

    def _files(self) -> dict[str, np.memmap]:
        stored = {
            g.file(name): a
            for g, arrays in zip(self.groups, self.outputs, strict=True)
            for name, a in arrays.items()
        }
        return {
            **stored,
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

    def read(
        self, sample_ids: np.ndarray, slots: np.ndarray, device: torch.device, teacher: int = 0
    ) -> ModelOutput:
        """One teacher's (the first, by default) stored outputs of these rows, as fp32 tensors on `device`."""
        return self.read_rows(sample_ids, slots).to_outputs(device)[teacher]

    def read_rows(self, sample_ids: np.ndarray, slots: np.ndarray, pin_memory: bool = False) -> CachedRows:
        """These rows' stored arrays, copied into host memory as stored (fp16 stays fp16: half the bytes to move).
        pin_memory: page-locked, so that CachedRows.to_outputs copies them to a GPU without blocking the host."""
        groups, classes = [], []
        intact = np.empty((self.num_teachers, len(sample_ids)), dtype=bool)
        checks = self.checks[sample_ids, slots]
        for t, arrays in enumerate(self.outputs):
            stored = {name: np.ascontiguousarray(array[sample_ids, slots]) for name, array in arrays.items()}
            intact[t] = row_checksums(list(stored.values())) == checks[:, targets_check(t)]
            rows = {name: torch.from_numpy(values) for name, values in stored.items()}
            groups.append({name: r.pin_memory() if pin_memory else r for name, r in rows.items()})
            classes.append(self.header_classes(t) if "logits_topk" in arrays else 0)
        self._count_damaged(sample_ids, slots, np.all(intact, axis=0))
        return CachedRows(groups, classes, intact)

    def header_classes(self, teacher: int = 0) -> int:
        return int(teacher_entries(self.header)[teacher]["num_classes"])

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
        return row_bytes(self.groups, self.mixed)
