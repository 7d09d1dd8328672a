"""The image index: an ImageFolder tree (or a file list) turned into sorted paths, labels and sample ids."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dali_kd.data.sampling import shard_bounds
from dali_kd.errors import UserError

# Extensions DALI's image decoder handles; anything else in a class folder is not an image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pnm", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageIndex:
    """files[i] has class labels[i]; i is the sample id. Classes are the sorted sub-folder names."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, class_names: tuple[str, ...] | None = None) -> ImageIndex:
        """Index root/<class>/**/<image>. Pass class_names (from the train split) to index a val split."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"data folder not found: {root}")
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if class_names is None:
            class_names = tuple(found)
        else:
            unknown = sorted(set(found) - set(class_names))
            if unknown:
                raise UserError(f"{root}: class folders not in the training split: {', '.join(unknown[:5])}")
        if not class_names:
            raise UserError(f"{root}: no class sub-folders (expected root/<class>/<image>.jpg)")
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(class_names):
            class_dir = root / name
            if not class_dir.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.path.join(dirpath, fn))
                        labels.append(label)
        if not files:
            raise UserError(f"{root}: no images found under its class folders")
        return cls(root=root, files=tuple(files), labels=tuple(labels), class_names=tuple(class_names))

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
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"data folder not found: {root}")
        names = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
        if not names:
            raise UserError(f"{root}: no class sub-folders (expected root/<class>/<image>.jpg)")
        return names

    def shard(self, shard_id: int, num_shards: int) -> ImageIndex:
        """The contiguous block [r*N//n, (r+1)*N//n) of the files, as DALI's readers shard."""
        begin, end = shard_bounds(self.num_samples, shard_id, num_shards)
        return ImageIndex(self.root, self.files[begin:end], self.labels[begin:end], self.class_names)

    def subset(self, max_samples: int | None) -> ImageIndex:
        """At most max_samples files, evenly spread over the index (so every class stays represented)."""
        if max_samples is None or max_samples >= self.num_samples:
            return self
        step = self.num_samples / max_samples
        keep = [int(i * step) for i in range(max_samples)]
        return ImageIndex(
            root=self.root,
            files=tuple(self.files[i] for i in keep),
            labels=tuple(self.labels[i] for i in keep),
            class_names=self.class_names,
        )
