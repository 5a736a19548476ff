"""torch.distributed in one place: the same calls work in a single process (where they do nothing).

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; `init_runtime()` joins the group (NCCL on GPUs,
gloo on CPUs) and says where this process runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leaves the process group, so that its threads (gloo, checkpoint writers) stop before the
    interpreter exits: one still running at exit aborts the process (SIGABRT, "terminate called
    without an active exception"), which seen from torchrun is a failed run."""
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


@dataclass
class Runtime:
    """Where this process runs: its rank among `world_size`, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime() -> Runtime:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Any torchrun launch joins a group, one process too: FSDP shards over it even then.
    if "WORLD_SIZE" in os.environ and not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank=rank(), world_size=world_size(), device=device)
