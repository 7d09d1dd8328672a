"""Tar shards changed in place during a run: noticed by their status, and the samples that went bad set aside.

A member overwritten in place keeps the tar's size, and its time can be put back, but not its change time (ctime),
which only the kernel sets. DALI's decoders take much damage without an error (a JPEG whose data is zeros or noise
decodes, with at most an unnamed "Corrupt JPEG data" line on stderr), so waiting for a decode error would train on
it. Instead the stream looks at the status of the tars its batch came from before handing the batch on: one stat
per tar. A tar whose status moved is hashed; if its bytes are no longer the ones last seen, each sample of it is
checked (the scan's header check and DALI's CPU decode) and those that fail are set aside like a file that failed
to decode, named `<tar>:<offset>:<key>`. A tar whose bytes changed but whose samples all pass stops the run:
damage that no check can place must not be trained on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dali_kd.data.recovery import RuntimeQuarantine
from dali_kd.data.shard_rerun import file_sha256
from dali_kd.data.shards import ShardLayout
from dali_kd.errors import TrainingStopped

TarStatus = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


def tar_status(path: str) -> TarStatus:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class ShardWatch:
    """The status and bytes (sha256) of each tar as last seen; `spoilt` sets aside what went bad since."""

    def __init__(self, layout: ShardLayout, quarantine: RuntimeQuarantine):
        self.layout = layout
        self.quarantine = quarantine
        self._seen = [tar_status(path) for path in layout.tar_paths]
        recorded = layout.tar_sha256 or (None,) * len(layout.tar_paths)
        self._sha256: list[str | None] = list(recorded)

    def spoilt(self, sample_ids: Iterable[int]) -> list[int]:
        """The samples set aside because a tar that these samples come from changed in place since last seen."""
        bad: list[int] = []
        for tar in sorted({self.layout.shard_of[int(i)] for i in sample_ids}):
            path = self.layout.tar_paths[tar]
            try:
                status = tar_status(path)
            except OSError as e:
                raise TrainingStopped(f"shard {path} cannot be read any more ({e.strerror or e})") from None
            if status != self._seen[tar]:
                self._seen[tar] = status
                bad += self._check(tar)
        return bad

    def _check(self, tar: int) -> list[int]:
        path = self.layout.tar_paths[tar]
        sha256 = file_sha256(Path(path))
        if sha256 is None:
            raise TrainingStopped(f"shard {path} cannot be read any more")
        if sha256 == self._sha256[tar]:
            return []  # touched, not changed
        known, self._sha256[tar] = self._sha256[tar], sha256
        bad = []
        for i, shard in enumerate(self.layout.shard_of):
            if shard == tar and not self.quarantine.is_set_aside(i):
                reason = self.quarantine.check_reason(i)
                if reason is not None:
                    self.quarantine.add(i, f"{os.path.basename(path)} changed during the run: {reason}")
                    bad.append(i)
        if not bad and known is not None:
            raise TrainingStopped(
                f"shard {path} changed during the run (its bytes are not the ones it was made with) and no sample of it "
                "fails a check, so the damage cannot be set aside; make the shards again"
            )
        return bad
