"""Which run directory a run writes, and the claim that keeps it the run's own while it lives.

A run claims its directory before any work: a new one is created exclusively (two runs started in the same second
get `-2`, `-3`), and a lock file inside it is held (flock) for the whole run, so a second run given the same
directory is refused at once instead of writing into it. The kernel drops the lock when the process ends, however
it ends (SIGKILL included), so a requeued or resumed run takes its directory back.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime
from pathlib import Path

from dali_kd.config import Config
from dali_kd.errors import UserError
from dali_kd.io import FILE_MODE

LOCK_NAME = ".run.lock"


class RunDirClaim:
    """This process's hold on a run directory; `release()` when the run ends."""

    def __init__(self, path: Path, fd: int, created: list[Path]):
        self.path = path
        self._fd: int | None = fd
        self._created = created  # folders this claim made, outermost first

    def release(self) -> None:
        """Let the directory go; the folders the claim made are removed again if the run wrote nothing there."""
        if self._fd is None:
            return
        # Unlinked while still locked: a run waiting on this file sees it replaced and locks the new one.
        (self.path / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        _remove_empty(self._created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # something is in it: the run's files, or another run's directory


def _make_parents(folder: Path) -> list[Path]:
    """Create folder and its missing parents; the ones this call made, outermost first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            continue  # another run made it meanwhile
        except OSError as e:
            _remove_empty(created)
            raise UserError(f"train.output_dir: cannot create {path}: {e.strerror}") from None
    return created


def _lock(run_dir: Path) -> int:
    """An open, flock-ed lock file in run_dir; a UserError if another live process holds it."""
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a live process"
            os.close(fd)
            raise UserError(
                f"run directory {run_dir} is in use by another run ({holder}): let it finish, or choose "
                "another train.run_name"
            ) from None
        except OSError:
            # A filesystem without locks (some NFS and Lustre mounts): a new directory's exclusive mkdir still holds.
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the run that held it ended and removed it: lock the file that is there now
    os.ftruncate(fd, 0)
    since = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}".encode())
    return fd


def claim(run_dir: Path) -> RunDirClaim:
    """Take run_dir for this run (created if missing); a UserError if another run holds it or it cannot be made."""
    held = _claim(run_dir, new=False)
    assert held is not None
    return held


def _claim(run_dir: Path, new: bool) -> RunDirClaim | None:
    """new: only a directory that does not exist yet (None if it does)."""
    from dali_kd.runs.checkpoint import CheckpointDir

    created = _make_parents(run_dir.parent)
    try:
        run_dir.mkdir()
        created.append(run_dir)
    except FileExistsError:
        if new:
            _remove_empty(created)
            return None
    except OSError as e:
        _remove_empty(created)
        raise UserError(f"train.output_dir: cannot create run directory {run_dir}: {e.strerror}") from None
    try:
        fd = _lock(run_dir)
    except BaseException:
        _remove_empty(created)
        raise
    # Held by this run alone now: temporary files there are what killed writes of earlier runs left.
    CheckpointDir(run_dir, 1).remove_leftovers()
    return RunDirClaim(run_dir, fd, created)


def claim_unused(output_dir: Path, name: str) -> RunDirClaim:
    """output_dir/name, or name-2, name-3, ... if that exists: a new run never shares another's directory."""
    number = 1
    while True:
        run_dir = output_dir / (name if number == 1 else f"{name}-{number}")
        if (held := _claim(run_dir, new=True)) is not None:
            return held
        number += 1


def _newest_run_with_checkpoints(output_dir: Path) -> Path | None:
    from dali_kd.runs.checkpoint import CheckpointDir

    newest, newest_mtime = None, -1.0
    for run_dir in output_dir.iterdir() if output_dir.is_dir() else ():
        latest = CheckpointDir(run_dir, 1).latest() if run_dir.is_dir() else None
        if latest is not None and latest.stat().st_mtime > newest_mtime:
            newest, newest_mtime = run_dir, latest.stat().st_mtime
    return newest


def existing_run_files(run_dir: Path) -> list[str]:
    """What a run has left in run_dir (complete checkpoints, metrics, summary); empty for a new directory."""
    from dali_kd.runs.checkpoint import CheckpointDir

    found = ["checkpoints"] if CheckpointDir(run_dir, 1).latest() is not None else []
    return found + [name for name in ("metrics.jsonl", "summary.json") if (run_dir / name).exists()]


def choose_run(cfg: Config, resume: str) -> tuple[RunDirClaim, Path | None]:
    """(the claimed run directory, checkpoint to resume from). A resumed run continues its own run directory; a
    fresh run never writes into another run's (checkpoints would be mixed, and --resume auto would pick the old)."""
    from dali_kd.runs.checkpoint import CheckpointDir
    from dali_kd.runs.preemption import slurm_job_id

    output_dir = Path(cfg.train.output_dir).expanduser()
    new_name = f"{cfg.model.student.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if resume not in ("auto", "none"):
        path = Path(resume).expanduser()
        if not path.is_file():
            raise UserError(f"--resume: checkpoint not found: {path}")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        if cfg.train.run_name:
            run_dir = output_dir / cfg.train.run_name
        return (claim(run_dir) if run_dir else claim_unused(output_dir, new_name)), path
    if cfg.train.run_name:
        run_dir = output_dir / cfg.train.run_name
    elif slurm_job_id():
        # A requeued job keeps its id, so it finds its own run directory again.
        run_dir = output_dir / f"{cfg.model.student.name}-slurm{slurm_job_id()}"
    elif resume == "auto" and (found := _newest_run_with_checkpoints(output_dir)) is not None:
        run_dir = found
    else:
        return claim_unused(output_dir, new_name), None
    held = claim(run_dir)
    if resume == "auto":
        return held, CheckpointDir(run_dir, 1).latest()
    if left := existing_run_files(run_dir):
        held.release()
        raise UserError(
            f"run directory {run_dir} already holds a run ({', '.join(left)}): resume it with --resume auto, "
            "or choose another train.run_name"
        )
    return held, None


def check_writable(output_dir: Path) -> None:
    """Fail before any work if the run directory could not be created (the nearest existing folder decides)."""
    existing = output_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"train.output_dir: {existing} is not a directory, so {output_dir} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir: {existing} is not writable, so {output_dir} cannot be created")
