"""The image index: an ImageFolder tree (or a file list) turned into sorted paths, labels and sample ids."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dali_kd.data.sampling import shard_bounds
from dali_kd.errors import UserError

if TYPE_CHECKING:
    from dali_kd.data.shard_index import ShardLayout

# Extensions DALI's image decoder handles; anything else in a class folder is not an image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pnm", ".ppm", ".pgm")


def data_folder(root: str | os.PathLike) -> Path:
    """root as a Path, or a UserError saying why it cannot be an ImageFolder root."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"data folder is not a directory: {root}")
    return root


def _dir_key(path: str) -> tuple[int, int] | None:
    """The identity of the directory a path leads to (links followed), or None if it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class TreeListing:
    """What walking an ImageFolder tree found: files (relative to root, walk order) with their class labels, and
    one line per folder not followed (a symlink loop, or a folder reached twice) or not readable."""

    class_names: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    notes: tuple[str, ...]


class _TreeWalk:
    """One walk over root's class folders, links followed, where every real directory is entered once (by its
    (st_dev, st_ino)) and every real file is listed once (by its resolved path).

    Following links blindly never ends on a loop (`class_0/back -> ..`): os.walk(followlinks=True) listed every
    file ~41 times at paths 80 levels deep and then grew without bound. A link to a folder or file outside the root
    is followed as before."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.real_root = os.path.realpath(root)
        # Directory identity (st_dev, st_ino) -> the path it was first entered by.
        self.entered: dict[tuple[int, int], str] = {}
        key = _dir_key(self.root)
        if key is not None:
            self.entered[key] = self.root
        self.notes: list[str] = []

    def _scandir(self, path: str) -> list[os.DirEntry]:
        try:
            with os.scandir(path) as entries:
                return sorted(entries, key=lambda e: e.name)
        except OSError as e:
            self.notes.append(f"data: cannot list {path} ({e.strerror}): skipped")
            return []

    def enter(self, entry: os.DirEntry) -> bool:
        """Whether to walk this sub-folder: not if its directory was entered already (then one line says why)."""
        key = _dir_key(entry.path)
        if key is None:
            return False
        first = self.entered.get(key)
        if first is None:
            self.entered[key] = entry.path
            return True
        if _is_inside(entry.path, first):
            self.notes.append(f"data: {entry.path} links back to {first} (a symlink loop): not followed")
        else:
            self.notes.append(f"data: {entry.path} leads to {first}, which is listed already: not followed")
        return False

    def class_dirs(self) -> list[os.DirEntry]:
        """root's class sub-folders (sorted, hidden ones skipped); a folder that is the root again is not one."""
        found = []
        for entry in self._scandir(self.root):
            if not entry.name.startswith(".") and _entry_is_dir(entry) and self.enter(entry):
                found.append(entry)
        return found

    def files(self, class_dir: os.DirEntry, keep: Callable[[str], bool]) -> list[tuple[str, str, bool]]:
        """(path, resolved path, reached through a link) of the kept files under class_dir, in os.walk's order
        (top-down, names sorted)."""
        out = []
        via_link = class_dir.is_symlink()
        real = os.path.realpath(class_dir.path) if via_link else os.path.join(self.real_root, class_dir.name)
        stack = [(class_dir.path, real, via_link)]
        while stack:
            path, real, via_link = stack.pop()
            subdirs = []
            for entry in self._scandir(path):
                link = entry.is_symlink()
                # Only links need resolving (once each): a plain entry's real path is its folder's plus its name.
                entry_real = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
                if _entry_is_dir(entry):
                    if not entry.name.startswith(".") and self.enter(entry):
                        subdirs.append((entry.path, entry_real, via_link or link))
                elif keep(entry.name):
                    out.append((entry.path, entry_real, via_link or link))
            stack.extend(reversed(subdirs))
        return out


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling or looping link is a file (the scan sets it aside)
    except OSError:
        return False


