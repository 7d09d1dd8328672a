"""Step checkpoints: atomic files in <run>/checkpoints/, keep-last-K, and the identity checks that guard a resume.

A checkpoint is written under a temporary name, fsynced and renamed, so a file named step_*.pt is always complete;
an interrupted write leaves only a temporary file, which is never loaded and is removed when a run next claims
the run directory.
Loading uses torch.load(weights_only=True): the file holds tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from dali_kd.config import Config, key_default
from dali_kd.errors import UserError
from dali_kd.identity import config_fingerprint, config_hash
from dali_kd.io import PROCESS_TOKEN, WriteFailed, atomic_write

CHECKPOINT_RE = re.compile(r"^step_(\d{9})\.pt$")
# 2: timm's optimizer parameter groups and scheduler state, the student's EMA (issue 15). A format-1 checkpoint's
# optimizer groups do not line up with format 2's, so it is refused by name rather than half loaded.
FORMAT_VERSION = 2


# ---- RNG states as weights_only-loadable values ---------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(
        np_state, tuple
    )  # legacy=True: the MT19937 tuple (numpy's stubs type the default as a dict)
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(state: dict[str, Any], f: BinaryIO) -> None:
    """torch.save to the open temporary file's path: torch's own C++ writer, no Python call per record. That writer
    reports a refused write only as "unexpected pos"; one more block written here makes the OS say why (ENOSPC,
    EFBIG, EDQUOT), as an OSError whose context is torch's error. The temporary file is removed either way."""
    try:
        torch.save(state, f.name)
    except RuntimeError:
        f.seek(0, os.SEEK_END)
        f.write(bytes(1 << 16))
        f.flush()
        raise  # the disk had room: not an OS refusal


# ---- files ----------------------------------------------------------------------------------------------------
class CheckpointDir:
    def __init__(self, run_dir: Path, keep_last: int):
        self.path = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if CHECKPOINT_RE.match(p.name))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.path / f"step_{step:09d}.pt"
        try:
            atomic_write(path, lambda f: _torch_save(state, f))
        except WriteFailed as e:
            raise UserError(
                f"cannot write checkpoint {path}: {e.reason}; earlier checkpoints are untouched"
            ) from None
        for old in self.complete()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        # This process's own leftovers only: a temporary file of another process may be a write in progress.
        for tmp in self.path.glob(f".step_*.{PROCESS_TOKEN}.*.tmp"):
            tmp.unlink(missing_ok=True)
        return path

    def remove_leftovers(self) -> None:
        """Remove every half-written checkpoint: only for the run that holds the run directory (dali_kd.runs.directory),
        when whoever left them has ended."""
        for tmp in self.path.glob(".step_*.tmp") if self.path.is_dir() else ():
            tmp.unlink(missing_ok=True)


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why torch.load refused a file, in the user's terms. PyTorch's own text for a foreign pickle advises
    weights_only=False: unsafe (it runs code from the file), and no help here, so it is never repeated."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return f"{size} bytes that are not tensors and plain values"
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return first[:200]


