"""Which samples go into which tar shard, in what order, and the digest that names exactly that plan."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dali_kd.data import shards as fmt


@dataclass(frozen=True)
class Sample:
    id: int
    path: str  # relative to SRC
    label: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return fmt.sample_key(self.id)

    @property
    def ext(self) -> str:
        return fmt.image_ext(self.path)


@dataclass
class ShardPlan:
    """What one shard will hold, in order; `digest` names exactly that (a rerun keeps a shard only if it matches)."""

    number: int
    samples: list[Sample]
    num_bytes: int = 0
    digest: str = ""

    @property
    def name(self) -> str:
        return fmt.shard_name(self.number)

    @property
    def members(self) -> list[list[fmt.Member]]:
        """Each sample's members where they sit in the tar (computed when needed: tens of millions of samples)."""
        out, pos = [], 0
        for s in self.samples:
            members, pos = fmt.sample_members(s.key, s.ext, s.size, s.label, pos)
            out.append(members)
        return out

    def lay_out(self, settings: dict[str, Any]) -> None:
        members = self.members
        self.num_bytes = (members[-1][-1].offset + fmt.padded(members[-1][-1].size)) + len(fmt.END_OF_ARCHIVE)
        rows = [[s.id, s.path, s.label, s.size, s.mtime_ns] for s in self.samples]
        text = json.dumps(
            {"settings": settings, "samples": rows, "version": fmt.FORMAT_VERSION}, sort_keys=True
        )
        self.digest = hashlib.sha256(text.encode()).hexdigest()


def shuffled(ids: range, seed: int) -> list[int]:
    """A seeded permutation that no library version changes: sort by a keyed hash of the id."""
    salt = str(seed).encode()
    return sorted(
        ids, key=lambda i: hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8, key=salt).digest()
    )


def plan_shards(
    samples: list[Sample], shard_size: int, seed: int, shuffle: bool, settings: dict
) -> list[ShardPlan]:
    """Samples in (shuffled) order, cut into shards of about shard_size bytes (a shard holds at least one)."""
    order = shuffled(range(len(samples)), seed) if shuffle else list(range(len(samples)))
    plans: list[ShardPlan] = []
    current: list[Sample] = []
    current_bytes = len(fmt.END_OF_ARCHIVE)
    for i in order:
        s = samples[i]
        sample_bytes = 2 * fmt.BLOCK + fmt.padded(len(fmt.label_bytes(s.label))) + fmt.padded(s.size)
        if current and current_bytes + sample_bytes > shard_size:
            plans.append(ShardPlan(len(plans), current))
            current, current_bytes = [], len(fmt.END_OF_ARCHIVE)
        current.append(s)
        current_bytes += sample_bytes
    if current:
        plans.append(ShardPlan(len(plans), current))
    for plan in plans:
        plan.lay_out(settings)
    return plans
