"""Walking an ImageFolder tree: its class folders and image files, sorted, with the folders it could not follow."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dali_kd.errors import UserError

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


def class_folder_names(root: Path) -> tuple[str, ...]:
    """The sorted names of root's class sub-folders, found as list_tree finds them."""
    return tuple(sorted(entry.name for entry in _TreeWalk(root).class_dirs()))
