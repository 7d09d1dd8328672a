"""The shard format: tar shards in the WebDataset layout, their DALI index files, and the manifest that names them.

A shard is a plain tar of samples, each two members: `<key>.cls` (the class label as decimal text, WebDataset's
convention) and `<key>.<ext>` (the image file's bytes as they were, `ext` its lower-cased suffix). The key is the
sample's global id, zero-padded: the id training uses for view records, cache rows and quarantine, so a reader gets
the id from the key. Beside each `shard-NNNNNN.tar` sits `shard-NNNNNN.idx`, the index `fn.readers.webdataset`
reads (what DALI's `wds2idx` writes). `manifest.json` names the classes and shards (samples, bytes, sha256 each);
`samples.jsonl` has one line per sample in global id order: [id, shard, offset, size, label, original path], so a
sample's bytes are one `os.pread` away.

ShardLayout is where each sample's bytes lie in its shard, as the manifest's samples.jsonl says.

Members are written with fixed metadata (mode 0644, uid/gid 0, mtime 0, no user names), so the same inputs always
give the same bytes.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dali_kd.data.file_tree import IMAGE_EXTENSIONS
from dali_kd.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SAMPLES_NAME = "samples.jsonl"
# The index layout of DALI's wds2idx (DALI 1.x and 2.x): "v1.2 <num_samples>", then one line per sample of
# "<ext> <data offset> <size> <member name>" for each of its members (tests/test_shard.py checks the text is
# byte-identical to wds2idx's). wds2idx itself is not called: its IndexCreator runs GNU `tar` twice per shard in
# subprocesses (or prints a warning and falls back to tarfile), truncates the index before reading the tar (a
# crash leaves an empty index), and indexes a truncated tar silently (tar's exit status is not read). The writer
# knows each member's offset as it writes it, and a shard made elsewhere is read once with tarfile here anyway to
# refuse a truncated or label-less shard in one line, so the index is those offsets in wds2idx's layout.
INDEX_VERSION = "v1.2"
LABEL_EXT = "cls"
# What a reader passes as the image component's `ext` (DALI takes alternatives separated by ';').
IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
READER_IMAGE_EXT = ";".join(IMAGE_EXTS)
KEY_DIGITS = 9
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
FILE_MODE = 0o644


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".idx")


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


def image_ext(rel_path: str) -> str:
    """The member extension of an image file: its suffix, lower-cased (the decoder reads the format from content)."""
    return os.path.splitext(rel_path)[1].lower().lstrip(".")


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def member_header(name: str, size: int) -> bytes:
    """A ustar header with fixed metadata: nothing of the machine, the user or the time enters a shard."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, FILE_MODE
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def label_bytes(label: int) -> bytes:
    return str(label).encode()