def list_tree(
    root: str | os.PathLike, keep: Callable[[str], bool], class_names: tuple[str, ...] | None = None
) -> TreeListing:
    """The files under root/<class>/ (any depth) whose names `keep` accepts. class_names: only these classes
    (labels in this order; default: every class folder, sorted). Links are followed, loops are not (see _TreeWalk);
    a file reached twice (a link to a listed file) is listed once, at its own path if it is in the tree."""
    root = data_folder(root)
    walk = _TreeWalk(root)
    class_dirs = {entry.name: entry for entry in walk.class_dirs()}
    names = tuple(sorted(class_dirs)) if class_names is None else tuple(class_names)
    listed: list[tuple[int, str, bool] | None] = []
    where: dict[str, int] = {}  # resolved path -> its position in listed
    duplicates: list[tuple[str, str]] = []
    for label, name in enumerate(names):
        if name not in class_dirs:
            continue
        for path, real, via_link in walk.files(class_dirs[name], keep):
            rel = os.path.relpath(path, root)
            at = where.get(real)
            if at is not None:
                first = listed[at]
                assert first is not None  # `where` points at listed entries only
                if first[2] and not via_link:  # the file's own place in the tree wins over a link to it
                    duplicates.append((first[1], rel))
                    listed[at] = None
                else:
                    duplicates.append((rel, first[1]))
                    continue
            where[real] = len(listed)
            listed.append((label, rel, via_link))
    kept = [entry for entry in listed if entry is not None]
    notes = walk.notes
    if duplicates:
        notes.append(
            f"data: {len(duplicates)} file(s) under {root} reached twice through links (e.g. {duplicates[0][0]} is "
            f"{duplicates[0][1]}): each listed once"
        )
    return TreeListing(
        class_names=names,
        files=tuple(rel for _, rel, _ in kept),
        labels=tuple(label for label, _, _ in kept),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class ImageIndex:
    """files[i] has class labels[i]; i is the sample id. Classes are the sorted sub-folder names.

    Where a sample's bytes come from: the file files[i], or (data.format shards) a byte range of a tar shard, which
    `shards` holds; then files[i] names the sample as DALI's webdataset reader does ("<tar>:<offset>:<member>").
    Read bytes through read_bytes / image_file and both formats read alike."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    shards: ShardLayout | None = None

    def read_bytes(self, sample_id: int) -> bytes:
        """The sample's encoded image (OSError if it cannot be read): the file, or one pread from its shard."""
        if self.shards is not None:
            return self.shards.read(sample_id)
        with open(self.files[sample_id], "rb") as f:
            return f.read()

    def image_file(self, sample_id: int) -> str | BinaryIO:
        """What PIL opens: the file's path, or the sample's bytes from its shard."""
        return self.files[sample_id] if self.shards is None else io.BytesIO(self.read_bytes(sample_id))

    def can_stand_in(self, sample_id: int, other: int) -> bool:
        """Whether `other` may be read in sample_id's slot: any image (folder), one of the same tar (shards: DALI's
        reader reads a slot's bytes from its own tar)."""
        return self.shards is None or self.shards.shard_of[sample_id] == self.shards.shard_of[other]

    def where(self, sample_id: int) -> dict[str, str]:
        """The quarantine entry's fields naming the sample: its path, and in shards also its shard and key."""
        if self.shards is None:
            return {"path": self.files[sample_id]}
        return {"path": self.files[sample_id], **self.shards.where(sample_id)}

    @property
    def num_samples(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, class_names: tuple[str, ...] | None = None) -> ImageIndex:
        """Index root/<class>/**/<image>. Pass class_names (from the train split) to index a val split.
        Folders not followed (symlink loops) are reported as warnings, one line each."""
        root = data_folder(root)
        listing = list_tree(root, lambda name: name.lower().endswith(IMAGE_EXTENSIONS), class_names)
        for note in listing.notes:
            warnings.warn(note, stacklevel=2)
        if class_names is not None:
            unknown = sorted(set(cls.class_folders(root)) - set(class_names))
            if unknown:
                raise UserError(f"{root}: class folders not in the training split: {', '.join(unknown[:5])}")
        if not listing.class_names:
            raise UserError(f"{root}: no class sub-folders (expected root/<class>/<image>.jpg)")
        if not listing.files:
            raise UserError(f"{root}: no images found under its class folders")
        return cls(
            root=root,
            files=tuple(os.path.join(root, rel) for rel in listing.files),
            labels=listing.labels,
            class_names=listing.class_names,
        )

    @classmethod
    def from_paths(
        cls,
        root: Path,
        rel_paths: list[str],
        class_names: tuple[str, ...],
        where: str,
        required: tuple[str, ...] | None = None,
    ) -> ImageIndex:
        """Index <class>/.../<image> paths relative to root; each `required` class (default: all) keeps an image."""
        label_of = {name: i for i, name in enumerate(class_names)}
        entries = []
        for rel in rel_paths:
            name = Path(rel).parts[0]
            if name not in label_of:
                raise UserError(
                    f"{where}: class '{name}' of {rel} is not among the classes {', '.join(class_names[:5])}"
                )
            entries.append((label_of[name], rel))
        entries.sort()
        empty = sorted(
            set(class_names if required is None else required) - {class_names[lb] for lb, _ in entries}
        )
        if empty:
            raise UserError(f"{where}: class folder(s) without usable images: {', '.join(empty[:5])}")
        return cls(
            root=root,
            files=tuple(str(root / rel) for _, rel in entries),
            labels=tuple(label for label, _ in entries),
            class_names=tuple(class_names),
        )

    @staticmethod
    def read_file_list(list_path: Path, root: Path) -> list[str]:
        """Paths from a file list (one per line, relative to root; empty lines and '#' comments skipped)."""
        try:
            lines = list_path.read_text().splitlines()
        except OSError as e:
            raise UserError(f"data.file_list: cannot read {list_path}: {e.strerror}") from None
        paths = []
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = Path(line).parts
            if len(parts) < 2 or Path(line).is_absolute() or ".." in parts:
                raise UserError(f"{list_path}:{number}: expected a path <class>/<image> relative to {root}")
            paths.append(line)
        if not paths:
            raise UserError(f"{list_path}: lists no images")
        return paths

    @classmethod
    def from_file_list(
        cls, root: str | os.PathLike, file_list: str | os.PathLike, class_names: tuple[str, ...] | None = None
    ) -> ImageIndex:
        """Index the files named in file_list (one <class>/.../<image> path per line, relative to root)."""
        root, list_path = Path(root).expanduser(), Path(file_list).expanduser()
        paths = cls.read_file_list(list_path, root)
        if class_names is None:
            class_names = tuple(sorted({Path(p).parts[0] for p in paths}))
        return cls.from_paths(root, paths, class_names, str(list_path))

    @classmethod
    def from_config(
        cls, root: str, file_list: str | None, class_names: tuple[str, ...] | None = None
    ) -> ImageIndex:
        """The index a data config describes: a file list under root when given, else the whole folder tree."""
        if file_list:
            return cls.from_file_list(root, file_list, class_names)
        return cls.from_folder(root, class_names)

    @staticmethod
    def class_folders(root: str | os.PathLike) -> tuple[str, ...]:
        """The sorted class sub-folder names of an ImageFolder root (ImageFolder's label order)."""
        root = data_folder(root)
        names = tuple(sorted(entry.name for entry in _TreeWalk(root).class_dirs()))
        if not names:
            raise UserError(f"{root}: no class sub-folders (expected root/<class>/<image>.jpg)")
        return names

    def shard(self, shard_id: int, num_shards: int) -> ImageIndex:
        """The contiguous block [r*N//n, (r+1)*N//n) of the files, as DALI's readers shard."""
        begin, end = shard_bounds(self.num_samples, shard_id, num_shards)
        return self.take(list(range(begin, end)))

    def take(self, keep: list[int]) -> ImageIndex:
        """The samples `keep`, renumbered 0..len(keep)-1 in this order."""
        return ImageIndex(
            root=self.root,
            files=tuple(self.files[i] for i in keep),
            labels=tuple(self.labels[i] for i in keep),
            class_names=self.class_names,
            shards=None if self.shards is None else self.shards.take(keep),
        )

    def subset(self, max_samples: int | None) -> ImageIndex:
        """At most max_samples files, evenly spread over the index (so every class stays represented)."""
        if max_samples is None or max_samples >= self.num_samples:
            return self
        step = self.num_samples / max_samples
        return self.take([int(i * step) for i in range(max_samples)])
