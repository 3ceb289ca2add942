"""One tensor-parallel group: a rank, a size, and the two collectives the parallel layers use.

The group is torch.distributed's default one (one engine of several ranks per process). Its timeout is
long on purpose: a worker rank waits in a broadcast for rank 0's next step, which an idle server may
not send for hours.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

IDLE_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's x side by side along the last dimension (rank order)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


def device_for_rank(device: torch.device, rank: int) -> torch.device:
    """Rank r of a CUDA engine runs on the r-th GPU after the one asked for (cuda → cuda:r)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def init_tensor_parallel(rank: int, size: int, port: int, device: torch.device) -> TPGroup:
    """Join the group of `size` ranks rendezvousing on 127.0.0.1:port (blocks until all have joined)."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group: one tensor-parallel "
                           "engine per process (shut the other down first)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=IDLE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    return TPGroup(rank, size)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
