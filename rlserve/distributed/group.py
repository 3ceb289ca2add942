"""One tensor-parallel group: a rank, a size, and the two collectives the parallel layers use.

The model's collectives run in torch.distributed's default group (so one engine of several ranks per
process), whose timeout bounds the start-up rendezvous too. Rank 0's step plans go over a second group of
the same ranks with a very long timeout: a worker waits there for the next step, which an idle server
may not send for hours.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

STARTUP_TIMEOUT = timedelta(minutes=10)
IDLE_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    plans: Any = None       # the ProcessGroup rank 0's plans travel in (None: the default group)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        dist.all_reduce(x)
        return x

    def all_reduce_min(self, value: int) -> int:
        """The smallest of the ranks' values."""
        on_gpu = dist.get_backend() == "nccl"
        t = torch.tensor([value], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

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
                            timeout=STARTUP_TIMEOUT, device_id=device if device.type == "cuda" else None)
    return TPGroup(rank, size, dist.new_group(list(range(size)), timeout=IDLE_TIMEOUT))


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
