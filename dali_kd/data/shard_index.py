"""Training from tar shards (data.format shards): the manifest read into an ImageIndex, and where each sample's
bytes lie in its shard.

Sample ids are the manifest's (line i of samples.jsonl is sample i), which are the ids training from the folder
gives; a sample's key in its tar is its id. Every reader reads by offset: DALI's webdataset reader through the
index files, the replay renderer, the torchvision backend and the quarantine by one os.pread each.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dali_kd.data import shards as fmt
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.shards import ShardLayout
from dali_kd.errors import UserError


def manifest_folder(path: str | os.PathLike) -> Path:
    """The shard folder that data.root / data.val_root names (the folder or its manifest.json)."""
    path = Path(path).expanduser()
    return path.parent if path.name == fmt.MANIFEST_NAME else path


def _check_index(where: str, index_path: Path, tar: str, rows: list[list]) -> None:
    """The index must list the manifest's samples of this tar, at their offsets: a stale or damaged index would make
    DALI read wrong bytes or fail mid-run."""
    try:
        lines = index_path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{where}: cannot read the index {index_path} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: bad index {index_path}: not text (byte {e.start})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != fmt.INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(rows):
        raise UserError(
            f"{where}: bad index {index_path}: expected a first line '{fmt.INDEX_VERSION} {len(rows)}' "
            f"(rewrite it with python -m dali_kd.shard --index-only {index_path.parent})"
        )
    expected = {(r[2], r[3]) for r in rows}
    listed = set()
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4 or not fields:
            raise UserError(
                f"{where}: bad index {index_path}:{number}: expected '<ext> <offset> <size> <name>' ..."
            )
        for k in range(0, len(fields), 4):
            ext, offset, size = fields[k : k + 3]
            if ext != fmt.LABEL_EXT:
                if not (offset.isdigit() and size.isdigit()):
                    raise UserError(
                        f"{where}: bad index {index_path}:{number}: offset and size must be numbers"
                    )
                listed.add((int(offset), int(size)))
    if listed != expected:
        raise UserError(
            f"{where}: index {index_path} does not match the manifest's samples of {tar} "
            f"(rewrite it with python -m dali_kd.shard --index-only {index_path.parent})"
        )


# A row of samples.jsonl: [id, shard, offset, size, label, original path].
ROW_FIELDS = ("id", "shard", "offset", "size", "label", "path")


def _check_row(where: str, samples_path: Path, number: int, row, num_shards: int, num_classes: int) -> None:
    """One line of samples.jsonl, of the types and within the ranges training reads it with."""
    at = f"{where}: {samples_path}:{number}"
    if not isinstance(row, list) or len(row) != len(ROW_FIELDS):
        raise UserError(f"{at}: expected [{', '.join(ROW_FIELDS)}], not {json.dumps(row)[:60]}")
    for name, value in zip(ROW_FIELDS[:5], row[:5], strict=True):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{at}: field '{name}' must be a whole number, not {json.dumps(value)[:40]}")
    if not isinstance(row[5], str):
        raise UserError(f"{at}: field 'path' must be a file name, not {json.dumps(row[5])[:40]}")
    if row[1] >= num_shards:
        raise UserError(f"{at}: field 'shard' is {row[1]}, but the manifest lists {num_shards} shard(s)")
    if row[4] >= num_classes:
        raise UserError(
            f"{at}: field 'label' is {row[4]}, but the manifest's class_names has {num_classes} classes (0..{num_classes - 1})"
        )


def _read_samples(where: str, folder: Path, manifest: dict, names: tuple[str, ...]) -> list[list]:
    """The rows of samples.jsonl, each checked, listing samples 0..n-1 and every class of the manifest; the file
    must be the one the manifest's samples_sha256 names (an edited label would otherwise train quietly)."""
    samples_path = folder / manifest.get("samples", fmt.SAMPLES_NAME)
    try:
        data = samples_path.read_bytes()
        rows = [json.loads(line) for line in data.decode().splitlines()]
    except OSError as e:
        raise UserError(f"{where}: cannot read {samples_path} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: {samples_path} is damaged ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: {samples_path} is damaged (not UTF-8 text: byte {e.start})") from None
    num_shards = len(manifest["shards"])
    for number, row in enumerate(rows, start=1):
        _check_row(where, samples_path, number, row, num_shards, len(names))
    if hashlib.sha256(data).hexdigest() != manifest["samples_sha256"]:
        raise UserError(
            f"{where}: {samples_path} is not the file the manifest was made with (its sha256 differs from "
            f"samples_sha256 in {fmt.MANIFEST_NAME}): edited or damaged; make the shards again"
        )
    if len(rows) != manifest["num_samples"] or any(row[0] != i for i, row in enumerate(rows)):
        raise UserError(f"{where}: {fmt.SAMPLES_NAME} does not list samples 0..{manifest['num_samples'] - 1}")
    empty = sorted(set(range(len(names))) - {row[4] for row in rows})
    if empty:
        raise UserError(
            f"{where}: {folder / fmt.MANIFEST_NAME}: field 'class_names' lists {names[empty[0]]!r}, which no sample "
            f"of {samples_path.name} has ({len(empty)} such class(es)); the class list must be the samples' classes"
        )
    return rows


