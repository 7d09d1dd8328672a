"""What a run, a checkpoint and a teacher cache recognise each other by: hashes of the config, the teacher's weights
and the training file list."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dali_kd.config import Config, resume_free_keys


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_fingerprint(cfg: Config) -> dict[str, Any]:
    """The flattened config minus the keys a resume may change (those declared `free_on_resume` in the schema)."""
    flat = _flatten(cfg.model_dump(mode="json"))
    free = resume_free_keys()
    return {k: v for k, v in flat.items() if k not in free}


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(config_fingerprint(cfg), sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(module: torch.nn.Module) -> str:
    """A hash of a model's weights (and buffers), to recognise the same teacher again."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def files_hash(files: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def data_identity(files: Sequence[str]) -> dict[str, Any]:
    """What a checkpoint remembers of the training file list: its length, its hash (as the teacher cache's header
    has it) and a sorted 64-bit digest per file, so that a changed list can be told with how many files came and
    went (8 bytes a file: 10 MB for ImageNet's 1.28 M)."""
    digests = np.frombuffer(
        b"".join(hashlib.blake2b(f.encode(), digest_size=8).digest() for f in files), np.int64
    )
    return {
        "count": len(files),
        "hash": files_hash(tuple(files)),
        "digests": torch.from_numpy(np.sort(digests)),
    }
