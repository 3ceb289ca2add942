"""Host → device copies that never stall the host.

`torch.tensor(list, device="cuda")` copies from pageable memory and waits for the device to drain
its queue, which would undo overlapped scheduling. Packing a step's integers into one pinned buffer
and copying it asynchronously keeps the host running ahead of the device.
"""
from __future__ import annotations

import torch


def pinned(values: list, dtype: torch.dtype) -> torch.Tensor:
    """Values in pinned host memory, to copy from with non_blocking=True: the caching host allocator
    keeps the block alive until its copy has run."""
    return torch.tensor(values, dtype=dtype).pin_memory()


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return pinned(values, dtype).to(device, non_blocking=True)


def pack_to_device(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Several int64 lists in one transfer; returns device views, one per list."""
    flat = [v for p in parts for v in p]
    t = to_device(flat, torch.int64, device)
    out, start = [], 0
    for p in parts:
        out.append(t[start:start + len(p)])
        start += len(p)
    return out


class HostCopy:
    """Start copying device tensors to pinned host memory now; read them later without waiting for
    work queued after this point (a plain .tolist() would wait for the whole stream)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.event = None
        if tensors and tensors[0].device.type == "cuda":
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self.host, tensors):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.event.record()
        else:
            self.host = list(tensors)

    def get(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.host