def _check_shards(
    where: str, folder: Path, records: list[dict], rows: list[list]
) -> tuple[list[str], list[str]]:
    """The tar and index paths of each shard, each checked: present, of its recorded size, its index matching the
    manifest's samples of it."""
    by_shard: list[list[list]] = [[] for _ in records]
    for row in rows:
        by_shard[row[1]].append(row)
    tar_paths, index_paths = [], []
    for number, record in enumerate(records):
        tar, idx = folder / record["name"], folder / record["index"]
        try:
            size = tar.stat().st_size
        except OSError as e:
            raise UserError(f"{where}: shard {tar} cannot be read ({e.strerror or e})") from None
        if size != record["bytes"]:
            raise UserError(
                f"{where}: shard {tar} is {size} bytes, the manifest says {record['bytes']} "
                "(truncated or rewritten; make the shards again)"
            )
        _check_index(where, idx, record["name"], by_shard[number])
        tar_paths.append(str(tar))
        index_paths.append(str(idx))
    return tar_paths, index_paths


def index_from_shards(
    root: str | os.PathLike, where: str, class_names: tuple[str, ...] | None = None
) -> ImageIndex:
    """The ImageIndex of a shard folder; each shard is checked at start (present, of its recorded size, its index
    matching the manifest), so a truncated tar or a bad index is a one-line error here, not a failure mid-run.
    class_names: the training split's classes (a val split's labels are mapped to them by name)."""
    folder = manifest_folder(root)
    manifest = fmt.read_manifest(folder)
    names = tuple(manifest["class_names"])
    label_map = list(range(len(names)))
    if class_names is not None:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise UserError(f"{where}: classes not in the training split: {', '.join(unknown[:5])}")
        label_map = [class_names.index(n) for n in names]
    rows = _read_samples(where, folder, manifest, names)
    tar_paths, index_paths = _check_shards(where, folder, manifest["shards"], rows)
    members = tuple(f"{fmt.sample_key(r[0])}.{fmt.image_ext(r[5])}" for r in rows)
    layout = ShardLayout(
        tar_paths=tuple(tar_paths),
        index_paths=tuple(index_paths),
        shard_of=tuple(r[1] for r in rows),
        offsets=tuple(r[2] for r in rows),
        sizes=tuple(r[3] for r in rows),
        members=members,
        tar_sha256=tuple(
            r.get("sha256") if isinstance(r.get("sha256"), str) else None for r in manifest["shards"]
        ),
    )
    return ImageIndex(
        root=folder,
        # DALI's source_info of each sample, so an error that names it names the sample.
        files=tuple(f"{tar_paths[r[1]]}:{r[2]}:{m}" for r, m in zip(rows, members, strict=True)),
        labels=tuple(label_map[r[4]] for r in rows),
        class_names=names if class_names is None else tuple(class_names),
        shards=layout,
    )


def ids_from_source_info(info) -> list[int]:
    """Sample ids from DALI's source_info bytes (one zero-padded row per sample, '<tar>:<offset>:<key>.<ext>')."""
    out = []
    for row in info:
        text = bytes(row).rstrip(b"\0").decode()
        out.append(int(fmt.split_name(text.rsplit(":", 1)[1])[0]))
    return out