@dataclass(frozen=True)
class Member:
    """One tar member: its name, where its data starts in the tar, and its size in bytes."""

    name: str
    offset: int
    size: int

    @property
    def key(self) -> str:
        return split_name(self.name)[0]

    @property
    def ext(self) -> str:
        return split_name(self.name)[1]


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule (and wds2idx's): the key runs to the first dot of the file name, the rest is the extension."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def sample_members(key: str, ext: str, image_size: int, label: int, start: int) -> tuple[list[Member], int]:
    """The two members of a sample written at byte `start` of a tar, and where the next sample starts."""
    members, pos = [], start
    for name, size in ((f"{key}.{LABEL_EXT}", len(label_bytes(label))), (f"{key}.{ext}", image_size)):
        members.append(Member(name, pos + BLOCK, size))
        pos += BLOCK + padded(size)
    return members, pos


def index_text(samples: list[list[Member]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members) for members in samples]
    return "\n".join(lines) + "\n"


# ---- shards made elsewhere: read the members of a tar ---------------------------------------------------------
def read_members(tar_path: Path) -> list[Member]:
    """The regular-file members of a tar, or a one-line UserError naming the shard if it is truncated or not a tar."""
    try:
        file_size = tar_path.stat().st_size
        members: list[Member] = []
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                if info.isreg():
                    members.append(Member(info.name, info.offset_data, info.size))
            # tarfile stops quietly where the file ends between members: the end-of-archive block must be there.
            end = tar.offset
    except tarfile.ReadError as e:
        if "unexpected end of data" in str(e):
            raise UserError(f"shard {tar_path}: truncated tar (it ends inside a member)") from None
        raise UserError(f"shard {tar_path}: not a readable tar ({e})") from None
    except (EOFError, tarfile.TarError) as e:
        raise UserError(f"shard {tar_path}: truncated or corrupt tar ({e or type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"shard {tar_path}: cannot read it ({e.strerror or e})") from None
    last_end = max((m.offset + padded(m.size) for m in members), default=0)
    if last_end > file_size:
        raise UserError(f"shard {tar_path}: truncated tar (its last member runs past the end of the file)")
    with open(tar_path, "rb") as f:
        f.seek(end)
        if f.read(BLOCK) != b"\0" * BLOCK:
            raise UserError(f"shard {tar_path}: truncated tar (no end-of-archive marker after byte {end})")
    return members


def group_samples(tar_path: Path, members: list[Member]) -> list[list[Member]]:
    """Consecutive members with the same key form a sample (as wds2idx groups them); each needs a label and an
    image member, or a reader would fail on it mid-run."""
    samples: list[list[Member]] = []
    for member in members:
        if not member.key or member.key.endswith("/"):
            continue  # hidden files (".foo"): no sample
        if samples and samples[-1][0].key == member.key:
            samples[-1].append(member)
        else:
            samples.append([member])
    if not samples:
        raise UserError(f"shard {tar_path}: holds no samples")
    for sample in samples:
        exts = {m.ext for m in sample}
        if LABEL_EXT not in exts:
            raise UserError(
                f"shard {tar_path}: sample {sample[0].key} has no .{LABEL_EXT} member (its label)"
            )
        if not exts & set(IMAGE_EXTS):
            raise UserError(
                f"shard {tar_path}: sample {sample[0].key} has no image member (.jpg, .png, ...): "
                f"{', '.join(sorted(exts))}"
            )
    return samples


def index_for_tar(tar_path: Path) -> str:
    """The DALI index of a tar made anywhere (the same text wds2idx writes)."""
    return index_text(group_samples(tar_path, read_members(tar_path)))


# ---- the manifest -----------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a shard folder (`path` is the folder or its manifest.json)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"no shard manifest at {path} (make one with python -m dali_kd.shard SRC OUT)"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a valid manifest (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a valid manifest (not UTF-8 text: byte {e.start})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "dali_kd.shards":
        raise UserError(f"{path}: not a dali_kd shard manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: shard format version {manifest.get('format_version')}, this dali_kd reads {FORMAT_VERSION}"
        )
    check_manifest_fields(path, manifest)
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _field_error(path: Path, field: str, expected: str, value: Any) -> UserError:
    return UserError(f"{path}: field '{field}' must be {expected}, not {json.dumps(value)[:60]}")


def check_manifest_fields(path: Path, manifest: dict[str, Any]) -> None:
    """The fields training reads, of the types it reads them as (a hand-edited manifest is one line, not a
    traceback later)."""
    names = manifest.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _field_error(path, "class_names", "a list of class names", names)
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{path}: field 'class_names' lists {twice!r} twice")
    if not _is_count(manifest.get("num_samples")):
        raise _field_error(path, "num_samples", "a whole number", manifest.get("num_samples"))
    if not isinstance(manifest.get("samples", SAMPLES_NAME), str):
        raise _field_error(path, "samples", "a file name", manifest.get("samples"))
    digest = manifest.get("samples_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise _field_error(path, "samples_sha256", "the sha256 of the samples file (64 hex digits)", digest)
    records = manifest.get("shards")
    if not isinstance(records, list) or not records:
        raise _field_error(path, "shards", "a list of shards", records)
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            raise _field_error(path, f"shards[{k}]", "an object", record)
        for key in ("name", "index"):
            if not isinstance(record.get(key), str) or not record.get(key):
                raise _field_error(path, f"shards[{k}].{key}", "a file name", record.get(key))
        if not _is_count(record.get("bytes")):
            raise _field_error(path, f"shards[{k}].bytes", "a whole number", record.get("bytes"))


@dataclass(frozen=True)
class ShardLayout:
    """Per sample: its shard (a number into tar_paths), the byte offset and size of its image in that tar, and
    its member name. index_paths[k] is tar k's DALI index; `whole` says the samples are the manifest's, all of them
    in id order (so a key is the sample id and the index files on disk describe exactly these samples)."""

    tar_paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    shard_of: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    members: tuple[str, ...]
    whole: bool = True
    tar_sha256: tuple[str | None, ...] = ()  # per tar, as the manifest records it (None: not recorded)
    # Per process (see __getstate__): the open tars and the lock that opens them.
    _fds: dict[int, int] = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_fds", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def __getstate__(
        self,
    ):  # open file descriptors stay with their process (DataLoader workers open their own)
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._fds[shard] = os.open(self.tar_paths[shard], os.O_RDONLY)
        return fd

    def read(self, sample_id: int) -> bytes:
        """The sample's image bytes: one pread at its offset (OSError if the shard cannot be read)."""
        size = self.sizes[sample_id]
        data = os.pread(self._fd(self.shard_of[sample_id]), size, self.offsets[sample_id])
        if len(data) != size:
            raise OSError(0, f"{self.tar_paths[self.shard_of[sample_id]]} ends inside sample {sample_id}")
        return data

    def key(self, sample_id: int) -> str:
        return split_name(self.members[sample_id])[0]

    def where(self, sample_id: int) -> dict[str, str]:
        return {
            "shard": os.path.basename(self.tar_paths[self.shard_of[sample_id]]),
            "key": self.key(sample_id),
        }

    def take(self, keep: list[int]) -> ShardLayout:
        return ShardLayout(
            tar_paths=self.tar_paths,
            index_paths=self.index_paths,
            shard_of=tuple(self.shard_of[i] for i in keep),
            offsets=tuple(self.offsets[i] for i in keep),
            sizes=tuple(self.sizes[i] for i in keep),
            members=tuple(self.members[i] for i in keep),
            whole=self.whole and keep == list(range(len(self.offsets))),
            tar_sha256=self.tar_sha256,
        )

    def index_text(
        self, shard: int, image_of: dict[int, int] | None = None, entry_size: int | None = None
    ) -> str:
        """A DALI index of tar `shard` listing its image members only (in tar order, as the index on disk lists its
        samples, so a reader goes through the same order): image_of maps a sample id to the sample whose bytes its
        entry points at (a stand-in in the same tar); the entry keeps its own member name, hence its id."""
        image_of = image_of or {}
        ids = sorted((i for i, s in enumerate(self.shard_of) if s == shard), key=lambda i: self.offsets[i])
        lines = [f"{INDEX_VERSION} {len(ids)}"]
        for i in ids:
            j = image_of.get(i, i)
            ext = split_name(self.members[i])[1]
            size = self.sizes[j] if entry_size is None else entry_size
            lines.append(f"{ext} {self.offsets[j]} {size} {self.members[i]}")
        return "\n".join(lines) + "\n"