def load(path: Path) -> dict[str, Any]:
    not_ours = f"--resume: {path} is not a dali_kd checkpoint, or it is damaged"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--resume: checkpoint not found: {path}") from None
    except OSError as e:
        raise UserError(f"--resume: cannot read checkpoint {path}: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is the user's to fix
        raise UserError(f"{not_ours} ({_why_unreadable(path, e)})") from None
    version = state.get("format") if isinstance(state, dict) else None
    if isinstance(version, int) and 0 < version < FORMAT_VERSION:
        raise UserError(
            f"--resume: {path} was written by an earlier dali_kd (checkpoint format {version}, this one reads "
            f"{FORMAT_VERSION}: the optimizer's parameter groups and the schedule changed); start a fresh run, "
            "or finish this one with the dali_kd that wrote it"
        )
    if version != FORMAT_VERSION:
        raise UserError(f"{not_ours} (no dali_kd format {FORMAT_VERSION} header)")
    return state


def data_change(saved: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """How the training file list differs from the checkpoint's, in words; None if it is the same (or a checkpoint
    from before file lists were stored)."""
    if saved is None or (saved["count"] == now["count"] and saved["hash"] == now["hash"]):
        return None
    then_digests, now_digests = saved["digests"].numpy(), now["digests"].numpy()
    added = len(np.setdiff1d(now_digests, then_digests))
    removed = len(np.setdiff1d(then_digests, now_digests))
    how = f"{added} added, {removed} removed" if added or removed else "the same files in another order"
    return f"the data changed since the checkpoint: {saved['count']} files then, {now['count']} now ({how})"


def config_changes(state: dict[str, Any], cfg: Config) -> list[str]:
    """The dotted keys whose value differs from the checkpoint's config, sorted.

    A key the checkpoint's config lacks (a newer dali_kd added it) counts as changed only when it is set away from
    its default: upgrading dali_kd in the middle of a run must not make the run's own checkpoints unresumable."""
    if state["config_hash"] == config_hash(cfg):
        return []
    saved, now = state["config_fingerprint"], config_fingerprint(cfg)
    missing = object()
    return sorted(
        key
        for key in set(saved) | set(now)
        if saved.get(key, missing) != now.get(key, missing)
        and not (key not in saved and key_default(key) == now[key])
    )


TeacherIdentity = dict[str, str] | list[dict[str, str]]


def teacher_change(saved: TeacherIdentity, now: TeacherIdentity, cfg: Config) -> str | None:
    """How this run's teachers differ from the checkpoint's, in words (None: the same). One teacher's identity is
    its id; several teachers' a list of them, in config order."""
    if saved == now:
        return None
    if isinstance(saved, dict) and isinstance(now, dict):
        return (
            f"the checkpoint was trained with teacher {saved['name']} (weights {saved['weights_hash']}), this run "
            f"has {now['name']} (weights {now['weights_hash']})"
        )
    then = [saved] if isinstance(saved, dict) else saved
    here = [now] if isinstance(now, dict) else now
    names = ", ".join(t["name"] for t in then)
    if len(then) != len(here):
        return f"the checkpoint was trained with {len(then)} teacher(s) ({names}), this run has {len(here)}"
    index = next(i for i, (a, b) in enumerate(zip(then, here, strict=True)) if a != b)
    return (
        f"{cfg.model.teacher_where(index)} differs from the checkpoint's teacher {then[index]['name']} "
        f"(weights {then[index]['weights_hash']} then, {here[index]['weights_hash']} now; its teachers: {names})"
    )


def check_compatible(
    state: dict[str, Any],
    cfg: Config,
    teacher_id: dict[str, str] | list[dict[str, str]],
    world_size: int,
    path: Path,
    allow_change: bool = False,
    data_files: dict[str, Any] | None = None,
) -> list[str]:
    """Refuse a resume that would silently train something else; the messages say how to override.

    data_files: this run's `data_identity` of the training files. Returns the warnings of an allowed change."""
    if state["world_size"] != world_size:
        raise UserError(
            f"--resume {path}: saved by {state['world_size']} process(es), this run has {world_size}: "
            "each rank's data-stream position cannot be carried over"
        )
    changed_data = data_change(state.get("data_files"), data_files) if data_files is not None else None
    if allow_change:
        if changed_data is None:
            return []
        return [
            f"{changed_data}; resuming anyway (--allow-config-change): the stream position is approximate"
        ]
    changed_teacher = teacher_change(state["teacher"], teacher_id, cfg)
    if changed_teacher is not None:
        raise UserError(f"--resume {path}: {changed_teacher}; pass --allow-config-change to resume anyway")
    changed = config_changes(state, cfg)
    if changed:
        raise UserError(
            f"--resume {path}: the config differs from the checkpoint's in {', '.join(changed[:5])}; "
            "pass --allow-config-change to resume anyway"
        )
    if changed_data is not None:
        # The same rule as a changed data.root: the stream position would point into another list.
        raise UserError(
            f"--resume {path}: {changed_data}; pass --allow-config-change to resume anyway, the stream position "
            "is then approximate"
        )
    return []
