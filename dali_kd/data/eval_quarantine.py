"""Evaluation's quarantine: the k-NN bank and the held-out images skip the files set aside, and a file that fails to
decode in an evaluation pass is set aside there (named in one line and recorded), so a broken file never ends a run.

Training replaces a set-aside image by a same-class stand-in to keep its step count; evaluation has no count to keep,
so it leaves the file out. The pass goes on from the failing batch with the rest of its images; the batches it gave
before stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from dali_kd import console
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.recovery import PATH_RE
from dali_kd.errors import TrainingStopped

# Batches after the one that failed whose files are checked first (DALI decodes a few batches ahead).
LOOK_AHEAD_BATCHES = 4


def decode_failure(index: ImageIndex, sample_id: int, backend: str) -> str | None:
    """Why the sample cannot be evaluated (unreadable, fails the scan's check, or the backend cannot decode it), or
    None where it decodes."""
    from dali_kd.data.file_checks import Reject, check_data, dali_decode_check

    try:
        data = index.read_bytes(sample_id)
        check_data(data, max_pixels=1 << 62)
        if backend == "dali":
            dali_decode_check(data)
        else:
            from dali_kd.data.pil_views import decode_rgb

            decode_rgb(index.image_file(sample_id))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except Reject as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - whatever PIL raises on a file it cannot decode
        return f"{type(e).__name__}: {e}"[:200]
    return None


class EvalQuarantine:
    """The samples of one evaluation split (`split`: "train" for the k-NN bank, "val") left out of its passes.

    skip_files: the files of this split set aside elsewhere (the training stream's), asked before each pass.
    """

    def __init__(self, split: str, index: ImageIndex, backend: str, max_files: int):
        self.split = split
        self.index = index
        self.backend = backend
        self.max_files = max_files
        self.set_aside: dict[int, str] = {}  # sample id -> why, for the ones this quarantine found
        self.entries: list[dict[str, str]] = []  # new since the last take_entries()
        self.skip_files: Callable[[], Iterable[str]] = tuple

    def usable(self) -> list[int]:
        """The sample ids a pass reads: not set aside here, nor by training."""
        skipped = set(self.skip_files())
        return [
            i for i, path in enumerate(self.index.files) if i not in self.set_aside and path not in skipped
        ]

    def batches(
        self, make_batches: Callable[[ImageIndex], Iterator[Batch]], batch_size: int
    ) -> Iterator[Batch]:
        """One pass over the usable samples in order: make_batches(index) reads a whole index; after a decode error
        the failing samples are set aside and the pass goes on from the failing batch with the rest."""
        todo = self.usable()
        if not todo:
            raise TrainingStopped(f"evaluation: every {self.split} image of this process was set aside")
        while todo:
            done = 0
            try:
                for batch in make_batches(self.index.take(todo)):
                    done += len(batch)
                    yield batch
                return
            except (RuntimeError, OSError) as e:
                self._set_aside_culprits(str(e), todo[done:], batch_size)
            todo = [i for i in todo[done:] if i not in self.set_aside]

    def _set_aside_culprits(self, error: str, rest: list[int], batch_size: int) -> None:
        """Set aside the files the error is about: named in it, else among the next few batches those that fail a
        check, else among all the pass's remaining samples; none found stops the run with the error's line."""
        first_line = next((ln.strip() for ln in error.splitlines() if "fail" in ln.lower()), error[:200])
        named = set(PATH_RE.findall(error))
        bad = {i: first_line[:200] for i in rest if self.index.files[i] in named}
        for candidates in (rest[: LOOK_AHEAD_BATCHES * batch_size], rest):
            if bad:
                break
            for i in candidates:
                if (why := decode_failure(self.index, i, self.backend)) is not None:
                    bad[i] = why
        if not bad:
            raise TrainingStopped(
                f"evaluation ({self.split}): decoding failed and the file could not be identified: {first_line[:300]}"
            )
        for i, why in bad.items():
            self._add(i, why)

    def _add(self, sample_id: int, reason: str) -> None:
        path = self.index.files[sample_id]
        if len(self.set_aside) >= self.max_files:
            raise TrainingStopped(
                f"more than data.max_runtime_quarantine={self.max_files} {self.split} files failed to decode in "
                f"evaluation (last: {path}); run `python -m dali_kd.scan --full` on the data"
            )
        self.set_aside[sample_id] = reason
        console.warning(f"data: set aside {path} ({self.split} split): it failed to decode in evaluation ({reason}); "
                        "evaluating without it")  # fmt: skip
        self.entries.append(
            {
                "split": self.split,
                **self.index.where(sample_id),
                "reason": f"decode failed during evaluation: {reason}",
                "found": "evaluation",
            }
        )

    def take_entries(self) -> list[dict[str, str]]:
        entries, self.entries = self.entries, []
        return entries
