"""torch.distributed set-up from torchrun or Slurm (srun) environments, and the few collectives the trainer uses."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dali_kd import STARTED_BY_PID
from dali_kd.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise UserError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def detect() -> DistInfo:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK first; then srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(
            _int_env("RANK"),
            _int_env("WORLD_SIZE"),
            _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0,
            "torchrun",
        )
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(
            _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS"), _int_env("SLURM_LOCALID"), "slurm"
        )
    return DistInfo()


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[07-09,12],cpu3' → 'gpu07' (what `scontrol show hostnames` gives)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the first host")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher(launcher: int = STARTED_BY_PID) -> bool:
    """Under torchrun (Linux), have the kernel SIGKILL this rank when its launcher ends, and end it now if the
    launcher (the parent it had when dali_kd was first imported) has already ended; whether the signal is set.

    torchrun starts each rank in a session of its own, so `kill -9` of torchrun, of its process group, or
    `timeout -s KILL` reach torchrun alone. Its ranks would train on unsupervised, holding the run directory; and a
    rank still starting up would join the rendezvous of whichever torchrun listens on the port next (a resumed run
    started at once): its store then hands out the old rank's address, and the new ranks cannot connect. A stop
    signal torchrun survives (SIGTERM, SIGINT) it passes on to its ranks itself."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != launcher:  # ended before the kernel was told: as if after
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def init(info: DistInfo, device_type: str, timeout_s: int = 1800) -> None:
    """Join the process group: NCCL on GPU, gloo on CPU. Under srun the master is the job's first node; under
    torchrun the rank ends with its launcher (a launcher that ended earlier took the rendezvous store with it, so
    joining fails)."""
    if not info.is_distributed:
        return
    end_with_launcher()
    if info.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", first_host(os.environ.get("SLURM_JOB_NODELIST", "localhost")))
        # A port per job, so that two jobs sharing a node do not collide.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend, rank=info.rank, world_size=info.world_size, timeout=timedelta(seconds=timeout_s)
    )


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks (no-op in a single process); returns the tensor."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank: how ranks agree to stop, save or skip together."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce(value, "max").item() > 0)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different row counts."""
    if not active():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)])


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank (small things: RNG and stream states)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's object on every rank (decisions that must be identical everywhere: run directory, resume path)."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
