"""The teacher-feature cache on disk: per (sample, view) the teacher's outputs and the view record they belong to.

One preallocated memory-mapped array per stored output (samples × views × feature), a view-record array and a done
byte per row, written only after the row's data. header.json names everything the values depend on (teacher and
its weights, image size, normalisation, augmentation, pipeline version, the file list); a cache built for something
else is refused. A killed writer leaves rows that are simply not done.

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
from dali_kd.data.batch import MixRecord, ViewRecord
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.io import os_reason, write_text_atomic
from dali_kd.pipelines import PIPELINE_VERSION

VIEW_FIELDS = 9  # anchor (2), shape (2), flip (1), jitter (4)
# With data.augment.mix, per row also the mix part of its view record (dali_kd.data.batch.MixRecord): the partner's
# sample id (int64, its own array) and its view, λ and the box (float32; box coordinates are whole pixels).
MIX_FIELDS = VIEW_FIELDS + 1 + 4
FORMAT_VERSION = 1
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
    return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts) + VIEW_FIELDS * 4 + 1 + mix


class TeacherCache:
    """Open (create, or check and reuse) the cache in `directory` for `num_samples` × `num_views` rows.

    mixed: the views are mixed (data.augment.mix): every row also stores its view's mix part."""

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
        header_path = self.dir / "header.json"
        if create:
            existing = self._read_header(header_path)
            if existing is not None and existing != self.header:
                if not rebuild:
                    changed = sorted(
                        k for k in set(existing) | set(self.header) if existing.get(k) != self.header.get(k)
                    )
                    raise UserError(
                        f"train.teacher_feature_dir {self.dir}: the cache there was built for something else "
                        f"({', '.join(changed[:4])} differ); set train.cache_rebuild=true to rebuild it"
                    )
                shutil.rmtree(self.dir)
                existing = None
            if existing is None:
                self._allocate(header_path)
        elif self._read_header(header_path) != self.header:
            raise UserError(f"train.teacher_feature_dir {self.dir}: cache header does not match this run")
        self.arrays = {p.name: self._open(p.name, p.dtype, (num_samples, num_views, *p.shape)) for p in parts}
        self.views = self._open("views", "float32", (num_samples, num_views, VIEW_FIELDS))
        self.done = self._open("done", "uint8", (num_samples, num_views))
        self.mix_arrays = (
            {name: self._open(name, dtype, shape) for name, dtype, shape in self._mix_layout()}
            if mixed
            else {}
        )

    def _mix_layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        rows = (self.num_samples, self.num_views)
        return [("mix_partner", "int64", rows), ("mix", "float32", (*rows, MIX_FIELDS))]

    @staticmethod
    def _read_header(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

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
        for part in self.parts:
            self._create(part.name, part.dtype, (self.num_samples, self.num_views, *part.shape))
        self._create("views", "float32", (self.num_samples, self.num_views, VIEW_FIELDS))
        self._create("done", "uint8", (self.num_samples, self.num_views))
        for name, dtype, shape in self._mix_layout() if self.mixed else ():
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
        """Store rows (data and view first, then the done bytes; both flushed, in that order).

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
        self._write_rows(rows, sample_ids, slots)
        done = np.full(len(sample_ids), DONE, dtype=np.uint8)
        if shown_ids is not None:
            done[np.asarray(shown_ids) != np.asarray(sample_ids)] = STAND_IN
        self._write_rows({"done": done}, sample_ids, slots)

    def _write_rows(self, rows: dict[str, np.ndarray], sample_ids: np.ndarray, slots: np.ndarray) -> None:
        """Write rows into the arrays' files and fsync them. Written through the file, not the memory map: a
        block the sparse file cannot get (a full disk) is then an OSError here, where a store into the map would
        kill the process with SIGBUS. The maps see the new rows (one page cache)."""
        arrays = {**self.arrays, **self.mix_arrays, "views": self.views, "done": self.done}
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
        arrays = {}
        for name, array in self.arrays.items():
            rows = torch.from_numpy(np.ascontiguousarray(array[sample_ids, slots]))
            arrays[name] = rows.pin_memory() if pin_memory else rows
        return CachedRows(arrays, self.header_classes() if "logits_topk" in arrays else 0)

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

    def is_complete(self) -> bool:
        """Every row written."""
        return bool(np.all(self.done != 0))

    def rows_done(self) -> int:
        return int(np.count_nonzero(self.done))

    def nbytes_per_row(self) -> int:
        return row_bytes(self.parts, self.mixed)


@dataclass
class CachedRows:
    """Teacher-cache rows read into host memory as stored (TeacherCache.read_rows), not yet on the device."""

    arrays: dict[str, torch.Tensor]
    num_classes: int  # the classes a top-k row scatters into (0 without top-k logits)

    def to_output(self, device: torch.device) -> ModelOutput:
        """The teacher's outputs as fp32 tensors on `device`; from pinned rows the copy does not block the host."""

        def take(name):
            return self.arrays[name].to(device, non_blocking=True)

        logits = None
        if "logits" in self.arrays:
            logits = take("logits").float()
        elif "logits_topk" in self.arrays:
            # The rest of the distribution is below the k-th logit: a floor far under it keeps its mass ~0.
            top, index = take("logits_topk").float(), take("logits_index").long()
            logits = torch.full((len(top), self.num_classes), -1e4, device=device)
            logits.scatter_(1, index, top)
        pooled = take("pooled").float() if "pooled" in self.arrays else None
        tokens = take("tokens").float() if "tokens" in self.arrays else None
        return ModelOutput(pooled=pooled, logits=logits, patch_tokens=tokens)


def pack_views(view: ViewRecord) -> np.ndarray:
    columns = [view.crop_anchor, view.crop_shape, view.flip.float().unsqueeze(1), view.jitter]
    return torch.cat([c.detach().float().cpu() for c in columns], dim=1).numpy()


def unpack_views(rows: np.ndarray) -> ViewRecord:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    return ViewRecord(
        crop_anchor=t[:, 0:2], crop_shape=t[:, 2:4], flip=t[:, 4].round().long(), jitter=t[:, 5:9]
    )


def pack_mix(mix: MixRecord) -> np.ndarray:
    """A mix part as float32 rows: the partner's view (VIEW_FIELDS), λ, the box (the partner id is stored apart)."""
    columns = [torch.from_numpy(pack_views(mix.partner_view)), mix.lam.unsqueeze(1), mix.box]
    return torch.cat([c.detach().float().cpu() for c in columns], dim=1).numpy()


def unpack_mix(partner_id: np.ndarray, rows: np.ndarray) -> MixRecord:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    return MixRecord(
        partner_id=torch.from_numpy(partner_id).long(),
        partner_view=unpack_views(rows[:, :VIEW_FIELDS]),
        lam=t[:, VIEW_FIELDS].contiguous(),
        box=t[:, VIEW_FIELDS + 1 :].round().long(),
    )
