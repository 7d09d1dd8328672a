"""The image index: an ImageFolder tree (or a file list) turned into sorted paths, labels and sample ids."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dali_kd import console
from dali_kd.data.file_tree import IMAGE_EXTENSIONS, class_folder_names, data_folder, list_tree
from dali_kd.data.sampling import share_bounds
from dali_kd.errors import UserError

if TYPE_CHECKING:
    from dali_kd.data.shards import ShardLayout


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
            console.warning(f"warning: {note}")
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
        names = class_folder_names(root)
        if not names:
            raise UserError(f"{root}: no class sub-folders (expected root/<class>/<image>.jpg)")
        return names

    def share(self, rank: int, world_size: int) -> ImageIndex:
        """The contiguous block [r*N//n, (r+1)*N//n) of the files, as DALI's readers shard."""
        begin, end = share_bounds(self.num_samples, rank, world_size)
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
