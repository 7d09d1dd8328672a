"""Atomic file writes: a temporary name in the same folder, fsync, then rename — a reader never sees half a file.

A write that fails for an OS reason (a full disk, a quota, a file-size limit) is a `WriteFailed` user error naming
the file and the reason; the temporary file is removed and the file's previous version, if any, stays as it was.
Files are created with the permissions the user's umask gives (a group may read them where the umask lets it).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dali_kd.errors import UserError

if TYPE_CHECKING:
    import torch


def _read_umask() -> int:
    """The process's umask. Linux shows it in /proc (no change needed to read it); elsewhere it is set and put
    back, once, at import — before any thread of ours could create a file meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() would give a new file
# In every temporary name this process makes: a cleanup removes its own leftovers, never another process's
# write in progress (a host name and pid could repeat across the nodes sharing a filesystem; this does not).
PROCESS_TOKEN = secrets.token_hex(6)


class WriteFailed(UserError):
    """A file could not be written for an OS reason; its previous version (if any) is untouched."""

    def __init__(self, path: Path, reason: str, message: str | None = None):
        super().__init__(message or f"cannot write {path}: {reason}")
        self.path = path
        self.reason = reason


def os_reason(error: BaseException) -> str | None:
    """The OS's reason behind a failed write, lower-case ("no space left on device"), if an OSError caused it.

    Libraries wrap it: torch.save raises RuntimeError("... unexpected pos ...") with the OSError as its context."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.strerror:
            return current.strerror[0].lower() + current.strerror[1:]
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temporary file, fsync it, and move it over `path`; on failure the old file (if any) stays.

    Raises WriteFailed when the OS refuses (full disk, file-size limit, permissions); other errors pass through."""
    path = Path(path)
    existed = path.exists()
    tmp: Path | None = None
    replaced = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.{PROCESS_TOKEN}.", suffix=".tmp", dir=path.parent
        )
        os.close(fd)
        tmp = Path(tmp_name)
        with open(tmp, "wb") as f:  # f.name is the temporary path (a writer may need it)
            os.fchmod(f.fileno(), FILE_MODE)  # mkstemp makes 0600; the result follows the umask like open()
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp, replaced = None, True
        # The rename itself is durable only once the directory entry is.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        reason = os_reason(e) if isinstance(e, Exception) and not isinstance(e, UserError) else None
        if reason is None:
            raise
        kept = "; the previous version is untouched" if existed and not replaced else ""
        raise WriteFailed(path, reason, f"cannot write {path}: {reason}{kept}") from None


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_safetensors_atomic(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    # safetensors refuses shared or non-contiguous storage: give it plain CPU copies. Serialised in memory and
    # written by Python, so a full disk is an OSError with its reason (safetensors' own writer hides it).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda f: f.write(save(tensors)))
