"""Run-time choices made once at start: device, precision, seeds, the LR schedule."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from dali_kd.errors import UserError


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """auto: this process's GPU when CUDA is available, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to PyTorch (try --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} are visible"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_compile(setting: str | bool, device: torch.device | str) -> bool:
    """train.compile_student and model.teacher.compile: auto compiles on CUDA only (on the CPU the first compile
    costs about a minute of CPU and the convolutions run in oneDNN either way, so a short run is faster without it)."""
    return torch.device(device).type == "cuda" if setting == "auto" else bool(setting)


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block, then put back (a notebook's session keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 on CPU (bf16 there only when asked)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Mixed precision in `dtype` on the device's type; no autocast at all for None (full precision).

    Not torch.autocast(enabled=False): that still refuses device types without autocast, such as the `meta`
    stand-in device the device-contract test trains on."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
