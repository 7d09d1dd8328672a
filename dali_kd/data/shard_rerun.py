"""What a rerun into a shard folder finds: the shards it keeps (same plan, same bytes) and what makes it refuse
the folder (other settings, files that are not shards)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from dali_kd.data import shards as fmt
from dali_kd.data.shard_plan import ShardPlan
from dali_kd.errors import UserError

# What a rerun needs to keep finished shards: the settings, then one line per finished shard with the digest of its
# plan (which includes each source file's size and mtime, so it stays out of the deterministic manifest).
STATE_NAME = ".shard-state.jsonl"
# The files a shard run writes into OUT (with the temporary names of atomic writes); anything else is the user's.
OWN_FILE = re.compile(
    r"\.?(shard-\d{6}\.(tar|idx)|manifest\.json|samples\.jsonl|shard-state\.jsonl)(\..+\.tmp)?|scan"
)


def _own_file(name: str) -> bool:
    return OWN_FILE.fullmatch(name) is not None


def _settings_change(old: dict, new: dict) -> str:
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(changed[:3])


def finished_shards(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
    """The shard records a previous run into OUT left (by name), after refusing OUT if it was made with other
    settings or holds files that are not ours; with overwrite, our old files are removed instead."""
    manifest, state = out / fmt.MANIFEST_NAME, out / STATE_NAME
    old_settings, records = None, {}
    try:
        lines = [json.loads(line) for line in state.read_text().splitlines()] if state.exists() else []
        if lines:
            old_settings = lines[0]["settings"]
            records = {r["name"]: r for r in lines[1:]}
        elif manifest.exists():  # finished shards without their state (copied without hidden files): not kept
            old_settings = json.loads(manifest.read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        # A state we cannot read is as good as one made with other settings.
        old_settings, records = "unreadable", {}
    foreign = sorted(p.name for p in out.iterdir() if not _own_file(p.name)) if out.is_dir() else []
    if not overwrite:
        if foreign:
            raise UserError(
                f"{out} holds files that are not shards (e.g. {foreign[0]}): choose an empty folder"
            )
        if old_settings is not None and old_settings != settings:
            what = (
                _settings_change(old_settings, settings) if isinstance(old_settings, dict) else "unreadable"
            )
            raise UserError(
                f"{out} holds shards made with other settings ({what}): pass --overwrite to replace them, "
                f"or choose another folder"
            )
        if old_settings is None and any(p.name.endswith(".tar") for p in out.iterdir()):
            raise UserError(f"{out} holds shards without a manifest: pass --overwrite to replace them")
        return records
    for p in out.iterdir() if out.is_dir() else ():
        if _own_file(p.name) and p.is_file():
            p.unlink()
    return {}


def shards_to_keep(out: Path, plans: list[ShardPlan], records: dict[str, dict]) -> dict[str, str]:
    """name -> sha256 of each finished shard that is exactly what its plan asks for now: the same samples from
    unchanged files (the plan's digest), its index as planned, and its bytes as they were written (re-hashed)."""
    keep = {}
    for plan in plans:
        old, idx = records.get(plan.name), fmt.index_path(out / plan.name)
        if not old or old.get("plan") != plan.digest or not idx.is_file():
            continue
        if idx.read_text() == fmt.index_text(plan.members) and file_sha256(out / plan.name) == old.get(
            "sha256"
        ):
            keep[plan.name] = old["sha256"]
    return keep


def file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()
